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
    def data_name(self) -> str:
        """The data the run trained on, in a few words."""
        data = self.config.get("data") or {}
        return Path(data["text_file"]).name if data.get("text_file") else \
            Path(data["data_dir"]).name if data.get("data_dir") else str(data.get("corpus") or data.get("dataset", "?"))

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


PANELS = {  # metric shown on the second panel, per task: (key of validation rows, key of training rows, label)
    "mlm": ("val_accuracy", "accuracy", "masked-character accuracy"),
    "lm": ("val_bpc", None, "bits per character"),
    "vision": ("val_top1", "accuracy", "top-1 accuracy"),
}


def plot_runs(run_dirs: list[str], output: str | os.PathLike) -> Path:
    """Loss, the task's metric and the learning rate against step, one colour per run; writes a PNG.

    For masked LM runs whose text can be read, a dashed line marks the bag-of-characters baseline:
    always predicting the validation text's most frequent character.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs_ = [Run.load(d) for d in run_dirs]
    fig, (ax_loss, ax_metric, ax_lr) = plt.subplots(1, 3, figsize=(15, 4.2))
    labels, drawn = set(), set()
    for i, run in enumerate(runs_):
        color = f"C{i}"
        task = run.config.get("task", "mlm")
        val_key, train_key, label = PANELS.get(task, PANELS["mlm"])
        labels.add(label)
        steps = [r["step"] for r in run.train]
        ax_loss.plot(steps, [r["loss"] for r in run.train], color=color, alpha=0.35, label=f"{run.label} train")
        ax_loss.plot([r["step"] for r in run.val], [r["val_loss"] for r in run.val], "o-", color=color,
                     label=f"{run.label} validation")
        if train_key:
            ax_metric.plot(steps, [r[train_key] for r in run.train], color=color, alpha=0.35,
                           label=f"{run.label} train")
        ax_metric.plot([r["step"] for r in run.val], [r.get(val_key, float("nan")) for r in run.val], "o-",
                       color=color, label=f"{run.label} validation")
        ax_lr.plot(steps, [r.get("lr", float("nan")) for r in run.train], color=color, label=run.label)
        baseline = frequent_character_baseline(run) if task == "mlm" else None
        if baseline is not None and baseline not in drawn:
            drawn.add(baseline)
            char, share = baseline
            ax_metric.axhline(share, color="grey", linestyle="--", linewidth=1,
                              label=f"always {char!r}: {share:.1%} of the validation text (bag of characters)")
    ax_loss.set(xlabel="step", ylabel="loss (nats)", title="loss")
    ax_metric.set(xlabel="step", ylabel=" / ".join(sorted(labels)), title=" / ".join(sorted(labels)))
    ax_lr.set(xlabel="step", ylabel="learning rate", title="learning rate (the rate each step used)")
    for ax in (ax_loss, ax_metric, ax_lr):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    corpora = sorted({run.data_name for run in runs_})
    fig.suptitle(f"{', '.join(r.label for r in runs_)} — data: {', '.join(corpora)}", fontsize=9)
    fig.tight_layout()
    out = Path(output)
    if out.is_dir():
        raise ValueError(f"-o {str(out)!r} is a directory; give the PNG file to write, e.g. {out / 'curves.png'}")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def frequent_character_baseline(run: Run) -> tuple[str, float] | None:
    """The validation text's most frequent character and its share, or None if the text cannot be read."""
    from collections import Counter

    from .data.text import DataError, load_corpus, read_text_file

    data = run.config.get("data") or {}
    try:
        text = read_text_file(data["text_file"]) if data.get("text_file") else load_corpus(data.get("corpus", ""))
    except (DataError, KeyError, OSError):
        return None
    val = text[int(len(text) * 0.9):]  # the last tenth: the validation split of every text run
    char, count = Counter(val).most_common(1)[0]
    return char, count / len(val)


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

