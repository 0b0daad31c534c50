"""Masked language modelling (Devlin et al., 2019) with a token-mixer encoder.

15% of the ordinary tokens are chosen; of those, 80% become [MASK], 10% a random ordinary token and
10% stay unchanged. The loss is cross-entropy on the chosen positions only; the metric is
masked-token accuracy. ids (B, N) -> logits (B, N, vocab_size).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .encoder import Encoder, EncoderConfig, TokenEmbedding

IGNORE_INDEX = -100


@dataclass(frozen=True, kw_only=True)
class MLMConfig(EncoderConfig):
    """A masked language model: the encoder's shape plus the vocabulary."""

    vocab_size: int
    """Number of token ids, special tokens included."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.vocab_size, int) or isinstance(self.vocab_size, bool) or self.vocab_size < 3:
            raise ValueError(f"vocab_size must be an integer >= 3 (two specials and a character), got {self.vocab_size!r}")

    @property
    def encoder(self) -> EncoderConfig:
        fields = {k: v for k, v in self.to_dict().items() if k != "vocab_size"}
        return EncoderConfig(**fields)


class MaskedLanguageModel(nn.Module):
    """Embeddings, a token-mixer encoder and a linear output head."""

    def __init__(self, config: MLMConfig):
        super().__init__()
        self.config = config
        self.embed = TokenEmbedding(config.vocab_size, config)
        self.encoder = Encoder(config.encoder)
        self.head = nn.Linear(config.d_model, config.vocab_size)

    def forward(self, input_ids: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        xs = self.encoder.forward_seq_first(self.embed(input_ids), padding_mask)  # (N, B, D)
        return self.head(xs).transpose(0, 1)  # (N, B, vocab_size) -> (B, N, vocab_size)


def mask_tokens(ids: Tensor, *, mask_id: int, vocab_size: int, special_ids: list[int] | tuple[int, ...],
                mlm_probability: float = 0.15, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """BERT's masking procedure; returns ``(inputs, labels)`` with the shape of ``ids``.

    Each ordinary token (an id in ``[0, vocab_size)`` not in ``special_ids``) is chosen with
    probability ``mlm_probability``; one uniform draw then sends a chosen token to [MASK] (80%), to
    a random *ordinary* token (10%) or leaves it (10%), so the three cases are exclusive and exact.
    Labels hold the original id where chosen and -100 elsewhere.
    """
    if mask_id not in special_ids:
        raise ValueError(f"mask_id {mask_id} must be one of special_ids {list(special_ids)}")
    if not 0.0 < mlm_probability < 1.0:
        raise ValueError(f"mlm_probability must be in (0, 1), got {mlm_probability}")
    specials = torch.tensor(list(special_ids), dtype=ids.dtype, device=ids.device)
    ordinary = torch.tensor([i for i in range(vocab_size) if i not in set(special_ids)], dtype=ids.dtype,
                            device=ids.device)
    if len(ordinary) == 0:
        raise ValueError("the vocabulary has no ordinary tokens to mask")
    chosen = (torch.rand(ids.shape, generator=generator, device=ids.device) < mlm_probability)
    chosen &= ~torch.isin(ids, specials)
    fate = torch.rand(ids.shape, generator=generator, device=ids.device)
    replacements = ordinary[torch.randint(len(ordinary), ids.shape, generator=generator, device=ids.device)]
    inputs = torch.where(chosen & (fate < 0.8), torch.full_like(ids, mask_id), ids)
    inputs = torch.where(chosen & (fate >= 0.8) & (fate < 0.9), replacements, inputs)
    labels = torch.where(chosen, ids, torch.full_like(ids, IGNORE_INDEX))
    return inputs, labels


def mlm_loss(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Cross-entropy over chosen positions; also returns (correct, chosen) counts for accuracy."""
    flat_logits, flat_labels = logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)
    chosen = flat_labels != IGNORE_INDEX
    count = chosen.sum()
    # summed then divided, so a batch with nothing chosen gives 0 (not 0/0) and no gradient
    loss = F.cross_entropy(flat_logits.float(), flat_labels, ignore_index=IGNORE_INDEX, reduction="sum")
    correct = ((flat_logits.argmax(-1) == flat_labels) & chosen).sum()
    return loss / count.clamp(min=1), correct, count


# --- training task -------------------------------------------------------------------------------

SAMPLE_PROMPTS = (  # the seed experiment's prompts (Coriolanus, I.1)
    "We are accounted poor citizens, the patricians good.",
    "What authority surfeits on would relieve us: if they",
    "would yield us but the superfluity, while it were",
    "wholesome, we might guess they relieved us humanely;",
)


class MLMTask:
    """Masked-LM batches, loss, validation (fixed masking seed) and sample fills for `train.fit`."""

    name = "mlm"
    best_metric = ("val_accuracy", True)

    def __init__(self, train_ids: Tensor, val_ids: Tensor, tokenizer, seq_len: int, batch_size: int, seed: int,
                 device: torch.device, eval_batch_size: int = 256, max_val_windows: int | None = None,
                 color: bool = False):
        from .data.windows import WindowSampler, windows

        self.sampler = WindowSampler(train_ids, seq_len, batch_size, seed)
        self.val = windows(val_ids, seq_len)[:max_val_windows]
        if len(self.val) == 0:
            raise ValueError(f"the validation text ({len(val_ids)} characters) is shorter than one window of "
                             f"{seq_len}; use a longer text or a smaller --seq-len")
        self.tok, self.device, self.eval_batch_size, self.color = tokenizer, device, eval_batch_size, color
        self.seq_len = seq_len

    def _mask(self, ids: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        return mask_tokens(ids, mask_id=self.tok.mask_id, vocab_size=self.tok.vocab_size,
                           special_ids=self.tok.special_ids, generator=generator)

    def batch(self, step: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """(inputs, labels) of the whole global batch, masked before any rank takes its shard."""
        return self._mask(self.sampler.batch(step).to(self.device, non_blocking=True), generator)

    def loss(self, model: nn.Module, batch: tuple[Tensor, Tensor], generator: torch.Generator):
        inputs, labels = batch
        loss, correct, count = mlm_loss(model(inputs), labels)
        return loss, {"correct": correct, "count": count}

    def tokens_per_batch(self, batch: tuple[Tensor, Tensor]) -> int:
        return batch[0].numel()

    def describe(self) -> str:
        return (f"{len(self.sampler.ids):,} training characters, {len(self.val):,} validation windows of "
                f"{self.seq_len}, vocabulary {self.tok.vocab_size}")

    def epoch(self, step: int) -> float:
        return step / self.sampler.per_epoch

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        return self.summarise(self.evaluate_sums(model))

    def evaluate_sums(self, model: nn.Module, rank: int = 0, world: int = 1) -> dict[str, float]:
        """Summed loss, correct and chosen counts over this rank's share of the validation batches.

        Each validation batch is masked from its own fixed seed, so the masks are the same at every
        evaluation and whatever the number of ranks.
        """
        from .train import shard_sums

        def measure(i: int, chunk: Tensor):
            generator = torch.Generator(device=self.device).manual_seed(1234 + i)
            inputs, labels = self._mask(chunk.to(self.device), generator)
            return mlm_loss(model(inputs), labels)

        return shard_sums(self.val.split(self.eval_batch_size), rank, world, measure)

    @staticmethod
    def summarise(sums: dict[str, float]) -> dict[str, float]:
        n = max(sums["count"], 1.0)
        return {"val_loss": sums["loss"] / n, "val_accuracy": sums["correct"] / n}

    def sample_windows(self) -> list[Tensor]:
        """The seed's prompts where the vocabulary has their characters, else the first validation windows."""
        prompts = [p[: self.seq_len] for p in SAMPLE_PROMPTS if set(p) <= self.tok.stoi.keys()]
        if prompts:
            return [self.tok.encode(p) for p in prompts]
        return list(self.val[: len(SAMPLE_PROMPTS)])

    def report(self, model: nn.Module, step: int) -> str:
        generator = torch.Generator(device=self.device).manual_seed(4321)
        lines = []
        for ids in self.sample_windows():
            ids = ids.to(self.device)[None]
            inputs, labels = self._mask(ids, generator)
            predicted = model(inputs).argmax(-1)[0]
            lines.append(render_fill(self.tok, inputs[0], labels[0], predicted, self.color))
        return "\n".join(lines)


GREEN, RED, DIM, RESET = "\033[32m", "\033[31m", "\033[2m", "\033[0m"


def render_fill(tok, inputs: Tensor, labels: Tensor, predicted: Tensor, color: bool) -> str:
    """The text with predictions at chosen positions: green right, red wrong (or a marker line)."""
    text, marks = [], []
    for x, y, p in zip(inputs.tolist(), labels.tolist(), predicted.tolist()):
        if y == IGNORE_INDEX:
            ch = tok.itos[x] if x >= 2 else "?"
            text.append(f"{DIM}{ch}{RESET}" if color else ch)
            marks.append(" ")
        else:
            ch = tok.itos[p] if p >= 2 else "*"
            text.append(f"{GREEN if p == y else RED}{ch}{RESET}" if color else ch)
            marks.append("^" if p == y else "x")
    line = "".join(text).replace("\n", "⏎")
    return line if color else f"{line}\n{''.join(marks)}"


# --- fill-mask -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Fill:
    """The completed text and, for each masked position, its top-k (character, probability)."""

    text: str
    candidates: list[tuple[int, list[tuple[str, float]]]]


@torch.no_grad()
def fill_mask(model: MaskedLanguageModel, tok, text: str, mask_char: str = "_", top_k: int = 3) -> Fill:
    """Fill every ``mask_char`` in ``text``. Texts longer than ``seq_len`` are filled window by window
    (consecutive windows of ``seq_len`` characters, the last one shorter), so each prediction sees at
    most the ``seq_len`` characters of its own window."""
    if len(mask_char) != 1:
        raise ValueError(f"--mask-char must be one character, got {mask_char!r}")
    positions = [i for i, c in enumerate(text) if c == mask_char]
    if not positions:
        raise ValueError(f"the text has no mask character {mask_char!r}; mark the characters to fill with it")
    if top_k < 1:
        raise ValueError(f"--top-k must be at least 1, got {top_k}")
    unknown = sorted({c for c in text if c != mask_char and c not in tok.stoi})
    if unknown:
        raise ValueError(f"characters not in the model's vocabulary: {''.join(unknown)!r}; remove or replace them")
    ids = torch.tensor([tok.mask_id if c == mask_char else tok.stoi[c] for c in text], dtype=torch.long)
    model.eval()
    device = next(model.parameters()).device
    probs = torch.cat([model(w[None].to(device))[0].softmax(-1).cpu() for w in ids.split(model.config.seq_len)])
    probs[:, list(tok.special_ids)] = 0.0
    out, candidates = list(text), []
    for i in positions:
        p, idx = probs[i].topk(min(top_k, tok.vocab_size - 2))
        out[i] = tok.itos[int(idx[0])]
        candidates.append((i, [(tok.itos[int(j)], float(q)) for q, j in zip(p, idx)]))
    return Fill("".join(out), candidates)
