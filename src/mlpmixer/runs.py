"""The run directory as one concept: create, recognise, lock, read, write, replace and clean a run.

A run directory is recognised by its ``config.json`` carrying ``"format": "mlpmixer-run"`` (a
marker only mlpmixer writes), not by file names. mlpmixer deletes or replaces only the files of
`RUN_FILES` that it wrote, and only in a directory that is a run:

- a new run goes into a missing or empty directory, or one that holds none of `RUN_FILES`;
  a directory that holds some of them but is not a run is refused, whatever the flags;
- ``--overwrite`` replaces a run: its files are moved into ``.mlpmixer-replaced/`` inside the run
  and deleted only once the new run has saved a model (given back if it fails before that);
- a run that never saved a model (killed before its first checkpoint) holds nothing of value and
  is replaced by the next new run in its place without ``--overwrite``;
- one process at a time writes a run: an exclusive ``flock`` on ``.mlpmixer.lock`` that the
  operating system releases when the process dies; a second writer is refused with the holder's PID;
- temporary files left by a killed write (``.model.safetensors.*.tmp``) are removed when the run
  is next opened for writing.

Every run file is read through one validating reader here: a file that is missing, truncated,
hand-edited or from another task is one `checkpoints.CheckpointError` naming the file and what is
wrong.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from . import __version__
from .checkpoints import (CONFIG_FILE, METRICS_FILE, MODEL_FILE, STATE_FILE, CheckpointError, atomic_write,
                          read_json, weights_metadata, write_json)
from .errors import RunExistsError, UsageError

FORMAT, FORMAT_VERSION = "mlpmixer-run", 1
TASKS = ("mlm", "lm", "vision")
VOCAB_FILE, BEST_MODEL_FILE, TENSORBOARD_DIR = "vocab.json", "model_best.safetensors", "tensorboard"
LOCK_FILE, REPLACED_DIR = ".mlpmixer.lock", ".mlpmixer-replaced"
RUN_FILES = (CONFIG_FILE, MODEL_FILE, BEST_MODEL_FILE, STATE_FILE, METRICS_FILE, VOCAB_FILE, TENSORBOARD_DIR)
"""Every file or folder a run writes (besides its lock); the only names mlpmixer ever deletes in a run."""


def is_rank0() -> bool:
    return int(os.environ.get("RANK", "0")) == 0  # under torchrun, rank 0 alone looks after the directory


# --- recognise --------------------------------------------------------------------------------------------

def run_config(path: str | os.PathLike) -> dict | None:
    """``path``/config.json when it is an mlpmixer run's (the marker, or a run of 0.1.0), else None."""
    try:
        config = json.loads((Path(path) / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict):
        return None
    if config.get("format") == FORMAT:
        return config
    legacy = "format" not in config and config.get("task") in TASKS and "mlpmixer_version" in config \
        and isinstance(config.get("model"), dict)  # written before the marker existed
    return config if legacy else None


def is_run(path: str | os.PathLike) -> bool:
    return run_config(path) is not None


def foreign_files(path: Path) -> list[str]:
    """The run-file names present in ``path`` that no mlpmixer run wrote (``path`` is not a run)."""
    if not path.is_dir() or is_run(path):
        return []
    return [name for name in RUN_FILES if (path / name).exists()]


def has_model(path: Path) -> bool:
    return (path / MODEL_FILE).exists()


# --- write ------------------------------------------------------------------------------------------------

def write_config(path: Path, config: dict) -> None:
    """Write ``config.json`` with the run marker (and this package's version) added."""
    write_json(path / CONFIG_FILE, {"format": FORMAT, "format_version": FORMAT_VERSION,
                                    "mlpmixer_version": __version__, **config})


def environment(device, threads: int, world_size: int) -> dict:
    """Where and with what a run trains: recorded in config.json beside the settings."""
    import platform

    import torch

    return {"device": str(device), "threads": threads, "world_size": world_size, "torch": torch.__version__,
            "mlpmixer": __version__, "python": platform.python_version(), "git_commit": git_commit()}


def git_commit() -> str | None:
    """The commit of the checkout this package runs from, or None (an installed wheel, no git)."""
    import subprocess

    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                              text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() or None if done.returncode == 0 else None


def best_metric(run: Path) -> float | None:
    """The validation metric recorded in the run's ``model_best.safetensors`` (None if there is none)."""
    value = weights_metadata(run / BEST_MODEL_FILE).get("value")
    return float(value) if value is not None else None


# --- lock -------------------------------------------------------------------------------------------------

class RunBusy(UsageError):
    """Another process holds the run's lock: it is writing the run now."""


class RunLock:
    """An exclusive ``flock`` on ``RUN/.mlpmixer.lock``, held while a process writes the run."""

    def __init__(self, run: Path):
        self.path = run / LOCK_FILE
        self.fd: int | None = None

    def acquire(self) -> "RunLock":
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunBusy(f"{str(self.path.parent)!r} is being written by another mlpmixer process (PID "
                             f"{holder}); wait for it to finish, stop it, or choose another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            os.ftruncate(self.fd, 0)
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


# --- clean ------------------------------------------------------------------------------------------------

def clean_temporaries(run: Path) -> list[Path]:
    """Remove what a killed atomic write left (``.NAME.*.tmp`` for the run's own files); returns them."""
    removed = []
    for name in RUN_FILES:
        for tmp in run.glob(f".{name}.*.tmp"):
            if tmp.is_file():
                tmp.unlink()
                removed.append(tmp)
    return removed


def _remove_run_files(run: Path) -> None:
    """Delete the run files of ``run`` (only `RUN_FILES`; the user's own files stay)."""
    for name in RUN_FILES:
        _delete(run / name)


def _delete(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _move_run_files(source: Path, target: Path) -> None:
    target.mkdir(parents=True, exist_ok=True)
    for name in RUN_FILES:
        if (source / name).exists():
            os.replace(source / name, target / name)


def recover(run: Path) -> None:
    """Finish what a killed process left in ``run`` (which this process has locked).

    A run whose replacement was killed before saving a model gets its old files back; a replaced run
    whose replacement did save a model is deleted; temporary files of interrupted writes go.
    """
    clean_temporaries(run)
    replaced = run / REPLACED_DIR
    if replaced.is_dir():
        if has_model(run):
            shutil.rmtree(replaced)
        else:
            _remove_run_files(run)
            _move_run_files(replaced, run)
            shutil.rmtree(replaced)


# --- create and replace -----------------------------------------------------------------------------------

@dataclass
class _NewRun:
    out: Path
    created_dir: bool
    lock: RunLock
    replacing: bool = False


@contextmanager
def new_run(out: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """The body writes a new run into ``out``; nothing the user owns is touched, nothing finished lost.

    Refused (one sentence, nothing touched): ``out`` is a file; ``out`` holds run-file names but is not
    an mlpmixer run; ``out`` holds a run with a model and ``overwrite`` is off; another process is
    writing ``out``. If the body fails before the new run saved a model, its files are removed (and
    ``out`` itself when this created it) and a replaced run is given back.
    """
    out = Path(out)
    if not is_rank0():
        yield out
        return
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {str(out)!r} is a file, not a directory; choose a directory for the run")
    foreign = foreign_files(out)
    if foreign:
        raise UsageError(f"{str(out)!r} is not an mlpmixer run but holds {', '.join(foreign)}; mlpmixer never "
                         f"replaces files it did not write: choose another --out")
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    state = _NewRun(out, created, RunLock(out).acquire())
    try:
        recover(out)
        if is_run(out) and has_model(out):
            if not overwrite:
                raise RunExistsError(f"{str(out)!r} already holds a run; pass --overwrite to replace it, "
                                     f"or --resume {out} to continue it")
            _move_run_files(out, out / REPLACED_DIR)  # kept until the new run saves a model
            state.replacing = True
        elif is_run(out):
            _remove_run_files(out)  # a run that never saved a model: nothing of value
        yield out
    except BaseException:
        _undo(state)
        raise
    else:
        _finish(state)
    finally:
        state.lock.release()
        if state.created_dir and out.is_dir() and not any(out.iterdir()):
            out.rmdir()  # nothing was kept in the directory this call created


def _undo(state: _NewRun) -> None:
    out = state.out
    if has_model(out):  # the new run saved a model: it is the run now, resumable
        _finish(state)
        return
    _remove_run_files(out)
    replaced = out / REPLACED_DIR
    if state.replacing and replaced.is_dir():
        _move_run_files(replaced, out)
        shutil.rmtree(replaced)
    if not is_run(out):
        _delete(out / LOCK_FILE)  # no run is left here, so neither is its lock


def _finish(state: _NewRun) -> None:
    replaced = state.out / REPLACED_DIR
    if replaced.is_dir():
        shutil.rmtree(replaced)


@contextmanager
def open_run(out: str | os.PathLike) -> Iterator[Path]:
    """Lock an existing run for writing (``--resume``) and clean what a killed writer left."""
    out = Path(out)
    if not is_rank0():
        yield out
        return
    if not out.is_dir():
        raise CheckpointError(f"run directory {str(out)!r} does not exist; nothing to resume")
    if not is_run(out):
        raise CheckpointError(f"{str(out)!r} is not an mlpmixer run (no config.json with the run marker); "
                              f"nothing to resume")
    lock = RunLock(out).acquire()
    try:
        recover(out)
        yield out
    finally:
        lock.release()


# --- read -------------------------------------------------------------------------------------------------

def read_run_config(run: str | os.PathLike, task: str | None = None) -> dict:
    """A run's validated config.json: an object with a known ``task`` and a ``model`` object.

    ``task`` (or a tuple of tasks), when given, must match: a run of another task is one sentence.
    """
    run = Path(run)
    if not run.is_dir():
        raise CheckpointError(f"run directory {str(run)!r} does not exist")
    config = read_json(run / CONFIG_FILE)
    path = run / CONFIG_FILE
    if config.get("format") not in (None, FORMAT):
        raise CheckpointError(f"{path} is not an mlpmixer run config (format {config.get('format')!r})")
    kind = config.get("task")
    if kind not in TASKS:
        raise CheckpointError(f"{path} names no known task ({kind!r}; expected one of {', '.join(TASKS)}); "
                              f"is it an mlpmixer run directory?")
    wanted = (task,) if isinstance(task, str) else task
    if wanted and kind not in wanted:
        if wanted == ("vision",):
            raise CheckpointError(f"{str(run)!r} holds a {kind!r} run, not a vision model; train one with "
                                  f"`mlpmixer train vision`")
        raise CheckpointError(f"{str(run)!r} holds a {kind!r} run; this needs an {' or '.join(wanted)} run")
    for key in ("model",) + (("train",) if "train" in config else ()):
        if not isinstance(config.get(key), dict):
            raise CheckpointError(f"{path} has no {key!r} settings object; the run cannot be used")
    return config


def build_config(cls, fields: dict, path: Path, what: str = "model"):
    """``cls(**fields)`` for a config dataclass, with unknown, missing or invalid fields one sentence."""
    import dataclasses

    known = {f.name for f in dataclasses.fields(cls)}
    required = {f.name for f in dataclasses.fields(cls)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
    unknown, missing = sorted(fields.keys() - known), sorted(required - fields.keys())
    if unknown or missing:
        parts = ([f"unknown: {', '.join(unknown)}"] if unknown else []) + \
                ([f"missing: {', '.join(missing)}"] if missing else [])
        raise CheckpointError(f"{path} has {what} settings this version cannot read ({'; '.join(parts)}); "
                              f"was it edited by hand or written by another version?")
    try:
        return cls(**fields)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path} has invalid {what} settings ({e})") from None


TRAIN_ROW = ("step", "loss", "accuracy", "tokens_per_s")


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The rows of ``metrics.jsonl``: JSON objects with an integer ``step`` and numeric values.

    A last line cut short by a crash is skipped; any other bad row is one error naming its line.
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"cannot read {path} ({e})") from None
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            if number == len(lines):
                continue  # the last line, cut short by a crash mid-write
            raise CheckpointError(f"{path} line {number} is not valid JSON; was it edited by hand?") from None
        problem = _row_problem(row)
        if problem:
            raise CheckpointError(f"{path} line {number} {problem}; was it edited by hand?")
        rows.append(row)
    return rows


def _row_problem(row) -> str | None:
    if not isinstance(row, dict):
        return f"is a JSON {type(row).__name__}, not an object"
    if not isinstance(row.get("step"), int) or isinstance(row.get("step"), bool):
        return "has no integer 'step'"
    if "loss" in row and any(k not in row for k in TRAIN_ROW):
        return f"is a training row without {', '.join(k for k in TRAIN_ROW if k not in row)}"
    if not any(k == "loss" or k.startswith("val_") for k in row):
        return "has neither a training 'loss' nor validation metrics"
    bad = [k for k, v in row.items() if not isinstance(v, (int, float)) or isinstance(v, bool)]
    return f"has non-numeric values ({', '.join(bad)})" if bad else None


class MetricsLog:
    """Appends one JSON object per line to metrics.jsonl; on resume drops rows past the checkpoint."""

    def __init__(self, path: Path, truncate_after: int = 0):
        self.path = path
        if truncate_after and path.exists():
            rows = [r for r in read_metrics(path) if r["step"] <= truncate_after]
            atomic_write(path, lambda tmp: Path(tmp).write_text("".join(json.dumps(r) + "\n" for r in rows)))
        elif not truncate_after:
            path.write_text("")

    def write(self, row: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")


# --- data fingerprints ------------------------------------------------------------------------------------

def fingerprint_text(text: str) -> dict:
    """Size and sha256 of a training text: what `--resume` checks before continuing on it."""
    data = text.encode("utf-8")
    return {"chars": len(text), "sha256": hashlib.sha256(data).hexdigest()}


def check_fingerprint(saved: dict | None, current: dict, where: str, allow_changed: bool) -> None:
    """Refuse to resume on data that changed since the run started (unless ``allow_changed``)."""
    if not saved or saved == current or allow_changed:
        return
    changes = "; ".join(f"{k} {saved.get(k)!r} -> {current.get(k)!r}" for k in sorted(current)
                        if saved.get(k) != current.get(k))
    raise UsageError(f"the data {where} changed since the run started ({changes}); resume on the original data, "
                     f"or pass --allow-changed-data to continue on this data anyway")

