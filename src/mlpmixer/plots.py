"""Curves and tables from run directories' metrics.jsonl (matplotlib, headless)."""

from __future__ import annotations

import math
import os
import statistics
from dataclasses import dataclass
from pathlib import Path

from . import checkpoints, runs


@dataclass(frozen=True)
class Run:
    """One run directory's config and metrics, split into training and validation rows."""

    path: Path
    config: dict
    train: list[dict]
    val: list[dict]

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Run":
        p = Path(path)
        config = runs.read_run_config(p)
        metrics = p / checkpoints.METRICS_FILE
        if not metrics.exists():
            raise checkpoints.CheckpointError(f"no {checkpoints.METRICS_FILE} in {str(p)!r}; has the run started?")
        rows = runs.read_metrics(metrics)
        return cls(p, config, [r for r in rows if "loss" in r], [r for r in rows if any(k.startswith("val_") for k in r)])

    @property
    def label(self) -> str:
        mixer = self.config.get("model", {}).get("token_mixer")
        return f"{self.path.name} ({mixer})" if mixer else self.path.name

    @property
    def parameters(self) -> int:
        """Parameter count of the saved model (0 before the first checkpoint)."""
        from safetensors import SafetensorError, safe_open

        weights = self.path / checkpoints.MODEL_FILE
        if not weights.exists():
            return 0
        try:
            with safe_open(str(weights), "pt") as f:
                return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
        except (SafetensorError, OSError, ValueError) as e:
            raise checkpoints.CheckpointError(f"{weights} is not a readable safetensors file ({e}); it may be "
                                              f"truncated") from None

    @property
    def tokens_per_s(self) -> float:
        """Median training throughput over the logged rows."""
        return statistics.median(r["tokens_per_s"] for r in self.train) if self.train else float("nan")

    @property
    def wall_s(self) -> float:
        return max((r.get("elapsed_s", 0.0) for r in self.train + self.val), default=0.0)

    @property
    def accuracy_key(self) -> str:
        return next((k for k in ("val_accuracy", "val_top1") if self.val and k in self.val[-1]), "val_accuracy")


def plot_runs(run_dirs: list[str], output: str | os.PathLike) -> Path:
    """Training/validation loss and accuracy against step, one colour per run; writes a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [Run.load(d) for d in run_dirs]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, run in enumerate(runs):
        color = f"C{i}"
        ax_loss.plot([r["step"] for r in run.train], [r["loss"] for r in run.train], color=color, alpha=0.35,
                     label=f"{run.label} train")
        ax_acc.plot([r["step"] for r in run.train], [r["accuracy"] for r in run.train], color=color, alpha=0.35,
                    label=f"{run.label} train")
        ax_loss.plot([r["step"] for r in run.val], [r["val_loss"] for r in run.val], "o-", color=color,
                     label=f"{run.label} validation")
        key = run.accuracy_key
        ax_acc.plot([r["step"] for r in run.val], [r.get(key, float("nan")) for r in run.val], "o-", color=color,
                    label=f"{run.label} validation")
    ax_loss.set(xlabel="step", ylabel="loss (nats)", title="loss")
    ax_acc.set(xlabel="step", ylabel="accuracy", title="accuracy (masked tokens / top-1)")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def compare_runs(run_dirs: list[str]) -> str:
    """A Markdown table: final and best validation metrics, parameters, throughput, wall time."""
    lines = ["| run | mixer | steps | final val loss | final val acc | best val acc | parameters | tokens/s | wall time |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for d in run_dirs:
        run = Run.load(d)
        key = run.accuracy_key
        final = run.val[-1] if run.val else {}
        best = max((r.get(key, 0.0) for r in run.val), default=float("nan"))
        lines.append(f"| {run.path.name} | {run.config.get('model', {}).get('token_mixer', '-')} | "
                     f"{final.get('step', '-')} | {final.get('val_loss', float('nan')):.4f} | "
                     f"{final.get(key, float('nan')):.4f} | {best:.4f} | {run.parameters:,} | {run.tokens_per_s:,.0f} | "
                     f"{run.wall_s:.0f} s |")
    return "\n".join(lines)

