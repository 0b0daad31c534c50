"""Character language models on a token-mixer encoder: masked (BERT-style) and causal, one model class.

    x = TokenEmbedding(ids)            ids (B, N) -> (N, B, D), sequence-first
    x = Encoder(x)                     n_layers pre-norm blocks: token mixer, then channel MLP (Eq. 1, Eq. 2)
    logits = head(x)                   (N, B, D) -> (B, N, vocab_size)

The config decides the objective: ``causal=False`` (`MLMConfig`) is masked language modelling (Devlin
et al., 2019): 15% of the ordinary tokens are chosen; of those 80% become [MASK], 10% a random ordinary
token and 10% stay unchanged; the loss is cross-entropy on the chosen positions. ``causal=True``
(`LMConfig`) is next-character prediction: position i sees ids[:, :i + 1] only, which a token-mixing
MLP allows once W1 and W2 are lower-triangular (`TokenMixingMlp(causal=True)`).
Inference: `fill_mask` (masked) and `generate` (causal).
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import checkpoints
from .data.tokenizer import SPECIAL_TOKENS
from .encoder import Encoder, EncoderConfig, TokenEmbedding

IGNORE_INDEX = -100


@dataclass(frozen=True, kw_only=True)
class TextConfig(EncoderConfig):
    """A character language model: the encoder's shape plus the vocabulary; ``causal`` picks the objective."""

    vocab_size: int
    """Number of token ids, special tokens included."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.vocab_size, int) or isinstance(self.vocab_size, bool) or self.vocab_size <= SPECIAL_TOKENS:
            raise ValueError(f"vocab_size must be an integer >= 3 (two specials and a character), got {self.vocab_size!r}")

    @property
    def task(self) -> str:
        return "lm" if self.causal else "mlm"

    @property
    def encoder(self) -> EncoderConfig:
        return EncoderConfig(**{k: v for k, v in self.to_dict().items() if k != "vocab_size"})


@dataclass(frozen=True, kw_only=True)
class MLMConfig(TextConfig):
    """A masked language model (``causal`` False)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.causal:
            raise ValueError("a masked language model is not causal; use LMConfig for a causal one")


@dataclass(frozen=True, kw_only=True)
class LMConfig(TextConfig):
    """A causal language model; the causal token MLP needs ``tokens_mlp_dim == seq_len``."""

    tokens_mlp_dim: int = 32
    """Hidden width of the token-mixing MLP; must equal seq_len when causal."""
    causal: bool = True
    """Position i sees only positions <= i."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.causal:
            raise ValueError("a language model must be causal (causal=True)")


def config_class(task: str) -> type[TextConfig]:
    return {"mlm": MLMConfig, "lm": LMConfig}[task]


class LanguageModel(nn.Module):
    """Embeddings, a token-mixer encoder and a linear output head; masked or causal as its config says."""

    def __init__(self, config: TextConfig):
        super().__init__()
        self.config = config
        self.embed = TokenEmbedding(config.vocab_size, config)
        self.encoder = Encoder(config.encoder)
        self.head = nn.Linear(config.d_model, config.vocab_size)

    def forward(self, input_ids: Tensor, padding_mask: Tensor | None = None,
                positions: Tensor | None = None) -> Tensor:
        """Logits (B, N, vocab_size) for ids (B, N); with ``positions`` (flat indices into (B, N), as
        `chosen_positions` gives them) the logits at those positions only, (len(positions), vocab_size):
        the MLM loss needs the ~15 % chosen ones, and the head then multiplies 15 % of the rows."""
        xs = self.encoder.blocks_seq_first(self.embed(input_ids), padding_mask)  # (N, B, D)
        if positions is None:
            return self.head(self.encoder.norm(xs)).transpose(0, 1)  # (N, B, vocab_size) -> (B, N, vocab_size)
        n, b = xs.shape[:2]
        rows = positions % n * b + positions // n  # position (b, n) is row n·B + b of the sequence-first xs
        # padded to a multiple of 64 rows: the chosen count differs in every batch, and oneDNN builds its
        # bf16 products anew for each new shape (1.4 ms a step here); whole 64s make a few shapes, reused
        chosen = len(rows)
        rows = torch.cat([rows, rows.new_zeros(-chosen % 64)])
        # the final norm is per position: at the chosen rows only (15 %), as the head
        picked = self.encoder.norm(xs.reshape(n * b, -1).index_select(0, rows))
        return self.head(picked)[:chosen]  # (len(positions), vocab_size)

    def save_pretrained(self, directory: str | os.PathLike, tokenizer=None) -> None:
        """Write ``config.json`` and ``model.safetensors`` (and ``vocab.json`` when given the tokenizer):
        the Hugging Face layout, and a run directory that `mlpmixer.load` reads."""
        from .runs import write_config

        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        checkpoints.save_weights(self, out / checkpoints.MODEL_FILE)
        write_config(out, {"task": self.config.task, "model": self.config.to_dict()})
        if tokenizer is not None:
            tokenizer.save(out)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> "LanguageModel":
        """The model saved by `save_pretrained` or trained by ``mlpmixer train mlm|lm``, in eval mode."""
        from .runs import build_config, read_run_config

        saved = read_run_config(directory, ("mlm", "lm"))
        model = cls(build_config(config_class(saved["task"]), saved["model"],
                                 Path(directory) / checkpoints.CONFIG_FILE))
        checkpoints.load_weights(model, Path(directory) / checkpoints.MODEL_FILE)
        return model.eval()


MaskedLanguageModel = LanguageModel  # the names of 0.1.0: one class serves both objectives
CausalLanguageModel = LanguageModel


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
    ordinary = _ordinary_ids(vocab_size, tuple(special_ids), ids.dtype, ids.device)
    if len(ordinary) == 0:
        raise ValueError("the vocabulary has no ordinary tokens to mask")
    chosen = (torch.rand(ids.shape, generator=generator, device=ids.device) < mlm_probability)
    for special in set(special_ids):
        chosen &= ids != special
    fate = torch.rand(ids.shape, generator=generator, device=ids.device)
    replacements = ordinary[torch.randint(len(ordinary), ids.shape, generator=generator, device=ids.device)]
    inputs = ids.masked_fill(chosen & (fate < 0.8), mask_id)
    inputs = torch.where(chosen & (fate >= 0.8) & (fate < 0.9), replacements, inputs)
    labels = ids.masked_fill(~chosen, IGNORE_INDEX)
    return inputs, labels


@functools.lru_cache(maxsize=16)
def _ordinary_ids(vocab_size: int, special_ids: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """The ids in [0, vocab_size) outside ``special_ids``, ascending (made once per vocabulary)."""
    specials = set(special_ids)
    return torch.tensor([i for i in range(vocab_size) if i not in specials], dtype=dtype, device=device)


def chosen_positions(labels: Tensor) -> Tensor:
    """The flat indices into ``labels`` (B, N) of the positions the MLM chose (label not IGNORE_INDEX)."""
    return (labels.reshape(-1) != IGNORE_INDEX).nonzero().squeeze(1)


def mlm_loss(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Cross-entropy over chosen positions of ``logits`` (B, N, vocab_size); also returns (correct, chosen)
    counts for accuracy."""
    chosen = chosen_positions(labels)  # ~15 % of the positions: the rest cost nothing
    return _chosen_loss(logits.reshape(-1, logits.shape[-1]).index_select(0, chosen),
                        labels.reshape(-1).index_select(0, chosen))


def mlm_loss_of(model: nn.Module, inputs: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """`mlm_loss` of ``model`` (a `LanguageModel`) on ``inputs``, with the head applied at the chosen
    positions only (the same loss; the head's products and their gradients on 15 % of the rows)."""
    chosen = chosen_positions(labels)
    return _chosen_loss(model(inputs, positions=chosen), labels.reshape(-1).index_select(0, chosen))


def _chosen_loss(picked: Tensor, targets: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Mean cross-entropy of the chosen positions' logits (chosen, vocab) against their targets (chosen,)."""
    count = torch.tensor(targets.numel(), device=targets.device)
    # summed then divided, so a batch with nothing chosen gives 0 (not 0/0) and no gradient
    loss = F.cross_entropy(picked.float(), targets, reduction="sum")
    correct = (picked.argmax(-1) == targets).sum()
    return loss / count.clamp(min=1), correct, count


def lm_loss(logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Mean next-token cross-entropy (nats), correct predictions and the token count."""
    flat = logits.reshape(-1, logits.shape[-1])
    loss = F.cross_entropy(flat.float(), targets.reshape(-1))
    correct = (flat.argmax(-1) == targets.reshape(-1)).sum()
    return loss, correct, torch.tensor(targets.numel())


@dataclass(frozen=True)
class Fill:
    """The completed text and, for each masked position, its top-k (character, probability)."""

    text: str
    candidates: list[tuple[int, list[tuple[str, float]]]]


@torch.no_grad()
def fill_mask(model: LanguageModel, tok, text: str, mask_char: str = "_", top_k: int = 3) -> Fill:
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
        p, idx = probs[i].topk(min(top_k, tok.vocab_size - SPECIAL_TOKENS))
        out[i] = tok.itos[int(idx[0])]
        candidates.append((i, [(tok.itos[int(j)], float(q)) for q, j in zip(p, idx)]))
    return Fill("".join(out), candidates)


@torch.no_grad()
def generate(model: LanguageModel, tok, prompt: str, max_new_chars: int = 200, temperature: float = 1.0,
             top_k: int | None = None, seed: int | None = None) -> Iterator[str]:
    """Sample characters one at a time, each from the last ``seq_len`` characters (a sliding window);
    ``temperature`` 0 is greedy decoding (always the most likely character)."""
    if not prompt:
        raise ValueError("the prompt is empty; give at least one character, e.g. --prompt 'ROMEO:'")
    if not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"--temperature must be a finite number >= 0 (0: greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"--top-k must be at least 1, got {top_k}")
    ids = tok.encode(prompt).tolist()
    device = next(model.parameters()).device
    generator = torch.Generator(device=device)
    if seed is not None:
        generator.manual_seed(seed)
    else:
        generator.seed()
    was_training = model.training
    model.eval()
    ordinary = torch.ones(tok.vocab_size, dtype=torch.bool, device=device)
    ordinary[list(tok.special_ids)] = False
    for _ in range(max_new_chars):
        window = torch.tensor(ids[-model.config.seq_len:], device=device)[None]
        logits = model(window)[0, -1].float().masked_fill(~ordinary, float("-inf"))
        if temperature == 0:
            next_id = int(logits.argmax())
        else:
            logits = logits / temperature
            if top_k is not None:
                kth = logits.topk(min(top_k, int(ordinary.sum()))).values[-1]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            next_id = int(torch.multinomial(logits.softmax(-1), 1, generator=generator))
        ids.append(next_id)
        yield tok.itos[next_id]
    model.train(was_training)
