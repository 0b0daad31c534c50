"""Fixed-length training windows over a token stream, as the seed experiment cuts them.

Each epoch starts the windows at a random offset in [0, seq_len) and shuffles their order, so the
model sees every character at every position over a few epochs. Validation uses offset 0, in order.
"""

from __future__ import annotations

import torch
from torch import Tensor


def step_seed(seed: int, step: int) -> int:
    """The seed of everything random in step (or epoch) ``step`` of a run seeded ``seed``: a resumed run
    draws exactly what an uninterrupted one would."""
    return seed * 1_000_003 + step


def split_train_val(ids: Tensor, val_fraction: float = 0.1) -> tuple[Tensor, Tensor]:
    """Deterministic split: the last ``val_fraction`` of the stream is validation."""
    cut = int(len(ids) * (1.0 - val_fraction))
    return ids[:cut], ids[cut:]


def windows(ids: Tensor, seq_len: int, offset: int = 0, stride: int | None = None) -> Tensor:
    """Windows (M, seq_len) of the stream starting at ``offset``, every ``stride`` (default seq_len)."""
    stride = stride or seq_len
    n = (len(ids) - offset - seq_len) // stride + 1
    if n <= 0:
        return ids.new_empty((0, seq_len))
    return ids[offset:].unfold(0, seq_len, stride)[:n]


class WindowSampler:
    """Endless shuffled batches of windows, one epoch after another; its state is two integers.

    ``batch(step)`` is a pure function of (seed, step), so a resumed run continues exactly.
    """

    def __init__(self, ids: Tensor, seq_len: int, batch_size: int, seed: int, extra: int = 0):
        self.ids, self.seq_len, self.batch_size, self.seed = ids, seq_len, batch_size, seed
        self.extra = extra  # windows of seq_len + extra, e.g. 1 for next-token targets
        self.per_epoch = len(windows(ids, seq_len + extra, seq_len - 1, seq_len)) // batch_size
        if self.per_epoch == 0:
            raise ValueError(f"the training text ({len(ids)} tokens) is too short for one batch of "
                             f"{batch_size} windows of {seq_len + extra}; use a smaller --batch-size or --seq-len")
        self._epoch, self._order, self._windows = -1, None, None

    def batch(self, step: int) -> Tensor:
        """The windows (batch_size, seq_len + extra) of training step ``step`` (0-based)."""
        epoch, index = divmod(step, self.per_epoch)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(step_seed(self.seed, epoch))
            offset = int(torch.randint(self.seq_len, (1,), generator=g))
            self._windows = windows(self.ids, self.seq_len + self.extra, offset, self.seq_len)
            self._order = torch.randperm(len(self._windows), generator=g)
            self._epoch = epoch
        rows = self._order[index * self.batch_size:(index + 1) * self.batch_size]
        return self._windows[rows]
