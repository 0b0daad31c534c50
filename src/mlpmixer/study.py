"""Token mixers compared, rerunnable: every mixer, the same budget, seeds and schedules.

For every schedule (the seed's Noam settings, and AdamW with a lower peak rate and a longer warm-up)
and every seed, a run per mixer; then ``study.md`` (mean ± std of the final validation metric,
parameters, tokens/s, wall time) and ``study.png`` (validation curves, mean ± one std over seeds).

Each run (a *cell*) lives in a folder named by a hash of its whole configuration (task, every model
and training setting, the data's fingerprint, the validation size): a finished cell with the same
key is reused, an unfinished one resumed, and any other configuration gets a folder of its own, so
nothing finished is overwritten and no result is reported for a configuration it was not run with.
Several study processes may share one folder (one per core): a cell that another process is training
is left to it, and ``--report-only`` gathers everything at the end.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import statistics
from dataclasses import dataclass
from pathlib import Path

from . import runs
from .text_train import TextSource, resume_text, text_config, train_text
from .checkpoints import atomic_write, write_json
from .encoder import TOKEN_MIXERS
from .errors import UsageError, unknown_choice
from .plots import Run
from .train import TrainConfig

NON_CAUSAL = ("fourier",)
"""Token mixers that cannot be made causal; a study of ``lm`` leaves them out."""
STUDY_MARKER = "study.json"
"""The file that marks a folder as a study mlpmixer made (it then may write study.md and study.png there)."""


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


@dataclass(frozen=True)
class Contender:
    """A token mixer and the model settings it runs with, e.g. ``attention:d_ff=32`` (attention with the
    MLP encoder's parameter count) or ``attention:pos_embedding=rotary+embed_scale=false``."""

    mixer: str
    overrides: tuple[tuple[str, object], ...] = ()

    @classmethod
    def parse(cls, spec: str) -> "Contender":
        mixer, _, rest = spec.partition(":")
        overrides = []
        for item in filter(None, rest.split("+")):
            key, sep, value = item.partition("=")
            if not sep:
                raise UsageError(f"--mixers {spec!r}: {item!r} is not KEY=VALUE (e.g. attention:d_ff=32)")
            overrides.append((key.strip(), _value(value.strip())))
        return cls(mixer.strip(), tuple(overrides))

    @property
    def name(self) -> str:
        return self.mixer + (":" + "+".join(f"{k}={v}" for k, v in self.overrides) if self.overrides else "")

    @property
    def slug(self) -> str:
        return "".join(c if c.isalnum() or c in "._" else "-" for c in self.name.replace(":", "-"))

    def fields(self) -> dict:
        return {**dict(self.overrides), "token_mixer": self.mixer}


def _value(text: str):
    """A command-line value as the config field expects it: bool, int, float or str."""
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


@dataclass(frozen=True)
class Setting:
    """One point of the tuning sweep: an AdamW peak rate, a warm-up fraction and a position option."""

    lr: float
    warmup_fraction: float
    positions: str

    @property
    def name(self) -> str:
        return f"adamw lr {self.lr:g}, warm-up {self.warmup_fraction:g}, positions {self.positions}"

    @property
    def slug(self) -> str:
        return f"lr{self.lr:g}-w{self.warmup_fraction:g}-{self.positions}"

    def schedule(self) -> Schedule:
        return Schedule("tuned", "adamw", self.lr, warmup_fraction=self.warmup_fraction, weight_decay=0.01)


POSITIONS = {  # the position options of the sweep, as model settings (docs/study-attention.md)
    "seed": {},  # sinusoidal, added to √d-scaled token embeddings
    "unscaled": {"embed_scale": False},  # the same sinusoids, no longer drowned by the √d scale
    "learned": {"pos_embedding": "learned", "embed_scale": False},
    "rotary": {"pos_embedding": "rotary"},  # q and k rotated by position: attention only
}


def sweep(contender: Contender, lrs: tuple[float, ...], warmups: tuple[float, ...],
          positions: tuple[str, ...]) -> list[Setting]:
    """The same grid for every mixer: peak rate × warm-up × the position options that apply to it."""
    usable = [p for p in positions if p != "rotary" or contender.mixer == "attention"]
    return [Setting(lr, w, p) for lr in lrs for w in warmups for p in usable]


@dataclass(frozen=True)
class Cell:
    """One run of the study: a schedule, a mixer and a seed, trained in ``path``."""

    schedule: str
    mixer: str
    seed: int
    key: str
    path: Path
    steps: int

    def finished(self) -> bool:
        """Whether the run in ``path`` reached its last validation (``steps``)."""
        return runs.is_run(self.path) and runs.has_model(self.path) and _finished(Run.load(self.path), self.steps)


def mixers_for(task: str, mixers: tuple[str, ...] | None = None) -> tuple[Contender, ...]:
    """The contenders a study of ``task`` compares: every mixer (less the non-causal ones for lm), or
    the ``mixers`` given as specs (``mlp``, ``attention:d_ff=32``, ...)."""
    chosen = [Contender.parse(m) for m in mixers] if mixers else \
        [Contender(m) for m in TOKEN_MIXERS if not (task == "lm" and m in NON_CAUSAL)]
    unknown = [c.mixer for c in chosen if c.mixer not in TOKEN_MIXERS]
    if unknown:
        raise unknown_choice("token mixer", unknown[0], TOKEN_MIXERS)
    return tuple(chosen)


def cell_key(identity: dict) -> str:
    """A short hash of everything that decides a run's result."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:10]


def cell_identity(task: str, model: dict, train: dict, fingerprint: dict, max_val_windows: int | None) -> dict:
    return {"task": task, "model": model, "train": train, "data": fingerprint, "max_val_windows": max_val_windows}


def saved_key(run: Path) -> str | None:
    """The `cell_key` of the run saved in ``run`` (None if its config.json is incomplete)."""
    config = runs.run_config(run)
    try:
        return cell_key(cell_identity(config["task"], config["model"], config["train"],
                                      config["data"]["fingerprint"], config.get("max_val_windows")))
    except (TypeError, KeyError):
        return None


def run_study(task: str, out: str | os.PathLike, *, steps: int, seeds: int, source: TextSource,
              schedules: tuple[str, ...] = ("seed", "adamw"), mixers: tuple[str, ...] | None = None,
              model_fields: dict | None = None, batch_size: int = 64, max_val_windows: int | None = 2000,
              tune_steps: int = 0, tune_lrs: tuple[float, ...] = (1e-3, 3e-3), tune_warmups: tuple[float, ...] = (0.1,),
              tune_positions: tuple[str, ...] = ("seed", "unscaled", "rotary"), quiet: bool = True,
              report_only: bool = False) -> tuple[Path, Path]:
    """Train every (schedule, contender, seed) cell under ``out`` (reusing finished ones) and report.

    The schedule ``tuned`` runs each contender at its own best setting of the same sweep (`sweep`: AdamW
    peak rate × warm-up × position options), each setting trained once for ``tune_steps`` steps with a
    tuning seed (1000) that no compared run uses, and chosen on the validation metric.
    ``report_only`` trains nothing: the report covers the finished runs and names the missing ones.
    """
    if task not in METRIC:
        raise UsageError(f"unknown study task {task!r}; choose mlm or lm")
    if steps <= 0 or seeds <= 0:
        raise UsageError(f"--steps and --seeds must be positive, got {steps} and {seeds}")
    unknown = [s for s in schedules if s not in (*SCHEDULES, "tuned")]
    if unknown:
        raise unknown_choice("schedule", unknown[0], (*SCHEDULES, "tuned"))
    if "tuned" in schedules and tune_steps <= 0:
        raise UsageError("the 'tuned' schedule needs --tune-steps N (the budget of each sweep run)")
    bad = [p for p in tune_positions if p not in POSITIONS]
    if bad:
        raise unknown_choice("position option", bad[0], tuple(POSITIONS))
    contenders = mixers_for(task, mixers)
    out = study_dir(Path(out))
    text = source.read()
    context = _Context(task, text, runs.fingerprint_text(text), source, batch_size, max_val_windows, quiet,
                       model_fields or {}, report_only)
    best: dict[str, tuple[Setting, float]] = {}
    tuning: list[tuple[Contender, Setting, Cell]] = []
    if "tuned" in schedules:
        for contender in contenders:
            for setting in sweep(contender, tune_lrs, tune_warmups, tune_positions):
                cell = context.cell(out / "tuning", setting.slug, contender, setting.schedule(), tune_steps, TUNE_SEED,
                                    POSITIONS[setting.positions])
                tuning.append((contender, setting, cell))
            tried = [(s, c) for k, s, c in tuning if k == contender]
            if all(c.finished() for _, c in tried):
                best[contender.name] = _best(task, tried)
    cells = []
    for schedule in schedules:
        for seed in range(seeds):
            for contender in contenders:
                if schedule == "tuned":
                    if contender.name not in best:  # report_only, its sweep unfinished
                        continue
                    setting = best[contender.name][0]
                    cells.append(context.cell(out, "tuned", contender, setting.schedule(), steps, seed,
                                              POSITIONS[setting.positions]))
                else:
                    cells.append(context.cell(out, schedule, contender, SCHEDULES[schedule], steps, seed))
    return write_report(task, out, cells, seeds, tuning, best)


TUNE_SEED = 1000
"""The seed of every tuning run: no compared run uses it, so the choice is not fitted to their seeds."""


@dataclass(frozen=True)
class _Context:
    task: str
    text: str
    fingerprint: dict
    source: TextSource
    batch_size: int
    max_val_windows: int | None
    quiet: bool
    model_fields: dict
    report_only: bool = False

    def cell(self, folder: Path, schedule_name: str, contender: Contender, schedule: Schedule, steps: int, seed: int,
             extra_fields: dict | None = None) -> "Cell":
        """Train (or reuse, or resume) one run, in a folder named by its whole configuration."""
        fields = {**self.model_fields, **(extra_fields or {}), **contender.fields()}
        train = schedule.train_config(steps, seed, self.batch_size)
        _, config = text_config(self.task, fields, self.text)
        key = cell_key(cell_identity(self.task, dataclasses.asdict(config), dataclasses.asdict(train),
                                     self.fingerprint, self.max_val_windows))
        cell = Cell(schedule_name, contender.name, seed, key,
                    folder / f"{schedule_name}-{contender.slug}-seed{seed}-{key}", steps)
        if not self.report_only:
            folder.mkdir(parents=True, exist_ok=True)
            try:
                train_cell(self.task, cell, fields, train, self.source, self.max_val_windows, self.quiet)
            except runs.RunBusy:  # another study process on the same --out trains it: leave it to that one
                print(f"study: {self.task} {cell.schedule} {cell.mixer} seed {cell.seed}: being trained by another "
                      f"process, left to it", flush=True)
        return cell


def _best(task: str, tried: list[tuple[Setting, Cell]]) -> tuple[Setting, float]:
    key, _, higher = METRIC[task]
    scored = [(s, Run.load(c.path).val[-1][key]) for s, c in tried]
    return (max if higher else min)(scored, key=lambda item: item[1])


def study_dir(out: Path) -> Path:
    """``out`` as a study folder: created with a marker, or recognised by it; never someone else's files."""
    marker = out / STUDY_MARKER
    if out.is_dir() and not marker.exists():
        theirs = [name for name in (STUDY_MARKER, "study.md", "study.png") if (out / name).exists()]
        if theirs:
            raise UsageError(f"{str(out)!r} is not an mlpmixer study folder but holds {', '.join(theirs)}; "
                             f"mlpmixer never replaces files it did not write: choose another --out")
    elif out.exists() and not out.is_dir():
        raise UsageError(f"--out {str(out)!r} is a file, not a directory; choose a directory for the study")
    out.mkdir(parents=True, exist_ok=True)
    if not marker.exists():
        write_json(marker, {"format": "mlpmixer-study", "format_version": 1})
    return out


def train_cell(task: str, cell: Cell, fields: dict, train: TrainConfig, source: TextSource,
               max_val_windows: int | None, quiet: bool) -> None:
    """Reuse the cell's finished run, resume an unfinished one, or train it."""
    path = cell.path
    if runs.is_run(path) and saved_key(path) not in (None, cell.key):
        raise UsageError(f"{path} holds a run of another configuration than its name says; move it away")
    if runs.is_run(path) and runs.has_model(path):
        if _finished(Run.load(path), train.steps):
            return
        print(f"study: {task} {cell.schedule} {cell.mixer} seed {cell.seed}: resuming {path}", flush=True)
        resume_text(task, path, quiet=quiet)
        return
    print(f"study: {task} {cell.schedule} {cell.mixer} seed {cell.seed} -> {path}", flush=True)
    train_text(task, fields, train, source, path, max_val_windows=max_val_windows, quiet=quiet)


def write_report(task: str, out: Path, cells: list[Cell], seeds: int, tuning: list | None = None,
                 best: dict | None = None) -> tuple[Path, Path]:
    """study.md and study.png from the finished ``cells``; unfinished ones are named, not reported."""
    key, label, higher = METRIC[task]
    groups: dict[tuple[str, str], list[Run]] = {}
    missing = [c for c in cells if not c.finished()]
    if len(missing) == len(cells):
        raise UsageError(f"no run of this study has finished yet in {str(out)!r}; nothing to report")
    for cell in cells:
        if cell not in missing:
            groups.setdefault((cell.schedule, cell.mixer), []).append(Run.load(cell.path))
    lines = [f"# Study: token mixers compared ({task})", "",
             f"Final validation {label} ({'higher' if higher else 'lower'} is better), mean ± std over the "
             f"finished seeds of the {seeds} asked for (column seeds); tokens/s is the median training throughput, wall time the mean per run. Each run is in "
             f"`SCHEDULE-MIXER-seedN-KEY/`, KEY a hash of its whole configuration.", "",
             f"| schedule | mixer | seeds | final {key} | best {key} | parameters | tokens/s | wall time |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for (schedule, mixer), group in groups.items():
        finals = [r.val[-1][key] for r in group]
        bests = [(max if higher else min)(v[key] for v in r.val) for r in group]
        rates = [r.tokens_per_s for r in group]
        walls = [r.wall_s for r in group]
        lines.append(f"| {schedule} | {mixer} | {len(group)} | {_mean_std(finals)} | {_mean_std(bests)} | "
                     f"{group[0].parameters:,} | "
                     f"{statistics.median(rates):,.0f} | {statistics.mean(walls):.0f} s |")
    if missing:
        lines += ["", f"Not finished yet, so not in the table ({len(missing)}): " +
                  ", ".join(f"{c.schedule} {c.mixer} seed {c.seed}" for c in missing) + "."]
    if best:
        lines += ["", "Each contender's own best setting (the `tuned` rows), chosen on validation from the same sweep:",
                  "", "| mixer | chosen setting | its sweep result |", "|---|---|---:|"]
        lines += [f"| {name} | {setting.name} | {value:.4f} |" for name, (setting, value) in best.items()]
    if tuning:
        steps = tuning[0][2].steps
        lines += ["", f"The sweep: every setting once, {steps} steps, seed {TUNE_SEED}, final validation {key}:", "",
                  "| mixer | setting | " + key + " |", "|---|---|---:|"]
        lines += [f"| {c.name} | {s.name} | " + (f"{Run.load(cell.path).val[-1][key]:.4f} |" if cell.finished()
                  else "not finished |") for c, s, cell in tuning]
    md = out / "study.md"
    atomic_write(md, lambda tmp: Path(tmp).write_text("\n".join(lines) + "\n", encoding="utf-8"))
    return md, _plot(task, groups, key, label, out / "study.png")


def _finished(run: Run, steps: int) -> bool:
    return bool(run.val) and run.val[-1]["step"] == steps


def _mean_std(values: list[float]) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4f} ± {std:.4f}"


def _plot(task: str, groups: dict, key: str, label: str, path: Path) -> Path:
    """One panel per schedule, one line per mixer: mean over seeds, band ± one std; one shared y range."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    schedules = list(dict.fromkeys(s for s, _ in groups))
    mixers = list(dict.fromkeys(m for _, m in groups))
    fig, axes = plt.subplots(1, len(schedules), figsize=(max(5.5 * len(schedules), 9.5), 4.4), squeeze=False,
                             sharey=True)  # wide enough for the title with one panel
    for ax, schedule in zip(axes[0], schedules):
        for i, mixer in enumerate(mixers):
            if (schedule, mixer) not in groups:  # none of its seeds finished yet
                continue
            group = groups[(schedule, mixer)]
            steps = [v["step"] for v in group[0].val]
            values = np.array([[v[key] for v in r.val][: len(steps)] for r in group])
            mean = values.mean(0)
            std = values.std(0, ddof=1) if len(group) > 1 else np.zeros_like(mean)
            ax.plot(steps, mean, "o-", color=f"C{i}", label=f"{mixer} (mean of {len(group)})")
            ax.fill_between(steps, mean - std, mean + std, color=f"C{i}", alpha=0.2)
        ax.set(title=f"schedule: {schedule}", xlabel="step")
        ax.grid(alpha=0.3)
        ax.legend()
    axes[0][0].set_ylabel(f"validation {label}")
    task_name = {"mlm": "masked language modelling", "lm": "causal language modelling"}[task]
    fig.suptitle(f"Token mixers, {task_name}: validation {label} (band: ± 1 std over seeds)")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    os.replace(tmp, path)
    plt.close(fig)
    return path
