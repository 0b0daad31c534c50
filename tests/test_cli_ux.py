"""The command line as users of HF Trainer, timm and nanoGPT expect it (issue 12): a start summary, a
warm-up warning, an end line with the next command, greedy generation, --device on inference commands,
the best checkpoint, help without doubled defaults or markup, typo suggestions, the records in
config.json, plots into the run folder, and black-on-white digits handled on predict."""

from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from mlpmixer.cli import main

from conftest import TRAIN_ARGS

VISION = ["--steps", "24", "--batch-size", "32", "--eval-every", "8", "--log-every", "4", "--quiet"]


def test_start_summary_warm_up_warning_and_next_command(sonnet_file, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "mlm", "--text-file", str(sonnet_file), *TRAIN_ARGS, "--out", str(out)]) == 0
    captured = capsys.readouterr()
    err, stdout = captured.err, captured.out
    assert "training mlm: " in err and " parameters, " in err and "training characters" in err
    assert "steps 0 -> 20" in err and "device cpu" in err and "thread(s)" in err and f"run folder {out}" in err
    assert "mlpmixer: warning: --warmup 2000 is not shorter than the run (--steps 20)" in err
    assert f"next: mlpmixer fill {out} " in stdout


def test_no_warm_up_warning_when_the_warm_up_fits(sonnet_file, tmp_path, capsys):
    assert main(["train", "mlm", "--text-file", str(sonnet_file), *TRAIN_ARGS, "--warmup", "5",
                 "--out", str(tmp_path / "run")]) == 0
    assert "warm-up" not in capsys.readouterr().err.split("run folder")[1]


def test_config_records_the_environment(trained_run):
    config = json.loads((trained_run / "config.json").read_text())
    env = config["environment"]
    assert env["device"] == "cpu" and config["train"]["device"] == "auto", "the device used, beside the one asked"
    assert env["threads"] >= 1 and env["world_size"] == 1
    assert env["torch"] == torch.__version__ and env["mlpmixer"] == config["mlpmixer_version"]
    package = __import__("mlpmixer").__path__[0]
    inside_git = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=package)
    if inside_git.returncode:
        assert env["git_commit"] is None
    else:  # a commit of this checkout (HEAD may have moved on since the session's run was made)
        assert len(env["git_commit"]) == 40
        assert subprocess.run(["git", "cat-file", "-e", f"{env['git_commit']}^{{commit}}"], cwd=package).returncode == 0


def test_threads_flag_on_every_train_command(sonnet_file, tmp_path, capsys):
    for task in ("mlm", "lm"):
        out = tmp_path / task
        assert main(["train", task, "--text-file", str(sonnet_file), *TRAIN_ARGS, "--threads", "2",
                     "--out", str(out)]) == 0
        assert json.loads((out / "config.json").read_text())["environment"]["threads"] == 2
        assert "2 thread(s) (--threads)" in capsys.readouterr().err
    assert main(["train", "vision", "--steps", "2", "--batch-size", "16", "--threads", "2", "--quiet",
                 "--out", str(tmp_path / "v")]) == 0
    assert json.loads((tmp_path / "v" / "config.json").read_text())["environment"]["threads"] == 2


def test_generate_temperature_zero_is_greedy_and_inputs_are_checked_first(sonnet_file, tmp_path, capsys):
    run = tmp_path / "lm"
    assert main(["train", "lm", "--text-file", str(sonnet_file), *TRAIN_ARGS, "--out", str(run)]) == 0
    capsys.readouterr()
    outputs = []
    for seed in ("1", "2"):
        assert main(["generate", str(run), "--prompt", "Shall", "--temperature", "0", "--max-new-chars", "30",
                     "--seed", seed]) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1] and outputs[0].startswith("Shall") and len(outputs[0].strip()) == 35
    assert main(["generate", str(run), "--prompt", "Shall", "--temperature", "-1"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "--temperature must be a finite number >= 0" in captured.err
    assert main(["generate", str(run), "--prompt", "Sh\u00e9", "--max-new-chars", "3"]) == 2
    assert capsys.readouterr().out == "", "nothing is printed before the inputs are checked"


@pytest.mark.parametrize("command", ["fill", "generate", "predict"])
def test_inference_commands_take_a_device(command, trained_run, tmp_path, capsys):
    argv = {"fill": ["fill", str(trained_run), "Shall I compare th_e"],
            "generate": ["generate", str(trained_run)],
            "predict": ["predict", str(trained_run), str(tmp_path / "x.png")]}[command]
    if command == "fill":
        assert main([*argv, "--device", "cpu"]) == 0
    if not torch.cuda.is_available():
        assert main([*argv, "--device", "cuda"]) == 2
        assert "no CUDA device is available; use --device cpu" in capsys.readouterr().err
    assert main([*argv, "--device", "tpu9"]) == 2
    assert "--device" in capsys.readouterr().err


def test_vision_takes_tensorboard(tmp_path, capsys):
    out = tmp_path / "v"
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        assert main(["train", "vision", *VISION, "--tensorboard", "--out", str(out)]) == 2
        assert "--tensorboard needs the tensorboard package" in capsys.readouterr().err
    else:
        assert main(["train", "vision", *VISION, "--tensorboard", "--out", str(out)]) == 0
        assert (out / "tensorboard").is_dir()


def test_vision_keeps_the_best_checkpoint(tmp_path, capsys):
    out = tmp_path / "v"
    assert main(["train", "vision", *VISION, "--out", str(out)]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in rows if "val_top1" in r]
    best = max(val, key=lambda r: r["val_top1"])
    with safe_open(str(out / "model_best.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["metric"] == "val_top1" and float(meta["value"]) == best["val_top1"]
    assert int(meta["step"]) == min(r["step"] for r in val if r["val_top1"] == best["val_top1"])


def test_best_checkpoint_is_the_best_validation_step(sonnet_file, tmp_path):
    out = tmp_path / "run"
    assert main(["train", "mlm", "--text-file", str(sonnet_file), *TRAIN_ARGS, "--eval-every", "5",
                 "--out", str(out)]) == 0
    val = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if "val_accuracy" in line]
    with safe_open(str(out / "model_best.safetensors"), "pt") as f:
        meta = f.metadata()
    assert float(meta["value"]) == max(r["val_accuracy"] for r in val)


def test_help_has_no_doubled_defaults_and_no_markup(capsys):
    for argv in (["train", "mlm"], ["train", "lm"], ["train", "vision"], ["study"], ["fill"], ["generate"],
                 ["predict"], ["plot"]):
        assert main([*argv, "--help"]) == 0
        text = capsys.readouterr().out
        assert "(default: None)" not in text and "``" not in text, argv
        assert not any(line.count("(default") > 1 for line in text.splitlines()), argv
    assert main(["--help"]) == 0
    assert "compare token mixers: same budget, seeds, schedules" in capsys.readouterr().out, "not cut off"


@pytest.mark.parametrize("argv, suggestion", [
    (["train", "mlm", "--stepz", "5"], "did you mean '--steps'?"),
    (["train", "vision", "--epoch", "5"], "did you mean '--epochs'?"),
    (["fill", "RUN", "x_", "--top_k", "3"], "did you mean '--top-k'?"),
    (["study", "mlm", "--seed", "2"], "did you mean '--seeds'?"),
])
def test_a_mistyped_option_gets_the_closest_one(argv, suggestion, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert suggestion in err and len(err.strip().splitlines()) == 1, err
    assert f"see: mlpmixer {argv[0]}" in err


def test_plot_writes_into_the_first_run_by_default(trained_run, tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    monkeypatch.chdir(tmp_path)
    assert main(["plot", str(run)]) == 0
    assert (run / "curves.png").read_bytes()[:4] == b"\x89PNG" and not (tmp_path / "curves.png").exists()


def test_predict_inverts_black_on_white_digits(tmp_path, capsys):
    from sklearn.datasets import load_digits

    out = tmp_path / "v"
    assert main(["train", "vision", "--epochs", "4", "--quiet", "--out", str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["preprocess"]["background"] == "dark"
    digits = load_digits()
    paths, inverted = [], []
    for i in range(20):
        image = (digits.images[i] / 16.0 * 255).astype(np.uint8)
        Image.fromarray(image).resize((32, 32), Image.NEAREST).save(tmp_path / f"{i}.png")
        Image.fromarray(255 - image).resize((32, 32), Image.NEAREST).save(tmp_path / f"{i}-inv.png")
        paths.append(str(tmp_path / f"{i}.png"))
        inverted.append(str(tmp_path / f"{i}-inv.png"))
    capsys.readouterr()
    assert main(["predict", str(out), *paths, "--top-k", "1"]) == 0
    plain = [line.split(": ")[1].split()[0] for line in capsys.readouterr().out.splitlines()]
    assert main(["predict", str(out), *inverted, "--top-k", "1"]) == 0
    captured = capsys.readouterr()
    flipped = [line.split(": ")[1].split()[0] for line in captured.out.splitlines()]
    assert flipped == plain, "a black-on-white digit is classified as its white-on-black original"
    assert captured.err.count("inverted it to match") == 20
    assert sum(p == str(t) for p, t in zip(plain, digits.target[:20])) >= 14


def test_inference_commands_take_a_shipped_runs_name(tmp_path, capsys):
    from sklearn.datasets import load_digits

    assert main(["fill", "shakespeare-mlm", "To be, or not to b_"]) == 0
    assert capsys.readouterr().out.startswith("To be, or not to b")
    assert main(["generate", "shakespeare-lm", "--max-new-chars", "10", "--temperature", "0"]) == 0
    assert len(capsys.readouterr().out.strip()) >= len("ROMEO:")
    Image.fromarray((load_digits().images[0] / 16 * 255).astype(np.uint8)).save(tmp_path / "zero.png")
    assert main(["predict", "digits", str(tmp_path / "zero.png"), "--top-k", "1"]) == 0
    assert capsys.readouterr().out.split(": ")[1].startswith("0 ")
    assert main(["evaluate", "digits", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["val_top1"] > 0.9
