"""One training loop for every task: optimiser and schedule, clipping, autocast, torch.compile,
data-parallel ranks (torchrun), gradient accumulation, periodic validation, metrics.jsonl,
TensorBoard, atomic checkpoints, exact resume and Ctrl-C that saves.

A task supplies its batches, its loss and its validation; ``fit`` does the rest. Everything random
in a step (the batch, the masking, dropout) is derived from (seed, step), so a resumed run repeats
an uninterrupted one exactly.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import os
import signal
import statistics
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable, Iterable
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from . import allocator, checkpoints, distributed, kernels, node, optim, runs
from .data.windows import step_seed
from .distributed import resolve_device  # noqa: F401  (re-exported for callers)
from .optim import rescale_gradients  # noqa: F401  (re-exported for callers)

OPTIMIZERS = ("noam", "adamw")
PRECISIONS = ("fp32", "bf16", "fp16")


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """How to train; the defaults are the seed experiment's (Noam, batch 64)."""

    steps: int = 3000
    """Optimiser steps in the whole run."""
    batch_size: int = 64
    """Sequences (or images) per optimiser step, over all ranks: the global batch (torchrun ranks split it)."""
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
    grad_accum: int = 1
    """Split each batch into this many sequential micro-batches (same result, less memory)."""
    compile: bool = False
    """Compile the model with torch.compile."""
    threads: int = 0
    """CPU threads for PyTorch's intra-op work; 0: chosen at the start (see choose_threads) and printed."""

    def __post_init__(self) -> None:
        check_numbers(self)
        for name in ("steps", "batch_size", "eval_every", "log_every", "ckpt_every", "grad_accum"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("warmup", "grad_clip", "weight_decay"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.threads < 0:
            raise ValueError(f"threads must be >= 0 (0 = automatic), got {self.threads}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"unknown precision {self.precision!r}; choose one of {', '.join(PRECISIONS)}")


def check_numbers(config) -> None:
    """Every int and float field of a config dataclass is a finite number of its declared type.

    ``nan <= 0`` is False, so range checks alone let NaN through; this refuses NaN and ±inf first.
    """
    for f in dataclasses.fields(config):
        value, kind = getattr(config, f.name), type(f.default)
        if kind is float and not (isinstance(value, (int, float)) and not isinstance(value, bool)
                                  and math.isfinite(value)):
            raise ValueError(f"{f.name} must be a finite number, got {value!r}")
        if kind is int and (not isinstance(value, int) or isinstance(value, bool)):
            raise ValueError(f"{f.name} must be an integer, got {value!r}")


class Task(Protocol):
    """Exactly what `fit` calls on a task (`text_train.MLMTask`, `text_train.LMTask`, `vision_train.VisionTask`)."""

    name: str
    """The task's name: mlm, lm, vision."""
    best_metric: tuple[str, bool]
    """The validation metric that picks ``model_best.safetensors``, and whether higher is better."""

    def batch(self, step: int, generator: torch.Generator) -> Any:
        """The whole global training batch of ``step`` (each rank then takes its shard)."""

    def loss(self, model: nn.Module, batch: Any, generator: torch.Generator) -> tuple[Tensor, dict[str, Tensor]]:
        """Mean loss and summed counts (``correct``, ``count``) for accuracy."""

    def evaluate_sums(self, model: nn.Module, rank: int, world: int) -> dict[str, float]:
        """Validation sums (``loss``·count, ``correct``, ``count``, ...) over this rank's share (`shard_sums`)."""

    def summarise(self, sums: dict[str, float]) -> dict[str, float]:
        """Validation metrics (``val_loss``, ...) from the sums of every rank."""

    def report(self, model: nn.Module, step: int) -> str | None:
        """A human-readable sample (e.g. fills of fixed prompts), or None."""

    def tokens_per_batch(self, batch: Any) -> int:
        """Throughput unit of a batch (tokens or images)."""

    def epoch(self, step: int) -> float:
        """Epochs done at ``step``."""

    def describe(self) -> str:
        """The data in a few words, for the start-of-run summary."""


def evaluate(task: Task, model: nn.Module) -> dict[str, float]:
    """Validation metrics of ``model`` in one process (eval mode, no gradients)."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        metrics = task.summarise(task.evaluate_sums(model, 0, 1))
    model.train(was_training)
    return metrics


def shard_sums(batches: Iterable, rank: int, world: int, measure: Callable[[int, Any], tuple]) -> dict[str, float]:
    """Validation sums over this rank's share of ``batches`` (every ``world``-th from ``rank``).

    ``measure(i, batch)`` returns (mean loss, correct, count[, correct_top5]); the sums are loss·count
    and the counts, which `distributed.all_reduce_sum` then adds over the ranks.
    """
    names = ("correct", "count", "correct5")
    sums = {"loss": 0.0, "correct": 0.0, "count": 0.0}
    for i, batch in enumerate(batches):
        if i % world == rank:
            loss, *counts = measure(i, batch)
            sums["loss"] += float(loss.detach() if isinstance(loss, Tensor) else loss) * int(counts[1])
            for name, value in zip(names, counts):
                sums[name] = sums.get(name, 0.0) + int(value)
    return sums


def steps_for_epochs(config: TrainConfig, epochs: float, per_epoch: int) -> TrainConfig:
    """``config`` with ``steps`` set to ``epochs`` epochs of ``per_epoch`` steps (at least one)."""
    if not math.isfinite(epochs) or epochs <= 0:
        raise ValueError(f"--epochs must be a positive number, got {epochs}")
    return dataclasses.replace(config, steps=max(1, round(epochs * max(per_epoch, 1))))


RESUMABLE_CHANGES = ("steps", "eval_every", "log_every", "ckpt_every", "device", "threads")


def resumed_configs(out: Path, task: str, changes: dict, train_cls: type = TrainConfig) -> tuple[dict, TrainConfig]:
    """The saved run config and its TrainConfig with the allowed ``changes`` applied.

    Changing anything else (the model's shape, the optimiser, the seed, ...) would not continue the
    same run, so it is one error listing every differing field.
    """
    saved = runs.read_run_config(out, task)
    if "train" not in saved:
        raise checkpoints.CheckpointError(f"{out / checkpoints.CONFIG_FILE} lacks the model or train settings; "
                                          f"it cannot be resumed")
    current = {**saved["model"], **saved["train"]}
    differing = [f"{k} {current[k]!r} -> {v!r}" for k, v in changes.items()
                 if k not in RESUMABLE_CHANGES and k in current and current[k] != v]
    if differing:
        raise ValueError(f"cannot resume {out} with a different configuration ({'; '.join(differing)}); only "
                         f"{', '.join(RESUMABLE_CHANGES)} may change on resume; start a new run with --out instead")
    allowed = {k: v for k, v in changes.items() if k in RESUMABLE_CHANGES}
    train = runs.build_config(train_cls, {**saved["train"], **allowed}, out / checkpoints.CONFIG_FILE, "training")
    return saved, train


def adamw(groups: list[dict], lr: float) -> optim.AdamW:
    """`optim.AdamW` (torch's AdamW, its step taking the gradient scaling and clipping) with torch's fused
    kernel (one pass per parameter tensor) where the parameters' device has it, else the multi-tensor
    (foreach) form. The same update; fused measured 1.7 ms faster per MLM seed step (bf16, 2 threads:
    43.7 -> 42.0 ms) and it makes no model-sized temporaries (docs/benchmarks.md)."""
    try:
        return optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), fused=True)
    except (RuntimeError, TypeError):  # a device (or a torch) without the fused kernel
        return optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), foreach=True)


def make_optimizer(model: nn.Module, config: TrainConfig, d_model: int):
    """Adam/AdamW and a LambdaLR schedule; biases and norms are exempt from weight decay."""
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    opt = adamw(groups, lr=1.0 if config.optimizer == "noam" else config.lr)
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
    """The loss or the weights became NaN, infinite or exploded; the last good checkpoint is kept."""


EXPLODED = 1e6
"""A weight larger than this in magnitude means the run diverged (healthy weights here are O(1))."""


class Stopped(KeyboardInterrupt):
    """The run was stopped by a signal (SIGINT: Ctrl-C, SIGTERM: schedulers, ``timeout``, ``docker stop``)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)

_deferred_stops: list[int] = []  # stop signals that arrived inside a __del__, not yet raised


def raise_stop(signum: int, frame) -> None:
    """From a signal handler: raise `Stopped` for ``signum``. A signal that interrupted a ``__del__``
    (garbage collection can run one anywhere) is kept instead: Python prints an exception raised there
    as "Exception ignored", traceback and all, and drops it, so the signal would be lost. The next
    `raise_deferred_stop` raises it."""
    f = frame
    while f is not None:
        if f.f_code.co_name == "__del__":
            _deferred_stops.append(signum)
            return
        f = f.f_back
    raise Stopped(signum)


def raise_deferred_stop() -> None:
    """Raise `Stopped` for a stop signal `raise_stop` kept, if there is one."""
    if _deferred_stops:
        signum = _deferred_stops[0]
        _deferred_stops.clear()
        raise Stopped(signum)


class _StopFlag:
    """SIGINT or SIGTERM sets a flag that the loop reads between steps, so a checkpoint is never half a step."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def __enter__(self) -> "_StopFlag":
        raise_deferred_stop()  # a signal during the set-up, kept by `raise_stop`: stop before training
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in STOP_SIGNALS}
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:  # a second signal: stop at once
            raise_stop(signum, frame)
        self.signum = signum

    def __exit__(self, *exc) -> None:
        for s, previous in self._previous.items():
            signal.signal(s, previous)


def fit(model: nn.Module, task: Task, config: TrainConfig, out_dir: str | os.PathLike, *, d_model: int,
        run_config: dict, resume: bool = False, save_extra=None, quiet: bool = False,
        tensorboard: bool = False) -> dict[str, float]:
    """Train ``model`` on ``task`` for ``config.steps`` steps, writing the run into ``out_dir``.

    Under torchrun every rank calls this; rank 0 alone prints, logs and checkpoints. ``run_config``
    goes to config.json (with ``config`` under "train"); ``save_extra(dir)`` writes task files such
    as the vocabulary. Returns the last validation metrics.
    """
    ctx = distributed.setup(config.device)
    if config.batch_size % (ctx.world * config.grad_accum):
        raise ValueError(f"--batch-size {config.batch_size} is not divisible by world size {ctx.world} x "
                         f"--grad-accum {config.grad_accum}; choose a multiple of {ctx.world * config.grad_accum}")
    out = Path(out_dir)
    threads, why = choose_threads(config.threads, model, ctx)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _fit(model, task, config, out, ctx, d_model=d_model, run_config=run_config, resume=resume,
                    save_extra=save_extra, quiet=quiet, tensorboard=tensorboard, threads=(threads, why))
    finally:
        torch.set_num_threads(previous_threads)


def choose_threads(requested: int, model: nn.Module, ctx: distributed.Dist) -> tuple[int, str]:
    """The intra-op thread count and why: as requested (``--threads``, or ``OMP_NUM_THREADS`` in the
    environment); one share of the cores per rank under torchrun on the CPU; else the cores that other
    processes leave idle now. Measured in docs/benchmarks.md: on an idle 2-core machine two threads are
    as fast or faster, but with one core busy two threads are 2.5-3x slower than one, because every
    parallel region waits for the thread that shares its core."""
    cores = os.cpu_count() or 1
    if requested:
        return requested, "--threads"
    if os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads(), "OMP_NUM_THREADS"
    if ctx.device.type != "cpu":
        return torch.get_num_threads(), "CUDA run"
    if ctx.world > 1:
        return max(1, cores // ctx.world), f"{cores} cores shared by {ctx.world} ranks"
    busy = busy_cores()
    idle = max(1, min(cores, cores - int(busy + 0.3)))  # a core counts as taken when > 70 % busy
    return idle, f"{cores} cores, {busy:.1f} busy with other work"


def time_step(model: nn.Module, task: Task, config: TrainConfig, d_model: int, out: Path,
              steps: int = 6) -> tuple[float, float]:
    """Seconds per training step (median of ``steps`` after one warm-up step) and for one validation
    pass, measured on a copy of ``model`` with the step `fit` runs (`_Loop.train_step`) and the thread
    count it will use: what ``--budget`` fits the epochs to. ``out`` is the run folder to come (named
    if the probe's loss is not finite). The model, the task's order and the global random state are
    left as they were."""
    ctx = distributed.Dist(device=resolve_device(config.device))
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("--budget fits one process's speed; under torchrun give --epochs or --steps instead")
    threads, _ = choose_threads(config.threads, model, ctx)
    previous, rng = torch.get_num_threads(), torch.get_rng_state()
    torch.set_num_threads(threads)
    try:
        probe = copy.deepcopy(model).to(ctx.device).train()
        loop = _Loop(probe, task, config, ctx, *make_optimizer(probe, config, d_model), out, quiet=True,
                     tensorboard=False)
        generator = torch.Generator(ctx.device).manual_seed(config.seed)
        times = []
        for step in range(steps + 1):
            start = time.perf_counter()
            loop.train_step(task.batch(step, generator), generator, step)
            times.append(time.perf_counter() - start)
        start = time.perf_counter()
        probe.eval()
        with torch.no_grad(), loop.autocast:  # as `_Loop.validate`
            task.evaluate_sums(probe)
        return statistics.median(times[1:]), time.perf_counter() - start
    finally:
        torch.set_num_threads(previous)
        torch.set_rng_state(rng)


def busy_cores(interval: float = 0.25) -> float:
    """How many cores other processes keep busy now: from /proc/stat over ``interval`` seconds (Linux),
    else the 1-minute load average."""
    def times() -> tuple[int, int] | None:
        try:
            with open("/proc/stat") as f:
                fields = [int(x) for x in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        return sum(fields), idle

    first, own, start = times(), time.process_time(), time.perf_counter()
    if first is None:
        return os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    time.sleep(interval)
    second = times()
    total, idle = second[0] - first[0], second[1] - first[1]
    if total <= 0:
        return 0.0
    # less this process's own threads (OpenMP workers spin for a while after each parallel region)
    mine = (time.process_time() - own) / (time.perf_counter() - start)
    return max(0.0, (os.cpu_count() or 1) * (1.0 - idle / total) - mine)


def _fit(model: nn.Module, task: Task, config: TrainConfig, out: Path, ctx: distributed.Dist, *, d_model: int,
         run_config: dict, resume: bool, save_extra, quiet: bool, tensorboard: bool,
         threads: tuple[int, str]) -> dict[str, float]:
    model.to(ctx.device)
    opt, sched = make_optimizer(model, config, d_model)
    log_sums: dict[str, float] = {}
    start = checkpoints.load_trainer_state(out, model, opt, sched, log_sums) if resume else 0
    if resume and ctx.is_main and checkpoints.checkpoint_step(out) != start:
        checkpoints.save_weights(model, out / checkpoints.MODEL_FILE, step=start)  # repair a missing or cut model file
    loop = _Loop(model, task, config, ctx, opt, sched, out, quiet, tensorboard, log_sums)  # validates before any write
    environment = {**runs.environment(ctx.device, threads[0], ctx.world), "malloc": allocator.keep_freed_memory(),
                   "dropout": kernels.status(),
                   "residual_node": node.status() if ctx.device.type == "cpu" else f"not used on {ctx.device.type}"}
    if ctx.is_main:
        if not resume:
            out.mkdir(parents=True, exist_ok=True)
            runs.write_config(out, {**run_config, "train": dataclasses.asdict(config), "environment": environment})
            if save_extra:
                save_extra(out)
        print(summary(model, task, config, out, environment, threads[1], start, resume), file=sys.stderr)
        if config.warmup >= config.steps and not resume:
            print(f"mlpmixer: warning: --warmup {config.warmup} is not shorter than the run (--steps "
                  f"{config.steps}): the learning rate never leaves warm-up; use e.g. --warmup "
                  f"{max(1, config.steps // 10)}", file=sys.stderr)
    try:
        with _StopFlag() as stop:
            result = loop.run(start, stop)
    except BaseException:
        loop.close(completed=False)
        raise
    loop.close(completed=True)
    return result


def summary(model: nn.Module, task: Task, config: TrainConfig, out: Path, environment: dict, why: str, start: int,
            resume: bool) -> str:
    """The start-of-run lines: what is trained, on what, where, how long."""
    parameters = sum(p.numel() for p in model.parameters())
    epochs = task.epoch(config.steps)
    return "\n".join([
        f"{'resuming' if resume else 'training'} {task.name}: {parameters:,} parameters, {task.describe()}",
        f"  steps {start:,} -> {config.steps:,} ({epochs:.2f} epochs), batch {config.batch_size} (global), "
        f"{config.optimizer} lr {config.lr:g}, warm-up {config.warmup}",
        f"  device {environment['device']}, {environment['threads']} thread(s) ({why}), world size "
        f"{environment['world_size']}, precision {config.precision}",
        f"  {environment['malloc']}; CPU kernels (dropout masks, bf16 GELU, LayerNorm): {environment['dropout']}; "
        f"residual node: {environment['residual_node']}",
        f"  run folder {out}"])


class _Loop:
    """The state of one training run; `run` reads top to bottom like a plain training loop."""

    def __init__(self, model, task, config: TrainConfig, ctx: distributed.Dist, opt, sched, out: Path,
                 quiet: bool, tensorboard: bool, log_sums: dict[str, float] | None = None):
        self.model, self.task, self.config, self.ctx, self.opt, self.sched, self.out = \
            model, task, config, ctx, opt, sched, out
        self.log_sums = log_sums or {}  # the metrics the resumed checkpoint had summed since its last row
        self.parameters = list(model.parameters())  # listed once: walking the modules every step costs 0.2 ms
        self.train_model = torch.compile(model) if config.compile else model
        if ctx.enabled:
            ids = [ctx.device.index] if ctx.device.type == "cuda" else None
            self.train_model = nn.parallel.DistributedDataParallel(self.train_model, device_ids=ids)
        self.autocast = _autocast(ctx.device, config.precision)
        self.scaler = torch.amp.GradScaler("cuda", enabled=config.precision == "fp16")
        self.quiet = quiet or not ctx.is_main
        self.writer = _tensorboard_writer(out) if tensorboard and ctx.is_main else None
        self.log, self.bar, self.lr, self.rate = None, None, 0.0, ""

    def run(self, start: int, stop: _StopFlag) -> dict[str, float]:
        config, ctx, task = self.config, self.ctx, self.task
        if ctx.is_main:
            self.log = runs.MetricsLog(self.out / checkpoints.METRICS_FILE, truncate_after=start)
        generator = torch.Generator(device=ctx.device)
        self.bar = tqdm(total=config.steps, initial=start, disable=self.quiet, dynamic_ncols=True, desc=self.desc(start))
        self.best = runs.best_metric(self.out) if ctx.is_main else None
        running = None
        self.t0 = time.perf_counter()
        self.window = window = _TrainingSums(self.t0, self.log_sums)
        last_val: dict[str, float] = {}
        self.model.train()
        for step in range(start, config.steps):
            generator.manual_seed(step_seed(config.seed, step))
            torch.manual_seed(step_seed(config.seed, step) + 7919 * ctx.rank)  # dropout: one stream per rank
            batch = task.batch(step, generator)
            totals = self.train_step(batch, generator, step)
            window.add(totals, task.tokens_per_batch(batch))
            done = step + 1
            loss = totals["loss"] / max(totals["count"], 1.0)
            running = loss if running is None else 0.95 * running + 0.05 * loss  # the bar's running mean
            if done % config.log_every == 0 or done == config.steps:
                self.write(window.row(done, task.epoch(done), self.lr, self.t0))
            if not self.quiet:
                self.bar.set_postfix_str(f"loss {running:.3f}{self.rate}", refresh=False)
                self.bar.set_description_str(self.desc(done), refresh=False)
            self.bar.update(1)
            if done % config.eval_every == 0 or done == config.steps:
                last_val = self.validate(done)
            if done % config.ckpt_every == 0 or done == config.steps or stop.requested:
                self.checkpoint(done)
            if stop.requested:
                if ctx.is_main:
                    print(f"\nstopped by {signal.Signals(stop.signum).name} at step {done}; checkpoint saved. "
                          f"Resume with: mlpmixer train {task.name} --resume {self.out}", file=sys.stderr)
                raise Stopped(stop.signum)
        return last_val

    def train_step(self, batch, generator: torch.Generator, step: int) -> dict[str, float]:
        """Forward and backward over this rank's micro-batches, then one optimiser step."""
        config, ctx = self.config, self.ctx
        parts = ctx.world * config.grad_accum
        sums = {"loss": 0.0, "correct": 0.0, "count": 0.0}
        for i in range(config.grad_accum):
            micro = distributed.shard(batch, ctx.rank * config.grad_accum + i, parts)
            last = i == config.grad_accum - 1
            with (contextlib.nullcontext() if last or not ctx.enabled else self.train_model.no_sync()):
                with self.autocast:
                    loss, counts = self.task.loss(self.train_model, micro, generator)
                n = float(counts["count"])
                self.scaler.scale(loss * n).backward()  # the micro-batch's summed loss
            sums["loss"] += loss.item() * n
            sums["correct"] += float(counts["correct"])
            sums["count"] += n
        totals = distributed.all_reduce_sum(sums, ctx)
        if not math.isfinite(totals["loss"]):
            previous = checkpoints.checkpoint_step(self.out)
            kept = (f"the last good checkpoint (step {previous}) is kept in {self.out}" if previous is not None
                    else "no checkpoint had been saved yet")
            raise NonFiniteLoss(f"the loss became {totals['loss']} at step {step + 1}; {kept} "
                                f"(try a lower --lr, or --grad-clip)")
        self.scaler.unscale_(self.opt)
        self.lr = self.sched.get_last_lr()[0]  # the rate this step uses
        # DDP averaged the ranks' summed gradients: world / count makes them the mean over the global batch
        self.scaler.step(self.opt, grad_multiplier=ctx.world / max(totals["count"], 1.0), max_norm=config.grad_clip)
        self.scaler.update()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        return totals

    def desc(self, step: int) -> str:
        """``mlm`` for the text tasks; ``vision epoch 3/30`` where an epoch is the unit users count in."""
        if self.task.name != "vision":
            return self.task.name
        return f"vision epoch {min(int(self.task.epoch(step)) + 1, math.ceil(self.task.epoch(self.config.steps)))}" \
               f"/{math.ceil(self.task.epoch(self.config.steps))}"

    def validate(self, step: int) -> dict[str, float]:
        task, ctx = self.task, self.ctx
        if not self.quiet:
            self.bar.set_description_str(f"{task.name} validating")
        self.model.eval()
        with torch.no_grad(), self.autocast:  # each rank a shard of the validation set, summed
            metrics = task.summarise(distributed.all_reduce_sum(task.evaluate_sums(self.model, ctx.rank, ctx.world), ctx))
            sample = task.report(self.model, step) if ctx.is_main else None
        self.model.train()
        self.write({"step": step, "epoch": round(task.epoch(step), 4), **metrics,
                    "elapsed_s": time.perf_counter() - self.t0})
        if ctx.is_main:
            where = f"epoch {task.epoch(step):.0f}" if task.name == "vision" else f"step {step}"
            self.bar.write(f"{where}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
            if sample:
                self.bar.write(sample)
            self.keep_best(step, metrics)
        if not self.quiet:
            self.bar.set_description_str(self.desc(step))
        return metrics

    def keep_best(self, step: int, metrics: dict[str, float]) -> None:
        """Save ``model_best.safetensors`` when the task's validation metric improves."""
        key, higher = self.task.best_metric
        value = metrics.get(key)
        if value is None or not math.isfinite(value):
            return
        if self.best is None or (value > self.best if higher else value < self.best):
            self.check_weights(step)
            checkpoints.save_weights(self.model, self.out / runs.BEST_MODEL_FILE, step=step,
                                     extra={"metric": key, "value": repr(value)})
            self.best = value

    def write(self, row: dict) -> None:
        if not self.ctx.is_main:
            return
        self.log.write(row)
        if "loss" in row:
            unit = "img" if self.task.name == "vision" else "tok"
            self.rate = f", acc {row['accuracy']:.3f}, {row['tokens_per_s']:,.0f} {unit}/s"
        if self.writer is not None:
            for key, value in row.items():
                if key not in ("step", "epoch"):
                    self.writer.add_scalar(key, value, row["step"])

    def checkpoint(self, step: int) -> None:
        self.check_weights(step)  # every rank: the weights are the same on all of them
        if self.ctx.is_main:
            checkpoints.save_trainer_state(self.out, self.model, self.opt, self.sched, step, self.window.sums())

    def check_weights(self, step: int) -> None:
        """Refuse to checkpoint non-finite or exploded weights: the kept checkpoint stays the last good one."""
        with torch.no_grad():
            largest = max(float(p.detach().abs().max()) for p in self.parameters if p.numel())
        if not math.isfinite(largest) or largest > EXPLODED:
            previous = checkpoints.checkpoint_step(self.out)
            kept = (f"the last good checkpoint (step {previous}) is kept in {self.out}" if previous is not None
                    else "no checkpoint had been saved yet")
            raise NonFiniteLoss(f"the weights {'became non-finite' if not math.isfinite(largest) else 'exploded'} "
                                f"by step {step} (largest |w| {largest:.3g}); {kept} (try a lower --lr, or "
                                f"--grad-clip)")

    def close(self, completed: bool) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
        self.train_model = None  # DDP's reducer goes before the process group it holds
        distributed.teardown(self.ctx, completed)


class _TrainingSums:
    """Sums between two training rows of metrics.jsonl (``saved``: those a checkpoint held, on resume;
    not the token count, whose rate is measured from the resumed process's start)."""

    FIELDS = ("loss", "correct", "count")

    def __init__(self, t: float, saved: dict[str, float] | None = None):
        self.t, self.tokens, self.loss, self.correct, self.count = t, 0, 0.0, 0.0, 0.0
        for name, value in (saved or {}).items():
            if name in self.FIELDS:
                setattr(self, name, value)

    def sums(self) -> dict[str, float]:
        """What a checkpoint keeps, so that the resumed run's next row sums the same steps."""
        return {name: float(getattr(self, name)) for name in self.FIELDS}

    def add(self, totals: dict[str, float], tokens: int) -> None:
        self.tokens += tokens
        self.loss += totals["loss"]
        self.correct += totals["correct"]
        self.count += totals["count"]

    def row(self, step: int, epoch: float, lr: float, t0: float) -> dict:
        now = time.perf_counter()
        row = {"step": step, "epoch": round(epoch, 4), "loss": self.loss / max(self.count, 1.0),
               "accuracy": self.correct / max(self.count, 1.0), "lr": lr,
               "tokens_per_s": self.tokens / max(now - self.t, 1e-9), "elapsed_s": now - t0}
        self.__init__(now)
        return row


def _autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return torch.autocast(device.type, enabled=False)
    if device.type == "cpu" and precision == "fp16":
        raise ValueError("--precision fp16 needs a CUDA device; on the CPU use bf16 or fp32")
    if device.type == "cuda" and precision == "bf16" and not torch.cuda.is_bf16_supported():
        raise ValueError("this GPU does not support bf16; use --precision fp16 or fp32")
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def _tensorboard_writer(out: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ValueError("--tensorboard needs the tensorboard package: pip install 'mlpmixer[tensorboard]'") from None
    return SummaryWriter(str(out / "tensorboard"))


def is_terminal() -> bool:
    return sys.stdout.isatty()
