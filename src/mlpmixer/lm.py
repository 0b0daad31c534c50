"""Autoregressive character language modelling with causal token mixing.

The seed notes that with MLP token mixing "masking is not possible": every output sees every input.
A causal token-mixing MLP (lower-triangular W1 and W2, see `TokenMixingMlp`) removes that limit, so
the Mixer can predict the next character: ids (B, N) -> logits (B, N, vocab_size), where position i
sees ids[:, :i + 1] only.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .encoder import Encoder, EncoderConfig, TokenEmbedding
from .mlm import MLMConfig


@dataclass(frozen=True, kw_only=True)
class LMConfig(MLMConfig):
    """A causal language model; the causal token MLP needs ``tokens_mlp_dim == seq_len``."""

    tokens_mlp_dim: int = 32
    """Hidden width of the token-mixing MLP; must equal seq_len when causal."""
    causal: bool = True
    """Position i sees only positions <= i."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.causal:
            raise ValueError("a language model must be causal (causal=True)")


class CausalLanguageModel(nn.Module):
    """Embeddings, a causal token-mixer encoder and a linear next-character head."""

    def __init__(self, config: LMConfig):
        super().__init__()
        self.config = config
        self.embed = TokenEmbedding(config.vocab_size, config)
        self.encoder = Encoder(EncoderConfig(**{k: v for k, v in config.to_dict().items() if k != "vocab_size"}))
        self.head = nn.Linear(config.d_model, config.vocab_size)

    def forward(self, input_ids: Tensor) -> Tensor:
        xs = self.encoder.forward_seq_first(self.embed(input_ids))  # (N, B, D)
        return self.head(xs).transpose(0, 1)  # (N, B, vocab_size) -> (B, N, vocab_size)


def lm_loss(logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Mean next-token cross-entropy (nats), correct predictions and the token count."""
    flat = logits.reshape(-1, logits.shape[-1])
    loss = F.cross_entropy(flat.float(), targets.reshape(-1))
    correct = (flat.argmax(-1) == targets.reshape(-1)).sum()
    return loss, correct, torch.tensor(targets.numel())


class LMTask:
    """Next-character batches, loss, validation (nats and bits per character) and a sample for `train.fit`."""

    name = "lm"
    best_metric = ("val_loss", False)

    def __init__(self, train_ids: Tensor, val_ids: Tensor, tokenizer, seq_len: int, batch_size: int, seed: int,
                 device: torch.device, eval_batch_size: int = 256, max_val_windows: int | None = None,
                 prompt: str = "ROMEO:"):
        from .data.windows import WindowSampler, windows

        self.sampler = WindowSampler(train_ids, seq_len, batch_size, seed, extra=1)
        self.val = windows(val_ids, seq_len + 1, 0, seq_len)[:max_val_windows]
        if len(self.val) == 0:
            raise ValueError(f"the validation text ({len(val_ids)} characters) is shorter than one window of "
                             f"{seq_len + 1}; use a longer text or a smaller --seq-len")
        self.tok, self.device, self.eval_batch_size = tokenizer, device, eval_batch_size
        self.prompt = prompt if set(prompt) <= tokenizer.stoi.keys() else tokenizer.decode(self.val[0][:8])

    def batch(self, step: int, generator: torch.Generator) -> Tensor:
        return self.sampler.batch(step).to(self.device, non_blocking=True)  # (B, seq_len + 1)

    def loss(self, model: nn.Module, batch: Tensor, generator: torch.Generator):
        loss, correct, count = lm_loss(model(batch[:, :-1]), batch[:, 1:])
        return loss, {"correct": correct, "count": count}

    def tokens_per_batch(self, batch: Tensor) -> int:
        return batch.shape[0] * (batch.shape[1] - 1)

    def describe(self) -> str:
        return (f"{len(self.sampler.ids):,} training characters, {len(self.val):,} validation windows of "
                f"{self.val.shape[1] - 1}, vocabulary {self.tok.vocab_size}")

    def epoch(self, step: int) -> float:
        return step / self.sampler.per_epoch

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        return self.summarise(self.evaluate_sums(model))

    def evaluate_sums(self, model: nn.Module, rank: int = 0, world: int = 1) -> dict[str, float]:
        from .train import shard_sums

        def measure(i: int, chunk: Tensor):
            chunk = chunk.to(self.device)
            return lm_loss(model(chunk[:, :-1]), chunk[:, 1:])

        return shard_sums(self.val.split(self.eval_batch_size), rank, world, measure)

    @staticmethod
    def summarise(sums: dict[str, float]) -> dict[str, float]:
        nats = sums["loss"] / max(sums["count"], 1.0)
        return {"val_loss": nats, "val_bpc": nats / math.log(2), "val_accuracy": sums["correct"] / max(sums["count"], 1.0)}

    def report(self, model: nn.Module, step: int) -> str:
        text = "".join(generate(model, self.tok, self.prompt, max_new_chars=120, temperature=0.8, seed=0))
        return self.prompt + text


@torch.no_grad()
def generate(model: CausalLanguageModel, tok, prompt: str, max_new_chars: int = 200, temperature: float = 1.0,
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
