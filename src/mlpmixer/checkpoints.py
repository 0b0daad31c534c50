"""Run directories on disk: config.json, model.safetensors, trainer_state.pt, metrics.jsonl.

Every file is written atomically (temporary file, fsync, rename), so a crash mid-write leaves the
previous version in place. A checkpoint is two files, written as one: both are written and fsynced
under temporary names first, then renamed, the weights before the trainer state; each records the
step, and `load_trainer_state` refuses a pair that disagrees (only a crash between the two renames
can leave one). Weights are read only with safetensors; trainer state only with
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
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from .errors import UsageError

MODEL_FILE, CONFIG_FILE, STATE_FILE, METRICS_FILE = "model.safetensors", "config.json", "trainer_state.pt", "metrics.jsonl"
STATE_KEYS = ("step", "optimizer", "scheduler", "rng")


class CheckpointError(UsageError):
    """A run directory or weights file that cannot be used; the message says why."""


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (disk full, no permission); the previous one is kept."""


def write_temp(path: Path, write: Callable[[str], None]) -> str:
    """Call ``write(tmp)`` for a temporary file beside ``path`` and fsync it; returns its name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp's 0600 (kept by writers that recreate the file) would hide the run
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
    except BaseException:
        _remove(tmp)
        raise
    return tmp


def atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)``, fsync, then rename over ``path``: all or nothing."""
    tmp = write_temp(path, write)
    try:
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


def _remove(path: str) -> None:
    if os.path.exists(path):
        os.unlink(path)


def _fsync_dir(directory: Path) -> None:
    """Make the renames in ``directory`` durable (where the platform allows opening a directory)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_json(path: Path, obj: Any) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8"))


def read_json(path: Path) -> dict:
    if not path.exists():
        raise CheckpointError(f"no {path.name} in {str(path.parent)!r}; is it an mlpmixer run directory?")
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); is it an mlpmixer run directory?") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a JSON {type(obj).__name__}, not an object; is it an mlpmixer run?")
    return obj


def _cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}


def save_weights(model: nn.Module, path: Path, step: int | None = None, extra: dict[str, str] | None = None) -> None:
    state = _cpu_state(model)
    metadata = {**({"step": str(step)} if step is not None else {}), **(extra or {})} or None
    atomic_write(path, lambda tmp: save_file(state, tmp, metadata=metadata))


def read_weights(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and the metadata of a safetensors file; an unreadable one is one clear error."""
    if not path.exists():
        raise CheckpointError(f"no {path.name} in {str(path.parent)!r}; the run has no saved model yet")
    try:
        with safe_open(str(path), "pt") as f:
            metadata = f.metadata() or {}
        return load_file(str(path)), metadata
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file ({e}); it may be truncated") from None


def load_weights(model: nn.Module, path: Path) -> dict[str, str]:
    """Load safetensors weights; missing, unexpected or mis-shaped tensors are one clear error.

    Returns the file's metadata (a checkpoint's holds its ``step``).
    """
    state, metadata = read_weights(path)
    check_state_dict(model, state, str(path))
    model.load_state_dict(state)
    return metadata


def check_state_dict(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    expected = model.state_dict()
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    misshaped = sorted(f"{k} {tuple(state[k].shape)} != {tuple(expected[k].shape)}"
                       for k in expected.keys() & state.keys() if state[k].shape != expected[k].shape)
    if missing or unexpected or misshaped:
        summary = mismatch_summary(missing, unexpected, misshaped)
        raise CheckpointError(f"{source} does not match this model ({summary}); was it saved with another configuration?")


def mismatch_summary(missing: list[str], unexpected: list[str], misshaped: list[str], shown: int = 3) -> str:
    """``missing: a, b; mis-shaped: c (+4 more)``: the first few of each kind, and how many more."""
    parts = [f"{label}: {', '.join(items[:shown])}{f' (+{len(items) - shown} more)' if len(items) > shown else ''}"
             for label, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped))
             if items]
    return "; ".join(parts)


def weights_metadata(path: Path) -> dict[str, str]:
    """The metadata of a safetensors file ({} when it is missing or unreadable)."""
    try:
        with safe_open(str(path), "pt") as f:
            return f.metadata() or {}
    except (SafetensorError, OSError, ValueError):
        return {}


def checkpoint_step(out: Path) -> int | None:
    """The step recorded in ``out``'s model.safetensors, or None (no model, or one saved without it)."""
    step = weights_metadata(out / MODEL_FILE).get("step")
    return int(step) if step is not None else None


def save_trainer_state(out: Path, model: nn.Module, opt, sched, step: int, log_sums: dict | None = None) -> None:
    """One checkpoint: model weights and optimiser/schedule/RNG state, both naming ``step``, and the
    training metrics summed since the last logged row (``log_sums``), so a resumed run logs the same rows.

    Both files are written and fsynced under temporary names before either is renamed, so a failed
    write (a full disk) leaves the previous checkpoint whole; the trainer state is renamed last.
    """
    weights = _cpu_state(model)
    # the state holds its own copy of the weights, so a crash between the two renames below (new
    # weights, old state) still resumes exactly, from the state's step
    state = {"step": step, "model": weights, "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
             "rng": {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
                     "numpy": torch.from_numpy(np.random.get_state()[1].astype(np.int64)),
                     "numpy_pos": int(np.random.get_state()[2])}}
    if log_sums is not None:
        state["log_sums"] = dict(log_sums)
    staged: list[tuple[str, Path]] = []
    try:
        staged.append((write_temp(out / MODEL_FILE, lambda tmp: save_file(weights, tmp, metadata={"step": str(step)})),
                       out / MODEL_FILE))
        staged.append((write_temp(out / STATE_FILE, lambda tmp: torch.save(state, tmp)), out / STATE_FILE))
        for tmp, path in staged:
            os.replace(tmp, path)
    except (OSError, RuntimeError, SafetensorError) as e:
        for tmp, _ in staged:
            _remove(tmp)
        raise CheckpointWriteError(_write_failure(out, step, e)) from e
    _fsync_dir(out)


def _write_failure(out: Path, step: int, error: BaseException) -> str:
    reason = (error.strerror if isinstance(error, OSError) and error.strerror else str(error)).splitlines()[0]
    previous = checkpoint_step(out)
    kept = (f"the previous checkpoint (step {previous}) is kept" if previous is not None
            else "no earlier checkpoint exists")
    return (f"could not write the checkpoint of step {step} to {str(out)!r} ({reason}); {kept}; free some space "
            f"or fix the permissions, then continue with --resume {out}")


def load_trainer_state(out: Path, model: nn.Module, opt, sched, log_sums: dict | None = None) -> int:
    """Restore a run saved by `save_trainer_state`; returns the step it reached, and fills ``log_sums``
    (when given) with the saved metrics sums (none in a state written before they were saved)."""
    state = read_trainer_state(out)
    if isinstance(state.get("model"), dict):  # the weights of the state's own step
        check_state_dict(model, state["model"], str(out / STATE_FILE))
        model.load_state_dict(state["model"])
        model_step = None
    else:  # a state written before it held the weights: they must come from the same step
        model_step = load_weights(model, out / MODEL_FILE).get("step")
    if model_step is not None and int(model_step) != int(state["step"]):
        raise CheckpointError(f"{out / MODEL_FILE} is from step {model_step} but {STATE_FILE} from step "
                              f"{state['step']}: the checkpoint was cut off while being written; the weights can "
                              f"still be loaded, but the run cannot be resumed exactly; start a new run")
    try:
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        restore_rng(state["rng"])
        if log_sums is not None:
            log_sums.update({k: float(v) for k, v in state.get("log_sums", {}).items()})
    except (ValueError, KeyError, TypeError, RuntimeError) as e:
        raise CheckpointError(f"{out / STATE_FILE} does not fit this run's optimiser ({e})") from None
    return int(state["step"])


def restore_rng(rng: dict) -> None:
    """Restore the torch, Python and NumPy generators saved by `save_trainer_state` (those present)."""
    torch.set_rng_state(rng["torch"])
    if "python" in rng:
        random.setstate((3, tuple(int(x) for x in rng["python"]), None))
    if "numpy" in rng:
        np.random.set_state(("MT19937", rng["numpy"].numpy().astype(np.uint32), int(rng.get("numpy_pos", 624)), 0, 0.0))


def read_trainer_state(out: Path) -> dict:
    """trainer_state.pt, read with ``weights_only=True``: tensors and plain containers, never other objects."""
    path = out / STATE_FILE
    if not path.exists():
        raise CheckpointError(f"no {STATE_FILE} in {str(out)!r}; the run has no checkpoint to resume from")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        detail = next((ln.strip().rstrip(".") for ln in str(e).splitlines()
                       if "GLOBAL" in ln or "Unsupported" in ln), "")
        raise CheckpointError(f"{path} was refused: it holds Python objects other than tensors, which mlpmixer never "
                              f"unpickles{f' ({detail})' if detail else ''}; do not use checkpoints from "
                              f"untrusted sources") from None
    except (RuntimeError, EOFError, ValueError, OSError) as e:
        raise CheckpointError(f"{path} is truncated or corrupted ({type(e).__name__}); resume from another copy "
                              f"of the run or start a new one") from None
    if not isinstance(state, dict) or any(k not in state for k in STATE_KEYS):
        raise CheckpointError(f"{path} is not an mlpmixer trainer state (it needs {', '.join(STATE_KEYS)})")
    return state
