"""Library entry points behind the command line: train and resume text models, load a run."""

from __future__ import annotations

import dataclasses
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from . import __version__, checkpoints
from .data.text import DataError, load_corpus, read_text_file
from .data.tokenizer import VOCAB_FILE, CharTokenizer
from .data.windows import split_train_val
from .errors import RunExistsError
from .mlm import MaskedLanguageModel, MLMConfig, MLMTask
from .train import TrainConfig, fit, is_terminal, resolve_device


@dataclass(frozen=True)
class TextSource:
    """Where the text comes from: a named corpus or a file."""

    corpus: str = "shakespeare"
    text_file: str | None = None

    def read(self) -> str:
        return read_text_file(self.text_file) if self.text_file else load_corpus(self.corpus)


RUN_FILES = (checkpoints.CONFIG_FILE, checkpoints.MODEL_FILE, checkpoints.STATE_FILE, checkpoints.METRICS_FILE,
             VOCAB_FILE, "tensorboard")


def _is_rank0() -> bool:
    return int(os.environ.get("RANK", "0")) == 0  # under torchrun, rank 0 alone looks after the directory


def holds_run(out: Path) -> bool:
    return (out / checkpoints.CONFIG_FILE).exists() or (out / checkpoints.MODEL_FILE).exists()


def check_out_dir(out: Path, overwrite: bool) -> None:
    """Refuse to write into a run unless asked; ``--resume`` is the way to continue one."""
    if holds_run(out) and not overwrite:
        raise RunExistsError(f"{str(out)!r} already holds a run; pass --overwrite to replace it, "
                             f"or --resume {out} to continue it")


@contextmanager
def new_run_dir(out: Path, overwrite: bool) -> Iterator[None]:
    """The body writes a new run into ``out``; nothing is lost and nothing half-made is left.

    A run already in ``out`` is refused without ``overwrite``; with it, it is moved aside and deleted
    only once the new run has saved a model, so a new run that fails before its first checkpoint
    gives the old one back. A new run that fails before saving a model leaves no run files behind,
    so the corrected command needs no ``--overwrite``.
    """
    if not _is_rank0():
        yield
        return
    check_out_dir(out, overwrite)
    existed = out.exists()
    backup = out.with_name(f".{out.name}.replaced") if holds_run(out) else None
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)
        os.replace(out, backup)
    try:
        yield
    except BaseException:
        if not (out / checkpoints.MODEL_FILE).exists():  # nothing worth keeping was saved
            _remove_run_files(out, remove_dir=backup is not None or not existed)
            if backup is not None:
                os.replace(backup, out)
                backup = None
        raise
    finally:
        if backup is not None:
            shutil.rmtree(backup, ignore_errors=True)


def _remove_run_files(out: Path, remove_dir: bool) -> None:
    """Delete what a run writes into ``out`` (and ``out`` itself when the run created it)."""
    if remove_dir:
        shutil.rmtree(out, ignore_errors=True)
        return
    for name in RUN_FILES:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        elif path.exists():
            path.unlink()


@dataclass(frozen=True)
class TextTask:
    """What differs between the text tasks: config class, model class and training task."""

    config: type
    model: type
    task: type


def text_tasks() -> dict[str, TextTask]:
    from .lm import CausalLanguageModel, LMConfig, LMTask

    return {"mlm": TextTask(MLMConfig, MaskedLanguageModel, MLMTask),
            "lm": TextTask(LMConfig, CausalLanguageModel, LMTask)}


def train_text(task: str, model_fields: dict, train: TrainConfig, source: TextSource, out: str | os.PathLike, *,
               overwrite: bool = False, max_val_windows: int | None = None, quiet: bool = False,
               epochs: float | None = None, tensorboard: bool = False) -> dict[str, float]:
    """Train a character-level model (``task`` "mlm" or "lm"); returns the final validation metrics.

    ``epochs``, when given, replaces ``train.steps`` by the number of steps in that many epochs.
    """
    out = Path(out)
    text = source.read()
    tok = CharTokenizer.from_text(text)
    if task == "lm":  # the causal token MLP is square: its hidden width follows seq_len unless given
        model_fields = {"tokens_mlp_dim": model_fields.get("seq_len", 32), **model_fields}
    config = text_tasks()[task].config(vocab_size=tok.vocab_size, **model_fields)
    if epochs is not None:
        if epochs <= 0:
            raise ValueError(f"--epochs must be positive, got {epochs}")
        per_epoch = len(split_train_val(text)[0]) // (config.seq_len * train.batch_size)
        train = dataclasses.replace(train, steps=max(1, round(epochs * per_epoch)))
    with new_run_dir(out, overwrite):
        return _run(task, config, train, tok, text, out, resume=False, source=source,
                    max_val_windows=max_val_windows, quiet=quiet, tensorboard=tensorboard)


def train_mlm(model_fields: dict, train: TrainConfig, source: TextSource, out: str | os.PathLike,
              **options) -> dict[str, float]:
    """Train a character-level masked LM (see `train_text`)."""
    return train_text("mlm", model_fields, train, source, out, **options)


RESUMABLE_CHANGES = ("steps", "eval_every", "log_every", "ckpt_every", "device")


def resumed_configs(out: Path, task: str, changes: dict, train_cls: type = TrainConfig) -> tuple[dict, TrainConfig]:
    """The saved run config and its TrainConfig with the allowed ``changes`` applied.

    Changing anything else (the model's shape, the optimiser, the seed, ...) would not continue the
    same run, so it is one error listing every differing field.
    """
    if not out.is_dir():
        raise checkpoints.CheckpointError(f"run directory {str(out)!r} does not exist; nothing to resume")
    saved = checkpoints.read_json(out / checkpoints.CONFIG_FILE)
    if saved.get("task") != task:
        raise checkpoints.CheckpointError(f"{str(out)!r} is a {saved.get('task')!r} run, not a {task} run")
    if not isinstance(saved.get("model"), dict) or not isinstance(saved.get("train"), dict):
        raise checkpoints.CheckpointError(f"{out / checkpoints.CONFIG_FILE} lacks the model or train settings; "
                                          f"it cannot be resumed")
    current = {**saved["model"], **saved["train"]}
    differing = [f"{k} {current[k]!r} -> {v!r}" for k, v in changes.items()
                 if k not in RESUMABLE_CHANGES and k in current and current[k] != v]
    if differing:
        raise ValueError(f"cannot resume {out} with a different configuration ({'; '.join(differing)}); only "
                         f"{', '.join(RESUMABLE_CHANGES)} may change on resume; start a new run with --out instead")
    try:
        train = train_cls(**{**saved["train"], **{k: v for k, v in changes.items() if k in RESUMABLE_CHANGES}})
    except TypeError as e:  # a field this version does not know
        raise checkpoints.CheckpointError(f"{out / checkpoints.CONFIG_FILE} has training settings this version "
                                          f"cannot read ({e})") from None
    return saved, train


def resume_text(task: str, out: str | os.PathLike, *, changes: dict | None = None, quiet: bool = False,
                tensorboard: bool = False) -> dict[str, float]:
    """Continue the run in ``out`` from its last checkpoint (optionally to a new step count)."""
    out = Path(out)
    saved, train = resumed_configs(out, task, changes or {})
    config = text_tasks()[task].config(**saved["model"])
    source = TextSource(**saved["data"])
    tok = CharTokenizer.load(out)
    return _run(task, config, train, tok, source.read(), out, resume=True, source=source,
                max_val_windows=saved.get("max_val_windows"), quiet=quiet, tensorboard=tensorboard)


def resume_mlm(out: str | os.PathLike, **options) -> dict[str, float]:
    return resume_text("mlm", out, **options)


def _run(task: str, config, train: TrainConfig, tok: CharTokenizer, text: str, out: Path, *, resume: bool,
         source: TextSource, max_val_windows: int | None, quiet: bool, tensorboard: bool = False) -> dict[str, float]:
    ids = tok.encode(text)
    train_ids, val_ids = split_train_val(ids)
    if len(train_ids) < (config.seq_len + 1) * train.batch_size:
        raise DataError(f"the text ({len(text)} characters, {len(train_ids)} for training) is shorter than one batch "
                        f"of {train.batch_size} windows of {config.seq_len}; use a longer text or smaller sizes")
    kind = text_tasks()[task]
    torch.manual_seed(train.seed)
    model = kind.model(config)
    device = resolve_device(train.device)
    options = {"color": is_terminal()} if task == "mlm" else {}
    job = kind.task(train_ids, val_ids, tok, config.seq_len, train.batch_size, train.seed, device,
                    max_val_windows=max_val_windows, **options)
    run_config = {"task": task, "mlpmixer_version": __version__, "model": dataclasses.asdict(config),
                  "data": dataclasses.asdict(source), "max_val_windows": max_val_windows}
    return fit(model, job, train, out, d_model=config.d_model, run_config=run_config, resume=resume,
               save_extra=tok.save, quiet=quiet, tensorboard=tensorboard)


def load(run_dir: str | os.PathLike, device: str = "cpu", task: str = "mlm"):
    """The trained model (eval mode) and its tokenizer from a text run directory (``task`` mlm or lm)."""
    run = Path(run_dir)
    if not run.is_dir():
        raise checkpoints.CheckpointError(f"run directory {str(run)!r} does not exist")
    saved = checkpoints.read_json(run / checkpoints.CONFIG_FILE)
    if saved.get("task") != task:
        raise checkpoints.CheckpointError(f"{str(run)!r} holds a {saved.get('task')!r} run; this needs an {task} run")
    kind = text_tasks()[task]
    try:
        config = kind.config(**saved["model"])
    except (TypeError, ValueError, KeyError) as e:
        raise checkpoints.CheckpointError(f"{run / checkpoints.CONFIG_FILE} has an invalid model config ({e})") from None
    model = kind.model(config)
    checkpoints.load_weights(model, run / checkpoints.MODEL_FILE)
    tok = CharTokenizer.load(run)
    if tok.vocab_size != config.vocab_size:
        raise checkpoints.CheckpointError(f"{run} has a vocabulary of {tok.vocab_size} but a model of {config.vocab_size}")
    return model.to(device).eval(), tok
