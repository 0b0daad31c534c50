"""One way in from Python for every run: `load` any run (mlm, lm, vision) and `evaluate` it on new data.

    model, tokenizer = mlpmixer.load("runs/mlm")        # text: the model and its CharTokenizer
    model, class_names = mlpmixer.load("runs/vision")   # vision: the model and its class names
    mlpmixer.evaluate("runs/mlm", text_file="other.txt")  # {"val_loss": ..., "val_accuracy": ...}
"""

from __future__ import annotations

import os
from pathlib import Path

from . import pretrained, runs
from .distributed import resolve_device


def load(run_dir: str | os.PathLike, device: str = "cpu", task: str | tuple[str, ...] | None = None):
    """The trained model (eval mode) of a run, with its tokenizer (text) or class names (vision).

    ``run_dir`` may also name a run shipped with the package (``shakespeare-mlm``, ``shakespeare-lm``,
    ``digits``). ``task``, when given, is what the caller needs ("mlm", "lm", "vision" or a tuple of
    them): a run of another task is one clear error.
    """
    run = pretrained.resolve(str(run_dir))
    saved = runs.read_run_config(run, task)
    if saved["task"] == "vision":
        from .vision import MlpMixer

        model = MlpMixer.from_pretrained(run)
        names = saved.get("class_names") or [str(i) for i in range(model.config.num_classes)]
        return model.to(device).eval(), list(names)
    from .text import LanguageModel
    from .text_train import load_tokenizer

    model = LanguageModel.from_pretrained(run)
    return model.to(device).eval(), load_tokenizer(run, model.config.vocab_size)


def evaluate(run_dir: str | os.PathLike, *, text_file: str | os.PathLike | None = None,
             data_dir: str | os.PathLike | None = None, max_val_windows: int | None = None,
             batch_size: int | None = None, device: str = "cpu") -> dict[str, float]:
    """The task's validation metrics of a trained run.

    Without data, on the run's own validation split (the last tenth of its text, or its val/ images),
    which repeats the run's last validation numbers. With ``text_file`` (text runs), on the whole
    file; with ``data_dir`` (vision runs), on ``DIR/val/<class>/*`` or ``DIR/<class>/*``. Text: loss and
    masked-character accuracy (mlm) or bits per character (lm); vision: loss, top-1 and top-5.
    """
    run = pretrained.resolve(str(run_dir))
    saved = runs.read_run_config(run)
    target = resolve_device(device)
    model, extra = load(run, device=str(target))
    if saved["task"] == "vision":
        if text_file is not None:
            raise ValueError(f"{str(run)!r} is a vision run; evaluate it on images with --data-dir")
        return _evaluate_vision(run, saved, model, data_dir, batch_size or 256, target)
    if data_dir is not None:
        raise ValueError(f"{str(run)!r} is a {saved['task']} run; evaluate it on text with --text-file")
    return _evaluate_text(run, saved, model, extra, text_file, max_val_windows, target)


def _evaluate_text(run: Path, saved: dict, model, tok, text_file, max_val_windows, device) -> dict[str, float]:
    from .data.text import read_text_file
    from .data.windows import split_train_val
    from .text_train import TASKS, saved_source
    from .train import evaluate

    config = model.config
    if text_file is None:  # the run's own validation windows, as training measured them
        text = saved_source(run, saved)[0].read()
        limit = max_val_windows if max_val_windows is not None else saved.get("max_val_windows")
    
        val_ids = split_train_val(tok.encode(text))[1]
    else:
        val_ids, limit = tok.encode(read_text_file(text_file)), max_val_windows
    task = TASKS[config.task](None, val_ids, tok, config.seq_len, 1, 0, device, max_val_windows=limit)
    return evaluate(task, model)


def _evaluate_vision(run: Path, saved: dict, model, data_dir, batch_size: int, device) -> dict[str, float]:
    from .data.images import Preprocess, load_split
    from .train import evaluate
    from .vision_train import VisionTask, load_data

    names = saved.get("class_names") or [str(i) for i in range(model.config.num_classes)]
    preprocess = Preprocess(**saved["preprocess"])
    if data_dir is None:  # the run's own validation images
        source = saved.get("data") or {}
        data = load_data(source.get("dataset", "digits"), source.get("data_dir"), model.config.in_chans)
    else:
        data = load_split(data_dir, names, model.config.in_chans, preprocess.crop_pct)
    return evaluate(VisionTask.for_evaluation(data, preprocess, len(names), device, batch_size), model)

