"""The training engine with real processes: torchrun data parallelism, SIGKILL and resume, Ctrl-C,
resume with a changed configuration, plots and comparison tables."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mlpmixer.cli import main

TINY = ["--seq-len", "16", "--d-model", "32", "--n-layers", "2", "--d-ff", "48", "--tokens-mlp-dim", "24",
        "--n-heads", "4", "--quiet"]


def cli(*args: str, torchrun: int = 0, timeout: float = 240) -> subprocess.CompletedProcess:
    """Run the real command in a fresh process (one thread, so results are bitwise repeatable)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
           # a rank that aborts in C++ (seen twice: "terminate called without an active exception" after a
           # complete run, under torchrun) prints every thread's Python stack and the C++ one, for the record
           "PYTHONFAULTHANDLER": "1", "TORCH_SHOW_CPP_STACKTRACES": "1"}
    if torchrun:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(torchrun),
               "-m", "mlpmixer", *args]
    else:
        cmd = [sys.executable, "-m", "mlpmixer", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "model.safetensors"))


def rows(run: Path) -> list[dict]:
    strip = ("elapsed_s", "tokens_per_s")
    return [{k: v for k, v in json.loads(line).items() if k not in strip}
            for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize("mixer", ["mlp", "attention"])
def test_two_ranks_equal_one_process_with_the_same_global_batch(sonnet_file, tmp_path, mixer):
    """Each rank keeps a shard of the same global batch, so 2 gloo ranks take the same steps as 1 process
    (dropout off: its masks are drawn per rank). Gradient accumulation must agree as well."""
    common = ["train", "mlm", "--text-file", str(sonnet_file), "--steps", "6", "--batch-size", "8",
              "--dropout", "0", "--eval-every", "3", "--log-every", "3", "--token-mixer", mixer, *TINY]
    one, two, accum = tmp_path / "one", tmp_path / "two", tmp_path / "accum"
    r1 = cli(*common, "--out", str(one))
    assert r1.returncode == 0, r1.stderr
    r2 = cli(*common, "--out", str(two), torchrun=2)
    assert r2.returncode == 0, r2.stderr[-3000:]
    r3 = cli(*common, "--out", str(accum), "--grad-accum", "2")
    assert r3.returncode == 0, r3.stderr
    a, b, c = weights(one), weights(two), weights(accum)
    assert a.keys() == b.keys() == c.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=f"2 ranks vs 1 process: {k}")
        torch.testing.assert_close(c[k], a[k], rtol=1e-5, atol=1e-6, msg=f"grad-accum 2 vs 1: {k}")
    val_one = [r for r in rows(one) if "val_loss" in r]
    val_two = [r for r in rows(two) if "val_loss" in r]
    assert len(val_one) == len(val_two) == 2
    for x, y in zip(val_one, val_two):  # validation reduced across ranks equals the whole set on one
        assert y["val_loss"] == pytest.approx(x["val_loss"], rel=1e-5)
        assert y["val_accuracy"] == pytest.approx(x["val_accuracy"], abs=1e-9)
    assert rows(one)[0]["loss"] != rows(one)[-2]["loss"], "the runs really trained"


@pytest.mark.slow
def test_vision_two_ranks_equal_one_process(tmp_path):
    """The same equivalence for `train vision` (augmentation is drawn for the global batch, then sharded;
    dropout off, as for the MLM)."""
    common = ["train", "vision", "--steps", "4", "--batch-size", "16", "--eval-every", "2", "--log-every", "2",
              "--threads", "1", "--dropout", "0", "--quiet"]
    one, two, accum = tmp_path / "one", tmp_path / "two", tmp_path / "accum"
    for out, extra, ranks in ((one, [], 0), (two, [], 2), (accum, ["--grad-accum", "4"], 0)):
        result = cli(*common, *extra, "--out", str(out), torchrun=ranks)
        assert result.returncode == 0, result.stderr[-3000:]
    a, b, c = weights(one), weights(two), weights(accum)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=f"2 ranks vs 1 process: {k}")
        torch.testing.assert_close(c[k], a[k], rtol=1e-5, atol=1e-6, msg=f"grad-accum 4 vs 1: {k}")
    val_one = [r for r in rows(one) if "val_top1" in r]
    val_two = [r for r in rows(two) if "val_top1" in r]
    assert [r["val_top1"] for r in val_one] == [r["val_top1"] for r in val_two]


@pytest.mark.slow
def test_vision_kill_and_resume_equals_an_uninterrupted_run(tmp_path):
    # rows every 4 steps, checkpoints every 5: the resumed checkpoint (10, 15 or 25) falls between two rows,
    # so the resumed run's next row must add the steps the checkpoint had summed to its own
    common = ["train", "vision", "--steps", "30", "--batch-size", "16", "--eval-every", "10", "--log-every", "4",
              "--ckpt-every", "5", "--threads", "1", "--quiet"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert cli(*common, "--out", str(straight)).returncode == 0
    _kill_at_step(common, killed, 12)
    assert 10 <= torch.load(killed / "trainer_state.pt", weights_only=True)["step"] < 30
    resumed = cli("train", "vision", "--resume", str(killed), "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    a, b = weights(straight), weights(killed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert rows(killed) == rows(straight)


def test_batch_size_not_divisible_by_ranks_and_accumulation_is_a_clear_error(sonnet_file, tmp_path, capsys):
    code = main(["train", "mlm", "--text-file", str(sonnet_file), "--steps", "2", "--batch-size", "9",
                 "--grad-accum", "2", "--out", str(tmp_path / "r"), *TINY])
    err = capsys.readouterr().err
    assert code == 2 and "--batch-size 9" in err and "Traceback" not in err
    assert not (tmp_path / "r" / "config.json").exists()


def _wait_for_step(run: Path, step: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.stderr.read()
        path = run / "metrics.jsonl"
        if path.exists() and any(json.loads(line).get("step", 0) >= step for line in path.read_text().splitlines()
                                 if line.strip().endswith("}")):
            return
        time.sleep(0.05)
    raise TimeoutError(f"the run did not reach step {step}")


def _popen(*args: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
           # a rank that aborts in C++ (seen twice: "terminate called without an active exception" after a
           # complete run, under torchrun) prints every thread's Python stack and the C++ one, for the record
           "PYTHONFAULTHANDLER": "1", "TORCH_SHOW_CPP_STACKTRACES": "1"}
    return subprocess.Popen([sys.executable, "-m", "mlpmixer", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _kill_at_step(args: list[str], run: Path, step: int) -> None:
    """Start a real training process into ``run``, SIGKILL it once it has logged ``step``."""
    proc = _popen(*args, "--out", str(run))
    _wait_for_step(run, step, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL


@pytest.mark.slow
def test_sigkill_then_resume_equals_an_uninterrupted_run(sonnet_file, tmp_path):
    common = ["train", "mlm", "--text-file", str(sonnet_file), "--steps", "60", "--batch-size", "8",
              "--eval-every", "20", "--log-every", "5", "--ckpt-every", "10", *TINY]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert cli(*common, "--out", str(straight)).returncode == 0
    _kill_at_step(common, killed, 25)
    state = torch.load(killed / "trainer_state.pt", weights_only=True)
    assert 20 <= state["step"] < 60, "killed mid-run, after at least two checkpoints"
    resumed = cli("train", "mlm", "--resume", str(killed), "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    a, b = weights(straight), weights(killed)
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after kill and resume"
    assert rows(killed) == rows(straight)


@pytest.mark.slow
def test_ctrl_c_saves_a_checkpoint_and_exits_130(sonnet_file, tmp_path):
    run = tmp_path / "run"
    proc = _popen("train", "mlm", "--text-file", str(sonnet_file), "--steps", "100000", "--batch-size", "8",
                  "--ckpt-every", "100000", "--eval-every", "100000", "--log-every", "2", "--out", str(run), *TINY)
    _wait_for_step(run, 4, proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "--resume" in err and "Traceback" not in err
    step = torch.load(run / "trainer_state.pt", weights_only=True)["step"]
    assert step >= 4
    assert len(weights(run)) > 0


def test_resume_with_a_different_model_lists_the_differing_fields(sonnet_file, tmp_path, capsys):
    run = tmp_path / "run"
    base = ["train", "mlm", "--text-file", str(sonnet_file), "--batch-size", "8", "--eval-every", "2", *TINY]
    assert main([*base, "--steps", "2", "--out", str(run)]) == 0
    capsys.readouterr()
    code = main(["train", "mlm", "--resume", str(run), "--d-model", "64", "--lr", "0.5", "--steps", "4", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "d_model 32 -> 64" in err and "lr 1.0 -> 0.5" in err
    assert main(["train", "mlm", "--resume", str(run), "--steps", "4", "--quiet"]) == 0  # steps may change


def test_plot_and_compare_two_runs(sonnet_file, tmp_path, capsys):
    runs = []
    for mixer in ("mlp", "attention"):
        run = tmp_path / mixer
        assert main(["train", "mlm", "--text-file", str(sonnet_file), "--steps", "4", "--batch-size", "8",
                     "--eval-every", "2", "--log-every", "1", "--token-mixer", mixer, "--out", str(run), *TINY]) == 0
        runs.append(str(run))
    png = tmp_path / "curves.png"
    assert main(["plot", *runs, "-o", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    capsys.readouterr()
    assert main(["compare", *runs]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].startswith("| run | mixer") and len(table) == 4
    assert "| mlp | mlp | 4 |" in table[2] and "| attention | attention | 4 |" in table[3]


def test_tensorboard_flag(sonnet_file, tmp_path, capsys):
    """With the optional package: event files; without it: one clear line and no run left behind."""
    try:
        import tensorboard  # noqa: F401
        installed = True
    except ImportError:
        installed = False
    run = tmp_path / "run"
    code = main(["train", "mlm", "--text-file", str(sonnet_file), "--steps", "2", "--batch-size", "8",
                 "--log-every", "1", "--tensorboard", "--out", str(run), *TINY])
    if installed:
        assert code == 0 and any((run / "tensorboard").iterdir())
    else:
        assert code == 2 and "mlpmixer[tensorboard]" in capsys.readouterr().err
        assert not (run / "config.json").exists()
