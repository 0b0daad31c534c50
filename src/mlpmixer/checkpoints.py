"""Run directories on disk: config.json, model.safetensors, trainer_state.pt, metrics.jsonl.

Every file is written atomically (temporary file, fsync, rename), so a crash mid-write leaves the
previous version in place. Weights are read only with safetensors; trainer state only with
``torch.load(weights_only=True)``, which refuses arbitrary pickled objects.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

MODEL_FILE, CONFIG_FILE, STATE_FILE, METRICS_FILE = "model.safetensors", "config.json", "trainer_state.pt", "metrics.jsonl"


class CheckpointError(ValueError):
    """A run directory or weights file that cannot be used; the message says why."""


def atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)``, fsync, then rename over ``path``: all or nothing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide the run from other users
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json(path: Path, obj: Any) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8"))


def read_json(path: Path) -> dict:
    if not path.exists():
        raise CheckpointError(f"no {path.name} in {str(path.parent)!r}; is it an mlpmixer run directory?")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e})") from None


def save_weights(model: nn.Module, path: Path) -> None:
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    atomic_write(path, lambda tmp: save_file(state, tmp))


def load_weights(model: nn.Module, path: Path) -> None:
    """Load safetensors weights; missing, unexpected or mis-shaped tensors are one clear error."""
    if not path.exists():
        raise CheckpointError(f"no {path.name} in {str(path.parent)!r}; the run has no saved model yet")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file ({e}); it may be truncated") from None
    check_state_dict(model, state, str(path))
    model.load_state_dict(state)


def check_state_dict(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    expected = model.state_dict()
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    misshaped = sorted(f"{k} {tuple(state[k].shape)} != {tuple(expected[k].shape)}"
                       for k in expected.keys() & state.keys() if state[k].shape != expected[k].shape)
    if missing or unexpected or misshaped:
        parts = [f"{label}: {', '.join(items[:8])}{' …' if len(items) > 8 else ''}"
                 for label, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped))
                 if items]
        raise CheckpointError(f"{source} does not match this model ({'; '.join(parts)})")


def save_trainer_state(out: Path, model: nn.Module, opt, sched, step: int) -> None:
    """Model weights, then optimiser/schedule/RNG state naming the step; each file atomic."""
    save_weights(model, out / MODEL_FILE)
    state = {"step": step, "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
             "rng": {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
                     "numpy": torch.from_numpy(np.random.get_state()[1].astype(np.int64))}}
    atomic_write(out / STATE_FILE, lambda tmp: torch.save(state, tmp))


def load_trainer_state(out: Path, model: nn.Module, opt, sched) -> int:
    """Restore a run saved by `save_trainer_state`; returns the step it reached."""
    load_weights(model, out / MODEL_FILE)
    path = out / STATE_FILE
    if not path.exists():
        raise CheckpointError(f"no {STATE_FILE} in {str(out)!r}; the run has no checkpoint to resume from")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as e:
        raise CheckpointError(f"{path} was refused: it is truncated or holds objects other than tensors "
                              f"({str(e).splitlines()[0]})") from None
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"]["torch"])
    return int(state["step"])


class MetricsLog:
    """Appends one JSON object per line to metrics.jsonl; on resume drops rows past the checkpoint."""

    def __init__(self, path: Path, truncate_after: int = 0):
        self.path = path
        if truncate_after and path.exists():
            rows = [r for r in read_metrics(path) if r.get("step", 0) <= truncate_after]
            atomic_write(path, lambda tmp: Path(tmp).write_text("".join(json.dumps(r) + "\n" for r in rows)))
        elif not truncate_after:
            path.write_text("")

    def write(self, row: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")


def read_metrics(path: Path) -> list[dict]:
    rows = []
    for line in Path(path).read_text().splitlines():
        if line.strip():
            try:
                rows.append(json.loads(line))
            except ValueError:
                continue  # a line cut short by a crash
    return rows
