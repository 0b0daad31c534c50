"""Ready runs shipped inside the package, so that ``mlpmixer demo``, ``fill``, ``generate`` and
``predict`` answer seconds after install.

Each is an ordinary run directory (``config.json``, ``model.safetensors``, ``vocab.json`` for text,
``metrics.jsonl``) under ``mlpmixer/pretrained/<name>/``, made by the ``mlpmixer train`` command
recorded in docs/demo.md; no optimiser state ships. Loading them is the public API's loading:
``mlpmixer.load(resolve("shakespeare-mlm"))``.
"""

from __future__ import annotations

import os
from pathlib import Path

from . import runs
from .errors import UsageError, did_you_mean

HOME = Path(__file__).with_name("pretrained")
"""The folder that holds the shipped runs (package data)."""

SHIPPED = {
    "shakespeare-mlm": ("mlm", "masked character model on the embedded Shakespeare (fill blanks)"),
    "shakespeare-lm": ("lm", "causal character model on the embedded Shakespeare (generate text)"),
    "digits": ("vision", "MLP-Mixer classifier of scikit-learn's 8x8 digits (classify)"),
}
"""Shipped run name -> (task, one-line description)."""


def names() -> list[str]:
    """The shipped runs' names, e.g. ``['shakespeare-mlm', 'shakespeare-lm', 'digits']``."""
    return list(SHIPPED)


def help_text() -> str:
    """One phrase for ``--help``: which names a RUN_DIR argument also accepts."""
    return f"a run directory, or a shipped run: {', '.join(names())}"


def resolve(name_or_dir: str | os.PathLike) -> Path:
    """The run directory that ``name_or_dir`` means: a folder holding a run (yours win over a shipped
    name), else a shipped run by name, else the path itself when it exists (later readers say what is
    wrong with it). Anything else is one `UsageError` sentence listing the shipped names."""
    path = Path(name_or_dir)
    if runs.is_run(path):
        return path
    name = str(name_or_dir)
    if name in SHIPPED:
        shipped = HOME / name
        if not runs.is_run(shipped):
            raise UsageError(f"the shipped run {name!r} is missing from this installation ({shipped}); "
                             f"reinstall mlpmixer (pip install -e .) or give a run directory")
        return shipped
    if path.exists():
        return path
    raise UsageError(f"run directory {name!r} does not exist and is not a shipped run{did_you_mean(name, names())}; "
                     f"give a folder written by `mlpmixer train` or one of {', '.join(names())}")
