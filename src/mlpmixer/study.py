"""MLP mixing vs attention, rerunnable: both token mixers, the same budget, seeds and schedules.

For every schedule (the seed's Noam settings, and AdamW with a lower peak rate and a longer warm-up)
and every seed, a run per mixer; then ``study.md`` (mean ± std of the final validation metric,
parameters, tokens/s, wall time) and ``study.png`` (validation curves, mean with the range over
seeds shaded).
"""

from __future__ import annotations

import os
import statistics
from dataclasses import dataclass
from pathlib import Path

from .api import TextSource, train_text
from .plots import Run
from .train import TrainConfig

MIXERS = ("mlp", "attention")


@dataclass(frozen=True)
class Schedule:
    """An optimiser setting; ``warmup_fraction`` scales the warm-up with the run length."""

    name: str
    optimizer: str
    lr: float
    warmup: int | None = None
    warmup_fraction: float = 0.0
    weight_decay: float = 0.0

    def train_config(self, steps: int, seed: int, batch_size: int) -> TrainConfig:
        warmup = self.warmup if self.warmup is not None else max(1, int(self.warmup_fraction * steps))
        eval_every = max(1, steps // 10)
        return TrainConfig(steps=steps, seed=seed, batch_size=batch_size, optimizer=self.optimizer, lr=self.lr,
                           warmup=warmup, weight_decay=self.weight_decay, eval_every=eval_every,
                           log_every=max(1, steps // 50), ckpt_every=steps)


SCHEDULES = {
    "seed": Schedule("seed", "noam", 1.0, warmup=2000),  # the seed experiment's Noam, factor 1, 2000 warm-up steps
    "adamw": Schedule("adamw", "adamw", 5e-4, warmup_fraction=0.25, weight_decay=0.01),
}
METRIC = {"mlm": ("val_accuracy", "masked-character accuracy", True), "lm": ("val_bpc", "bits per character", False)}


def run_study(task: str, out: str | os.PathLike, *, steps: int, seeds: int, source: TextSource,
              schedules: tuple[str, ...] = ("seed", "adamw"), model_fields: dict | None = None, batch_size: int = 64,
              max_val_windows: int | None = 2000, quiet: bool = True) -> tuple[Path, Path]:
    """Train every (schedule, mixer, seed) run under ``out`` (finished runs are reused) and report."""
    if task not in METRIC:
        raise ValueError(f"unknown study task {task!r}; choose mlm or lm")
    if steps <= 0 or seeds <= 0:
        raise ValueError(f"--steps and --seeds must be positive, got {steps} and {seeds}")
    unknown = [s for s in schedules if s not in SCHEDULES]
    if unknown:
        raise ValueError(f"unknown schedule {unknown[0]!r}; choose from {', '.join(SCHEDULES)}")
    out = Path(out)
    for schedule in schedules:
        for seed in range(seeds):
            for mixer in MIXERS:
                run = out / f"{schedule}-{mixer}-seed{seed}"
                if (run / "trainer_state.pt").exists() and _finished(Run.load(run), steps):
                    continue
                print(f"study: {task} {schedule} {mixer} seed {seed} -> {run}", flush=True)
                train_text(task, {**(model_fields or {}), "token_mixer": mixer},
                           SCHEDULES[schedule].train_config(steps, seed, batch_size), source, run, overwrite=True,
                           max_val_windows=max_val_windows, quiet=quiet)
    return write_report(task, out, schedules, seeds)


def write_report(task: str, out: Path, schedules: tuple[str, ...], seeds: int) -> tuple[Path, Path]:
    key, label, higher = METRIC[task]
    groups = {(s, m): [Run.load(out / f"{s}-{m}-seed{i}") for i in range(seeds)] for s in schedules for m in MIXERS}
    lines = [f"# Study: MLP token mixing vs attention ({task})", "",
             f"Final validation {label} ({'higher' if higher else 'lower'} is better), mean ± std over {seeds} "
             f"seed(s); tokens/s is the median training throughput, wall time the mean per run.", "",
             f"| schedule | mixer | final {key} | best {key} | parameters | tokens/s | wall time |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for (schedule, mixer), runs in groups.items():
        finals = [r.val[-1][key] for r in runs]
        bests = [(max if higher else min)(v[key] for v in r.val) for r in runs]
        rates = [r.tokens_per_s for r in runs]
        walls = [r.wall_s for r in runs]
        lines.append(f"| {schedule} | {mixer} | {_mean_std(finals)} | {_mean_std(bests)} | {runs[0].parameters:,} | "
                     f"{statistics.median(rates):,.0f} | {statistics.mean(walls):.0f} s |")
    md = out / "study.md"
    md.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return md, _plot(groups, key, label, out / "study.png")


def _finished(run: Run, steps: int) -> bool:
    return bool(run.val) and run.val[-1]["step"] == steps


def _mean_std(values: list[float]) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4f} ± {std:.4f}"



def _plot(groups: dict, key: str, label: str, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    schedules = sorted({s for s, _ in groups}, key=list(SCHEDULES).index)
    fig, axes = plt.subplots(1, len(schedules), figsize=(5.5 * len(schedules), 4), squeeze=False)
    for ax, schedule in zip(axes[0], schedules):
        for i, mixer in enumerate(MIXERS):
            runs = groups[(schedule, mixer)]
            steps = [v["step"] for v in runs[0].val]
            values = np.array([[v[key] for v in r.val][: len(steps)] for r in runs])
            ax.plot(steps, values.mean(0), "o-", color=f"C{i}", label=f"{mixer} (mean of {len(runs)})")
            ax.fill_between(steps, values.min(0), values.max(0), color=f"C{i}", alpha=0.2)
        ax.set(title=f"schedule: {schedule}", xlabel="step", ylabel=f"validation {label}")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
