"""Shared fixtures: tiny configs, a small text file, the shared tiny-Shakespeare copy, one trained run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mlpmixer import MLMConfig

SHARED_TINYSHAKESPEARE = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "tinyshakespeare.txt"

# Sonnet 18 (public domain): a small, varied, repeatable training text.
SONNET = """Shall I compare thee to a summer's day?
Thou art more lovely and more temperate:
Rough winds do shake the darling buds of May,
And summer's lease hath all too short a date;
Sometime too hot the eye of heaven shines,
And often is his gold complexion dimm'd;
And every fair from fair sometime declines,
By chance or nature's changing course untrimm'd;
But thy eternal summer shall not fade,
Nor lose possession of that fair thou ow'st;
Nor shall death brag thou wander'st in his shade,
When in eternal lines to time thou grow'st:
So long as men can breathe or eyes can see,
So long lives this, and this gives life to thee.
"""

# Coriolanus I.1 (public domain): holds every character of the training loop's sample prompts.
CITIZEN = """First Citizen:
We are accounted poor citizens, the patricians good.
What authority surfeits on would relieve us: if they
would yield us but the superfluity, while it were
wholesome, we might guess they relieved us humanely;
but they think we are too dear: the leanness that
afflicts us, the object of our misery, is as an
inventory to particularise their abundance; our
sufferance is a gain to them.
"""

TRAIN_ARGS = ["--steps", "20", "--seq-len", "16", "--d-model", "32", "--n-layers", "1", "--d-ff", "32",
              "--tokens-mlp-dim", "16", "--batch-size", "8", "--eval-every", "10", "--log-every", "5", "--quiet"]


def run_python(code: str, timeout: float = 120, **env: str) -> subprocess.CompletedProcess:
    """``python -c code`` in a fresh interpreter, with ``env`` added to this environment."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **env})


def broken_compiler(path: Path) -> Path:
    """An executable at ``path`` that answers ``--version`` like a compiler and fails every build."""
    name = path.name
    path.write_text(f"#!/bin/sh\n[ \"$1\" = --version ] && echo {name} 1.0 && exit 0\necho '{name}: error: broken' >&2\nexit 1\n")
    path.chmod(0o755)
    return path


def pytest_configure(config):
    # Tiny tensors: one thread is fastest, and the suite shares a small machine with other work. The
    # variable also makes every in-process `mlpmixer train` keep one thread (it honours OMP_NUM_THREADS),
    # so in-process and subprocess runs (which set it too) give the same bits.
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def tiny_mlm_config():
    """``tiny_mlm_config(**overrides)``: an MLMConfig small enough for a CPU test."""

    def make(**overrides) -> MLMConfig:
        fields = dict(vocab_size=20, seq_len=12, d_model=16, n_layers=2, n_heads=4, d_ff=24, tokens_mlp_dim=10,
                      dropout=0.0)
        return MLMConfig(**{**fields, **overrides})

    return make


@pytest.fixture(scope="session")
def sonnet_file(tmp_path_factory) -> Path:
    """A ~9 KB UTF-8 text file (Sonnet 18 and a speech from Coriolanus, five times)."""
    path = tmp_path_factory.mktemp("text") / "sonnet.txt"
    path.write_text((SONNET + "\n" + CITIZEN + "\n") * 5, encoding="utf-8")
    return path


@pytest.fixture
def tinyshakespeare_path() -> Path:
    """The shared copy of the seed's corpus; the test is skipped where it is absent."""
    if not SHARED_TINYSHAKESPEARE.is_file():
        pytest.skip(f"{SHARED_TINYSHAKESPEARE} is not present (tests never download it)")
    return SHARED_TINYSHAKESPEARE


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, sonnet_file) -> Path:
    """One 20-step `mlpmixer train mlm` run on the sonnet, shared by the tests that read a run.

    Tests that change the run (resume) work on a copy.
    """
    from mlpmixer.cli import main

    out = tmp_path_factory.mktemp("runs") / "run"
    assert main(["train", "mlm", "--text-file", str(sonnet_file), *TRAIN_ARGS, "--out", str(out)]) == 0
    return out

