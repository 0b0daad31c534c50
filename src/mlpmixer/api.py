"""Library entry points behind the command line: train and resume text models, load a run."""

from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from . import checkpoints, runs
from .data.text import DataError, load_corpus, read_text_file
from .data.tokenizer import CharTokenizer
from .data.windows import split_train_val
from .mlm import MaskedLanguageModel, MLMConfig, MLMTask
from .train import TrainConfig, fit, is_terminal, resolve_device


@dataclass(frozen=True)
class TextSource:
    """Where the text comes from: a named corpus or a file."""

    corpus: str = "shakespeare"
    text_file: str | None = None

    def read(self) -> str:
        return read_text_file(self.text_file) if self.text_file else load_corpus(self.corpus)

    def absolute(self) -> "TextSource":
        """The same source with the file's path made absolute, so a run resumes from any directory."""
        return dataclasses.replace(self, text_file=os.path.abspath(self.text_file)) if self.text_file else self

    def describe(self) -> str:
        return repr(self.text_file) if self.text_file else f"corpus {self.corpus!r}"


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


def text_config(task: str, model_fields: dict, text: str):
    """The tokenizer of ``text`` and the model config of ``task`` with ``model_fields`` set."""
    tok = CharTokenizer.from_text(text)
    if task == "lm":  # the causal token MLP is square: its hidden width follows seq_len unless given
        model_fields = {"tokens_mlp_dim": model_fields.get("seq_len", 32), **model_fields}
    return tok, text_tasks()[task].config(vocab_size=tok.vocab_size, **model_fields)


def train_text(task: str, model_fields: dict, train: TrainConfig, source: TextSource, out: str | os.PathLike, *,
               overwrite: bool = False, max_val_windows: int | None = None, quiet: bool = False,
               epochs: float | None = None, tensorboard: bool = False) -> dict[str, float]:
    """Train a character-level model (``task`` "mlm" or "lm"); returns the final validation metrics.

    ``epochs``, when given, replaces ``train.steps`` by the number of steps in that many epochs.
    """
    out = Path(out)
    text = source.read()
    tok, config = text_config(task, model_fields, text)
    if epochs is not None:
        if epochs <= 0:
            raise ValueError(f"--epochs must be positive, got {epochs}")
        per_epoch = len(split_train_val(text)[0]) // (config.seq_len * train.batch_size)
        train = dataclasses.replace(train, steps=max(1, round(epochs * per_epoch)))
    with runs.new_run(out, overwrite):
        return _run(task, config, train, tok, text, out, resume=False, source=source.absolute(),
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


def resume_text(task: str, out: str | os.PathLike, *, changes: dict | None = None, quiet: bool = False,
                tensorboard: bool = False, text_file: str | None = None,
                allow_changed_data: bool = False) -> dict[str, float]:
    """Continue the run in ``out`` from its last checkpoint (optionally to a new step count).

    The text is read from the path saved with the run (absolute), or from ``text_file`` when the data
    moved; either way its fingerprint must match the one saved unless ``allow_changed_data``.
    """
    out = Path(out)
    with runs.open_run(out):
        saved, train = resumed_configs(out, task, changes or {})
        path = out / checkpoints.CONFIG_FILE
        config = runs.build_config(text_tasks()[task].config, saved["model"], path)
        data = saved.get("data") if isinstance(saved.get("data"), dict) else {}
        source = runs.build_config(TextSource, {k: v for k, v in data.items() if k != "fingerprint"}, path, "data")
        if text_file is not None:
            source = TextSource(corpus=source.corpus, text_file=text_file).absolute()
        if not quiet:
            print(f"resuming {out} on {source.describe()}", file=sys.stderr)
        text = source.read()
        runs.check_fingerprint(data.get("fingerprint"), runs.fingerprint_text(text), source.describe(),
                               allow_changed_data)
        tok = load_tokenizer(out, config.vocab_size)
        if source != TextSource(**{k: v for k, v in data.items() if k != "fingerprint"}):
            runs.write_config(out, {**saved, "data": {**dataclasses.asdict(source),
                                                      "fingerprint": runs.fingerprint_text(text)}})
        return _run(task, config, train, tok, text, out, resume=True, source=source,
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
    run_config = {"task": task, "model": dataclasses.asdict(config),
                  "data": {**dataclasses.asdict(source), "fingerprint": runs.fingerprint_text(text)},
                  "max_val_windows": max_val_windows}
    return fit(model, job, train, out, d_model=config.d_model, run_config=run_config, resume=resume,
               save_extra=tok.save, quiet=quiet, tensorboard=tensorboard)


def load(run_dir: str | os.PathLike, device: str = "cpu", task: str = "mlm"):
    """The trained model (eval mode) and its tokenizer from a text run directory (``task`` mlm or lm)."""
    run = Path(run_dir)
    saved = runs.read_run_config(run, task)
    config = runs.build_config(text_tasks()[task].config, saved["model"], run / checkpoints.CONFIG_FILE)
    model = text_tasks()[task].model(config)
    checkpoints.load_weights(model, run / checkpoints.MODEL_FILE)
    return model.to(device).eval(), load_tokenizer(run, config.vocab_size)


def load_tokenizer(run: Path, vocab_size: int) -> CharTokenizer:
    """The run's vocabulary, which must be as large as its model's."""
    tok = CharTokenizer.load(run)
    if tok.vocab_size != vocab_size:
        raise checkpoints.CheckpointError(f"{run / runs.VOCAB_FILE} has {tok.vocab_size} tokens but the model "
                                          f"{vocab_size}; the run's files do not belong together")
    return tok
