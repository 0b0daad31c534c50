"""One training loop for every task: optimiser and schedule, clipping, autocast, periodic validation,
metrics.jsonl, atomic checkpoints and exact resume.

A task supplies its batches, its loss and its validation; ``fit`` does the rest. Everything random
in a step (the batch, the masking, dropout) is derived from (seed, step), so a resumed run repeats
an uninterrupted one exactly.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from . import checkpoints

OPTIMIZERS = ("noam", "adamw")
PRECISIONS = ("fp32", "bf16", "fp16")


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """How to train; the defaults are the seed experiment's (Noam, batch 64)."""

    steps: int = 3000
    """Optimiser steps in the whole run."""
    batch_size: int = 64
    """Sequences (or images) per step."""
    optimizer: str = "noam"
    """``noam``: Adam, rate factor·d_model^-0.5·min(t^-0.5, t·w^-1.5); ``adamw``: warm-up + cosine."""
    lr: float = 1.0
    """Noam's factor, or AdamW's peak learning rate."""
    warmup: int = 2000
    """Warm-up steps."""
    weight_decay: float = 0.0
    """Decoupled weight decay (AdamW only)."""
    grad_clip: float = 1.0
    """Clip the gradients' global norm to this (0 = off)."""
    seed: int = 0
    """Seed of everything random: initialisation, batches, masking, dropout."""
    eval_every: int = 500
    """Validate every this many steps (and at the end)."""
    log_every: int = 50
    """Write a training row to metrics.jsonl every this many steps."""
    ckpt_every: int = 1000
    """Checkpoint every this many steps (and at the end)."""
    device: str = "auto"
    """``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N``."""
    precision: str = "fp32"
    """Autocast dtype for the forward pass: fp32 (off), bf16 or fp16 (CUDA)."""

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "eval_every", "log_every", "ckpt_every"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.warmup < 0 or self.lr <= 0 or self.grad_clip < 0 or self.weight_decay < 0:
            raise ValueError("warmup, grad_clip and weight_decay must be >= 0 and lr > 0")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"unknown precision {self.precision!r}; choose one of {', '.join(PRECISIONS)}")


class Task(Protocol):
    """What the loop needs to know about a task."""

    name: str

    def batch(self, step: int, generator: torch.Generator) -> Any:
        """The training batch of ``step``."""

    def loss(self, model: nn.Module, batch: Any, generator: torch.Generator) -> tuple[Tensor, dict[str, Tensor]]:
        """Mean loss and summed counts (``correct``, ``count``) for accuracy."""

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Validation metrics (``val_loss``, ...) with the model in eval mode."""

    def report(self, model: nn.Module, step: int) -> str | None:
        """A human-readable sample (e.g. fills of fixed prompts), or None."""

    def tokens_per_batch(self, batch: Any) -> int:
        """Throughput unit of a batch (tokens or images)."""

    def epoch(self, step: int) -> float:
        """Epochs done at ``step``."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name} asked for CUDA, but no CUDA device is available; use --device cpu")
    return device


def make_optimizer(model: nn.Module, config: TrainConfig, d_model: int):
    """Adam/AdamW and a LambdaLR schedule; biases and norms are exempt from weight decay."""
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=1.0 if config.optimizer == "noam" else config.lr, betas=(0.9, 0.999),
                            foreach=True)
    w = max(config.warmup, 1)
    if config.optimizer == "noam":
        def rate(step: int) -> float:
            t = step + 1
            return config.lr * d_model ** -0.5 * min(t ** -0.5, t * w ** -1.5)
    else:
        def rate(step: int) -> float:
            if step < config.warmup:
                return (step + 1) / w
            progress = (step - config.warmup) / max(config.steps - config.warmup, 1)
            return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, rate)


class NonFiniteLoss(RuntimeError):
    pass


def fit(model: nn.Module, task: Task, config: TrainConfig, out_dir: str | os.PathLike, *, d_model: int,
        run_config: dict, resume: bool = False, save_extra=None, quiet: bool = False) -> dict[str, float]:
    """Train ``model`` on ``task`` for ``config.steps`` steps, writing the run into ``out_dir``.

    ``run_config`` goes to config.json (with ``config`` under "train"); ``save_extra(dir)`` writes
    task files such as the vocabulary. Returns the last validation metrics.
    """
    out = Path(out_dir)
    device = resolve_device(config.device)
    model.to(device)
    opt, sched = make_optimizer(model, config, d_model)
    start = 0
    if resume:
        start = checkpoints.load_trainer_state(out, model, opt, sched)
    else:
        out.mkdir(parents=True, exist_ok=True)
        checkpoints.write_json(out / "config.json", {**run_config, "train": dataclasses.asdict(config)})
        if save_extra:
            save_extra(out)
    log = checkpoints.MetricsLog(out / "metrics.jsonl", truncate_after=start)
    autocast = _autocast(device, config.precision)
    generator = torch.Generator(device=device)
    last_val: dict[str, float] = {}
    bar = tqdm(total=config.steps, initial=start, disable=quiet, dynamic_ncols=True, desc=task.name)
    t0, window_t, window_tokens = time.perf_counter(), time.perf_counter(), 0
    loss_sum, correct, count, n_in_window = 0.0, 0, 0, 0
    model.train()
    for step in range(start, config.steps):
        generator.manual_seed(config.seed * 1_000_003 + step)
        torch.manual_seed(config.seed * 1_000_003 + step)  # dropout
        batch = task.batch(step, generator)
        with autocast:
            loss, counts = task.loss(model, batch, generator)
        if not torch.isfinite(loss):
            bar.close()
            raise NonFiniteLoss(f"the loss became {loss.item()} at step {step + 1}; the last good checkpoint is kept "
                                f"in {out} (try a lower --lr or --grad-clip)")
        loss.backward()
        if config.grad_clip:
            nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        window_tokens += task.tokens_per_batch(batch)
        loss_sum, n_in_window = loss_sum + loss.item(), n_in_window + 1
        correct, count = correct + int(counts["correct"]), count + int(counts["count"])
        done = step + 1
        if done % config.log_every == 0 or done == config.steps:
            now = time.perf_counter()
            row = {"step": done, "epoch": round(task.epoch(done), 4), "loss": loss_sum / n_in_window,
                   "accuracy": correct / max(count, 1), "lr": sched.get_last_lr()[0],
                   "tokens_per_s": window_tokens / (now - window_t), "elapsed_s": now - t0}
            log.write(row)
            bar.set_postfix(loss=f"{row['loss']:.3f}", acc=f"{row['accuracy']:.3f}",
                            tok_s=f"{row['tokens_per_s']:.0f}")
            window_t, window_tokens, loss_sum, correct, count, n_in_window = now, 0, 0.0, 0, 0, 0
        bar.update(1)
        if done % config.eval_every == 0 or done == config.steps:
            last_val = _validate(model, task, done, log, t0, bar)
        if done % config.ckpt_every == 0 or done == config.steps:
            checkpoints.save_trainer_state(out, model, opt, sched, done)
    bar.close()
    return last_val


def _validate(model, task, step, log, t0, bar) -> dict[str, float]:
    model.eval()
    with torch.no_grad():
        metrics = task.evaluate(model)
        sample = task.report(model, step)
    model.train()
    log.write({"step": step, "epoch": round(task.epoch(step), 4), **metrics,
               "elapsed_s": time.perf_counter() - t0})
    summary = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
    bar.write(f"step {step}: {summary}")
    if sample:
        bar.write(sample)
    return metrics


def _autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return torch.autocast(device.type, enabled=False)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    if device.type == "cpu" and precision == "fp16":
        raise ValueError("--precision fp16 needs a CUDA device; on the CPU use bf16 or fp32")
    return torch.autocast(device.type, dtype=dtype)


def is_terminal() -> bool:
    return sys.stdout.isatty()
