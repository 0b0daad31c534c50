"""The run directory (issue 10): mlpmixer deletes only what it wrote, in a folder it recognises as its
own run; it locks a run while writing it; SIGTERM checkpoints like Ctrl-C; no non-finite value reaches a
hyper-parameter or a checkpoint; resume checks its data; every run file is read through one validating
reader. Each case runs the real command (`mlpmixer.cli.main`, or a subprocess where a signal is needed)
on real folders.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mlpmixer import runs
from mlpmixer.cli import main

from conftest import TRAIN_ARGS

TINY = ["--seq-len", "16", "--d-model", "32", "--n-layers", "1", "--d-ff", "32", "--tokens-mlp-dim", "16",
        "--batch-size", "8", "--quiet"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def train(text: Path, out: Path, *extra: str) -> int:
    return main(["train", "mlm", "--text-file", str(text), *TRAIN_ARGS, "--out", str(out), *extra])


def error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("mlpmixer: error: "), err
    assert not any("Traceback" in line or "unexpected" in line for line in err), err
    return err[-1]


def tree(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (relative path -> bytes), to show nothing was touched."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def popen(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "mlpmixer", *args], env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for(condition, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.02)
    raise TimeoutError("the condition was not reached")


def logged_step(run: Path, step: int) -> bool:
    path = run / "metrics.jsonl"
    return path.exists() and any(json.loads(line).get("step", 0) >= step
                                 for line in path.read_text().splitlines() if line.strip().endswith("}"))


# --- nothing outside a run is ever deleted ----------------------------------------------------------------

def test_overwrite_refuses_a_folder_that_is_not_a_run(sonnet_file, tmp_path, capsys):
    proj = tmp_path / "proj"
    (proj / "src").mkdir(parents=True)
    (proj / "config.json").write_text("{}")
    (proj / "src" / "main.py").write_text("x")
    before = tree(proj)
    assert train(sonnet_file, proj, "--overwrite") == 2
    assert "is not an mlpmixer run but holds config.json" in error_line(capsys)
    assert tree(proj) == before


def test_a_folder_with_run_file_names_that_is_not_a_run_is_refused(sonnet_file, tmp_path, capsys):
    proj = tmp_path / "proj"
    (proj / "tensorboard" / "old").mkdir(parents=True)
    (proj / "tensorboard" / "old" / "ev").write_text("events")
    for name in ("metrics.jsonl", "vocab.json", "trainer_state.pt"):
        (proj / name).write_text("mine")
    before = tree(proj)
    for extra in ((), ("--overwrite",), ("--lr", "nan")):
        assert train(sonnet_file, proj, *extra) == 2
        error_line(capsys)
        assert tree(proj) == before


def test_a_run_that_fails_early_in_a_user_folder_removes_only_its_own_files(sonnet_file, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("fp16 is valid where CUDA is available")
    proj = tmp_path / "proj"
    (proj / "notes").mkdir(parents=True)
    (proj / "notes" / "todo.txt").write_text("keep me")
    (proj / "README").write_text("mine")
    before = tree(proj)
    assert train(sonnet_file, proj, "--device", "cpu", "--precision", "fp16") == 2
    assert "fp16 needs a CUDA device" in error_line(capsys)
    assert tree(proj) == before and sorted(p.name for p in proj.iterdir()) == ["README", "notes"]


def test_overwrite_replaces_only_run_files_and_keeps_the_users(trained_run, sonnet_file, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    (run / "my_notes.txt").write_text("mine")
    old = (run / "model.safetensors").read_bytes()
    assert train(sonnet_file, run, "--overwrite", "--seed", "3") == 0
    assert (run / "my_notes.txt").read_text() == "mine"
    assert (run / "model.safetensors").read_bytes() != old
    assert not (run / runs.REPLACED_DIR).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


@pytest.mark.parametrize("command", ["mlm", "lm", "vision", "study", "plot"])
def test_every_writing_command_leaves_a_populated_folder_alone(command, trained_run, sonnet_file, tmp_path, capsys):
    """A non-run folder holding the user's files, some named like run files: each command that writes
    either refuses or adds its own files beside them; nothing that was there is changed or deleted."""
    proj = tmp_path / "proj"
    (proj / "data").mkdir(parents=True)
    (proj / "data" / "x.csv").write_text("1,2")
    (proj / "metrics.jsonl").write_text("mine\n")
    (proj / "study.md").write_text("my study")
    before = tree(proj)
    tiny = ["--text-file", str(sonnet_file), "--out", str(proj)]
    argv = {
        "mlm": ["train", "mlm", *TRAIN_ARGS, "--text-file", str(sonnet_file), "--out", str(proj), "--overwrite"],
        "lm": ["train", "lm", *TRAIN_ARGS, "--text-file", str(sonnet_file), "--out", str(proj), "--overwrite"],
        "vision": ["train", "vision", "--steps", "2", "--batch-size", "4", "--img-size", "8", "--quiet",
                   "--out", str(proj), "--overwrite"],
        "study": ["study", "mlm", "--steps", "2", "--seeds", "1", "--batch-size", "8", "--mixers", "mlp",
                  "--schedules", "seed", *tiny],
        "plot": ["plot", str(trained_run), "-o", str(proj / "curves.png")],
    }[command]
    code = main(argv)
    after = tree(proj)
    assert {k: v for k, v in after.items() if k in before} == before, "a file of the user's was changed"
    if command == "plot":
        assert code == 0 and (proj / "curves.png").read_bytes()[:4] == b"\x89PNG"
    else:
        assert code == 2 and "mlpmixer never replaces files it did not write" in error_line(capsys)
        assert after == before


# --- signals ----------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_sigterm_checkpoints_exits_143_and_resumes(sonnet_file, tmp_path):
    run = tmp_path / "run"
    proc = popen("train", "mlm", "--text-file", str(sonnet_file), "--steps", "100000", "--ckpt-every", "100000",
                 "--eval-every", "100000", "--log-every", "2", "--out", str(run), *TINY)
    wait_for(lambda: logged_step(run, 4), proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert "stopped by SIGTERM" in err and f"--resume {run}" in err and "Traceback" not in err
    step = torch.load(run / "trainer_state.pt", weights_only=True)["step"]
    assert step >= 4
    assert main(["train", "mlm", "--resume", str(run), "--steps", str(step + 2), "--quiet"]) == 0


@pytest.mark.slow
def test_sigterm_during_overwrite_leaves_one_valid_run_and_no_hidden_copy(trained_run, sonnet_file, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    proc = popen("train", "mlm", "--text-file", str(sonnet_file), "--steps", "100000", "--ckpt-every", "100000",
                 "--eval-every", "100000", "--log-every", "1", "--out", str(run), "--overwrite", *TINY)
    wait_for(lambda: (run / runs.REPLACED_DIR).exists(), proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode in (143, 2), err  # stopped mid-run, or before the run had started
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"], "no hidden copy beside the run"
    assert not (run / runs.REPLACED_DIR).exists()
    assert main(["fill", str(run), "Shall I compare th_e"]) == 0


@pytest.mark.slow
def test_a_run_killed_before_its_first_checkpoint_restarts_with_the_same_command(sonnet_file, tmp_path):
    run = tmp_path / "run"
    args = ["train", "mlm", "--text-file", str(sonnet_file), "--steps", "100000", "--ckpt-every", "100000",
            "--eval-every", "100000", "--log-every", "1", "--out", str(run), *TINY]
    proc = popen(*args)
    wait_for(lambda: logged_step(run, 1), proc)
    proc.kill()
    proc.wait()
    assert runs.is_run(run) and not runs.has_model(run)
    assert main(["train", "mlm", "--text-file", str(sonnet_file), "--steps", "3", "--out", str(run), *TINY]) == 0


@pytest.mark.slow
def test_a_second_writer_is_refused_with_the_holders_pid(sonnet_file, tmp_path, capsys):
    run = tmp_path / "run"
    proc = popen("train", "mlm", "--text-file", str(sonnet_file), "--steps", "100000", "--ckpt-every", "1",
                 "--eval-every", "100000", "--log-every", "1", "--out", str(run), *TINY)
    try:
        wait_for(lambda: logged_step(run, 2), proc)
        assert train(sonnet_file, run, "--overwrite") == 2
        assert f"being written by another mlpmixer process (PID {proc.pid})" in error_line(capsys)
        assert main(["train", "mlm", "--resume", str(run), "--quiet"]) == 2
        assert f"(PID {proc.pid})" in error_line(capsys)
    finally:
        proc.kill()
        proc.wait()
    assert main(["train", "mlm", "--resume", str(run), "--steps", "3", "--quiet"]) == 0, "the lock dies with it"


# --- kill at random moments: every survivor loads and resumes to the uninterrupted result ------------------

KILL_STEPS = 24
KILL_ARGS = ["--steps", str(KILL_STEPS), "--ckpt-every", "1", "--eval-every", "8", "--log-every", "4", *TINY]


@pytest.fixture(scope="module")
def uninterrupted(sonnet_file, tmp_path_factory) -> dict[str, torch.Tensor]:
    run = tmp_path_factory.mktemp("straight") / "run"
    done = subprocess.run([sys.executable, "-m", "mlpmixer", "train", "mlm", "--text-file", str(sonnet_file),
                           *KILL_ARGS, "--out", str(run)], env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return load_file(str(run / "model.safetensors"))


@pytest.mark.slow
@pytest.mark.parametrize("kill", [("SIGKILL", i) for i in range(11)] + [("SIGTERM", i) for i in range(11)],
                         ids=lambda k: f"{k[0]}-{k[1]}")
def test_killed_at_a_random_moment_loads_and_resumes_to_the_same_weights(kill, uninterrupted, sonnet_file, tmp_path,
                                                                         capsys):
    name, i = kill
    delay = random.Random(f"{name}{i}").uniform(0.0, 2.5)
    run = tmp_path / "run"
    args = ["train", "mlm", "--text-file", str(sonnet_file), *KILL_ARGS, "--out", str(run)]
    proc = popen(*args)
    wait_for(lambda: (run / runs.LOCK_FILE).exists(), proc)  # the run has started (imports are done)
    time.sleep(delay)
    proc.send_signal(getattr(signal, name))
    _, err = proc.communicate(timeout=120)
    assert "Traceback" not in err, err
    if runs.has_model(run):
        assert main(["fill", str(run), "Shall I compare th_e"]) == 0, capsys.readouterr().err
        assert main(["train", "mlm", "--resume", str(run), "--quiet"]) == 0, capsys.readouterr().err
    else:  # stopped before its first checkpoint: the same command starts it again
        assert main(args) == 0, capsys.readouterr().err
    final = load_file(str(run / "model.safetensors"))
    assert all(torch.equal(final[k], uninterrupted[k]) for k in uninterrupted), f"{name} after {delay:.2f} s"
    assert not list(run.glob(".*.tmp")) and not (run / runs.REPLACED_DIR).exists()


# --- hyper-parameters and checkpoints stay finite ---------------------------------------------------------

@pytest.mark.parametrize("flag", ["--lr", "--grad-clip", "--weight-decay", "--dropout"])
@pytest.mark.parametrize("value", ["nan", "inf"])
def test_non_finite_hyper_parameters_are_refused(flag, value, sonnet_file, tmp_path, capsys):
    out = tmp_path / "run"
    assert train(sonnet_file, out, flag, value) == 2
    line = error_line(capsys)
    assert flag.lstrip("-").replace("-", "_") in line
    assert not out.exists()


def test_non_finite_vision_hyper_parameters_are_refused(tmp_path, capsys):
    for flag in ("--mixup-alpha", "--label-smoothing", "--lr"):
        assert main(["train", "vision", "--steps", "1", flag, "nan", "--out", str(tmp_path / "v")]) == 2
        assert "must be a finite number" in error_line(capsys) or "must be in" in capsys.readouterr().err
    assert not (tmp_path / "v").exists()


def test_an_exploding_run_stops_and_keeps_no_exploded_checkpoint(sonnet_file, tmp_path, capsys):
    out = tmp_path / "run"
    code = train(sonnet_file, out, "--optimizer", "adamw", "--lr", "1e30", "--ckpt-every", "1", "--grad-clip", "0")
    assert code == 1
    line = error_line(capsys)
    assert "exploded" in line or "non-finite" in line or "the loss became" in line
    if runs.has_model(out):
        weights = load_file(str(out / "model.safetensors"))
        assert all(torch.isfinite(w).all() and w.abs().max() < 1e6 for w in weights.values())
        assert main(["fill", str(out), "Shall I compare th_e"]) == 0
        assert "nan" not in capsys.readouterr().out


# --- resume and its data ----------------------------------------------------------------------------------

def test_resume_reads_the_data_by_absolute_path_from_another_directory(sonnet_file, tmp_path, monkeypatch, capsys):
    work = tmp_path / "work"
    work.mkdir()
    shutil.copy(sonnet_file, work / "text.txt")
    monkeypatch.chdir(work)
    assert main(["train", "mlm", "--text-file", "text.txt", *TRAIN_ARGS, "--out", "run"]) == 0
    saved = json.loads((work / "run" / "config.json").read_text())
    assert saved["data"]["text_file"] == str(work / "text.txt")
    assert saved["format"] == runs.FORMAT and saved["data"]["fingerprint"]["sha256"]
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert main(["train", "mlm", "--resume", str(work / "run"), "--steps", "25", "--quiet"]) == 0


def test_resume_refuses_changed_data_unless_told(trained_run, sonnet_file, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    changed = tmp_path / "changed.txt"
    changed.write_text(sonnet_file.read_text() + "\nMore words of the same sonnet.\n")
    assert main(["train", "mlm", "--resume", str(run), "--text-file", str(changed), "--steps", "22"]) == 2
    assert "changed since the run started" in error_line(capsys)
    assert main(["train", "mlm", "--resume", str(run), "--text-file", str(changed), "--steps", "22",
                 "--allow-changed-data"]) == 0
    assert f"resuming {run} on {str(changed)!r}" in capsys.readouterr().err
    assert json.loads((run / "config.json").read_text())["data"]["text_file"] == str(changed)


def test_resume_from_moved_data_with_text_file(trained_run, sonnet_file, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    moved = tmp_path / "moved.txt"
    shutil.copy(sonnet_file, moved)
    config = json.loads((run / "config.json").read_text())
    config["data"]["text_file"] = str(tmp_path / "gone.txt")
    (run / "config.json").write_text(json.dumps(config))
    assert main(["train", "mlm", "--resume", str(run), "--steps", "22", "--quiet"]) == 2
    assert "gone.txt' does not exist" in error_line(capsys)
    assert main(["train", "mlm", "--resume", str(run), "--text-file", str(moved), "--steps", "22", "--quiet"]) == 0


def test_leftover_temporary_files_are_removed_at_the_next_start(trained_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    leftover = run / ".model.safetensors.abc123.tmp"
    leftover.write_bytes(b"x" * 1000)
    mine = run / ".my.tmp"
    mine.write_text("not a run file's")
    assert main(["train", "mlm", "--resume", str(run), "--steps", "21", "--quiet"]) == 0
    assert not leftover.exists() and mine.exists()


# --- study -------------------------------------------------------------------------------------------------

def test_study_keys_each_cell_by_its_whole_configuration(sonnet_file, tmp_path, capsys):
    out = tmp_path / "study"
    base = ["study", "mlm", "--seeds", "1", "--batch-size", "8", "--mixers", "mlp", "--schedules", "seed",
            "--out", str(out)]
    assert main([*base, "--steps", "3", "--text-file", str(sonnet_file)]) == 0
    first = {p.name: tree(p) for p in out.iterdir() if p.is_dir()}
    assert len(first) == 1
    capsys.readouterr()
    assert main([*base, "--steps", "3", "--text-file", str(sonnet_file)]) == 0
    assert "study: mlm" not in capsys.readouterr().out, "a finished cell of the same configuration is reused"
    assert main([*base, "--steps", "4", "--text-file", str(sonnet_file)]) == 0
    other = tmp_path / "other.txt"
    other.write_text(sonnet_file.read_text().upper())
    assert main([*base, "--steps", "3", "--text-file", str(other)]) == 0
    assert main([*base, "--steps", "3", "--text-file", str(sonnet_file), "--batch-size", "16"]) == 0
    cells = [p for p in out.iterdir() if p.is_dir()]
    assert len(cells) == 4, "each configuration has a folder of its own"
    assert {name: tree(out / name) for name in first} == first, "a finished run was changed"
    table = (out / "study.md").read_text()
    assert "16" not in table or "| seed | mlp |" in table


# --- one validating reader --------------------------------------------------------------------------------

def edit_config(run: Path, change) -> None:
    config = json.loads((run / "config.json").read_text())
    change(config)
    (run / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("case", ["extra_model_key", "missing_model_key", "model_not_object", "unknown_task",
                                  "extra_train_key"])
def test_hand_edited_config_is_one_clear_error(case, trained_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    edit = {
        "extra_model_key": lambda c: c["model"].update(colour="blue"),
        "missing_model_key": lambda c: c["model"].pop("vocab_size"),
        "model_not_object": lambda c: c.update(model=[1, 2]),
        "unknown_task": lambda c: c.update(task="chess"),
        "extra_train_key": lambda c: c["train"].update(speed=3),
    }[case]
    edit_config(run, edit)
    for argv in (["fill", str(run), "Shall I compare th_e"], ["train", "mlm", "--resume", str(run), "--quiet"]):
        if case == "extra_train_key" and argv[0] == "fill":
            continue  # fill reads no training settings
        assert main(argv) == 2
        line = error_line(capsys)
        assert "config.json" in line or "task" in line, line


def test_a_vocabulary_that_does_not_fit_the_model_is_one_clear_error(trained_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    vocab = json.loads((run / "vocab.json").read_text())
    vocab["itos"].append("\u00e9")
    (run / "vocab.json").write_text(json.dumps(vocab))
    for argv in (["fill", str(run), "Shall I compare th_e"], ["train", "mlm", "--resume", str(run), "--quiet"]):
        assert main(argv) == 2
        assert "vocab.json has" in error_line(capsys)
    (run / "vocab.json").write_text(json.dumps({"itos": ["ab", 3]}))
    assert main(["fill", str(run), "Shall I compare th_e"]) == 2
    assert "not a valid vocabulary file" in error_line(capsys)


def test_a_zero_byte_model_given_to_compare_and_fill(trained_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    (run / "model.safetensors").write_bytes(b"")
    for argv in (["compare", str(run)], ["fill", str(run), "Shall I compare th_e"]):
        assert main(argv) == 2
        assert "model.safetensors is not a readable safetensors file" in error_line(capsys)


@pytest.mark.parametrize("row", ['[1, 2]', '{"loss": 1.0}', '{"step": 5, "loss": 1.0}', '{"step": "5", "val_loss": 1}',
                                 '{"step": 5, "val_loss": "x"}'])
def test_a_bad_metrics_row_is_one_clear_error(row, trained_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join([lines[0], row, *lines[1:]]) + "\n")
    for argv in (["compare", str(run)], ["plot", str(run), "-o", str(tmp_path / "c.png")]):
        assert main(argv) == 2
        assert "metrics.jsonl line 2" in error_line(capsys)


def test_a_run_is_recognised_by_its_marker_not_its_file_names(trained_run, tmp_path):
    assert runs.is_run(trained_run)
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "config.json").write_text(json.dumps({"task": "mlm", "model": {}}))
    (fake / "model.safetensors").write_bytes(b"")
    assert not runs.is_run(fake)
    assert runs.foreign_files(fake) == ["config.json", "model.safetensors"]
