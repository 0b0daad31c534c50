"""End to end: `mlpmixer train vision` on a small budget, then `mlpmixer predict`, and bad inputs."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from mlpmixer.checkpoints import write_json
from mlpmixer.cli import main
from mlpmixer.data.images import load_digits
from mlpmixer.vision import MlpMixer

TINY = ["--steps", "12", "--batch-size", "32", "--eval-every", "6", "--log-every", "3", "--quiet"]


@pytest.fixture(scope="module")
def vision_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "vision"
    assert main(["train", "vision", *TINY, "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def digit_png(tmp_path_factory):
    """A validation digit as an 8-bit greyscale PNG, and its label."""
    val = load_digits().val
    path = tmp_path_factory.mktemp("images") / "digit.png"
    Image.fromarray((val.images[0, 0].numpy() * 255).round().astype(np.uint8)).save(path)
    return path, int(val.labels[0])


def test_train_vision_writes_a_run(vision_run):
    assert {"config.json", "model.safetensors", "metrics.jsonl", "trainer_state.pt"} <= {p.name for p in vision_run.iterdir()}
    rows = [json.loads(line) for line in (vision_run / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in rows if "val_top1" in r]
    assert [r["step"] for r in val] == [6, 12]
    for r in val:
        assert {"epoch", "step", "val_loss", "val_top1"} <= r.keys() and 0 <= r["val_top1"] <= 1
    assert val[-1]["epoch"] == pytest.approx(12 / (1437 // 32), abs=1e-3)
    saved = json.loads((vision_run / "config.json").read_text())
    assert saved["task"] == "vision" and saved["class_names"] == [str(i) for i in range(10)]
    assert saved["model"]["patch_size"] == 2 and saved["train"]["optimizer"] == "adamw"
    assert MlpMixer.from_pretrained(vision_run).config.num_classes == 10


def test_predict_prints_classes_and_probabilities(vision_run, digit_png, capsys):
    path, _ = digit_png
    assert main(["predict", str(vision_run), str(path), str(path), "--top-k", "3"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith(f"{path}: ")
    ranked = [item.split() for item in lines[0].split(": ", 1)[1].split(", ")]
    probs = [float(p) for _, p in ranked]
    assert len(ranked) == 3 and probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1.001
    assert all(name in [str(i) for i in range(10)] for name, _ in ranked)


def test_fine_tune_from_a_run_at_twice_the_resolution(vision_run, tmp_path, digit_png, capsys):
    out = tmp_path / "ft"
    assert main(["train", "vision", "--init", str(vision_run), "--img-size", "16", "--steps", "2", "--batch-size",
                 "32", "--quiet", "--out", str(out)]) == 0
    model = MlpMixer.from_pretrained(out)
    assert model.config.img_size == 16 and model.blocks[0].mlp_tokens.fc1.weight.shape == (4 * 32, 64)
    assert main(["predict", str(out), str(digit_png[0])]) == 0  # the 8x8 PNG is resized to 16x16


def test_bad_inputs_are_one_line_errors(vision_run, tmp_path, capsys):
    (tmp_path / "notes.png").write_text("not an image")
    assert main(["predict", str(vision_run), str(tmp_path / "notes.png")]) == 2
    assert "is not a readable image" in capsys.readouterr().err
    write_json(tmp_path / "mlm" / "config.json", {"task": "mlm", "model": {}})
    assert main(["predict", str(tmp_path / "mlm"), str(tmp_path / "notes.png")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mlpmixer: error: ") and "not a vision model" in err and len(err.splitlines()) == 1
    assert main(["predict", str(tmp_path / "empty"), str(tmp_path / "notes.png")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["train", "vision", "--img-size", "9", *TINY, "--out", str(tmp_path / "r")]) == 2
    assert "image size 9x9 is not divisible by the patch size 2" in capsys.readouterr().err
    assert main(["train", "vision", "--data-dir", str(tmp_path / "nothing"), *TINY, "--out", str(tmp_path / "r")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_image_folder_training_with_mixup_and_prediction(tmp_path, capsys):
    from test_images import write_folder

    root = write_folder(tmp_path / "data", per_class=3, size=(12, 9))
    out = tmp_path / "run"
    assert main(["train", "vision", "--model", "mixer_tiny_digits", "--data-dir", str(root), "--img-size", "8",
                 "--steps", "3", "--batch-size", "4", "--mixup-alpha", "0.4", "--quiet", "--out", str(out)]) == 0
    saved = json.loads((out / "config.json").read_text())
    assert saved["class_names"] == ["ant", "cat"] and saved["model"]["in_chans"] == 3
    assert saved["preprocess"]["crop_pct"] == 0.875 and saved["data"]["data_dir"] == str(root)
    capsys.readouterr()
    assert main(["predict", str(out), str(root / "val" / "cat" / "0.jpg")]) == 0
    names = [item.split()[0] for item in capsys.readouterr().out.split(": ", 1)[1].split(", ")]
    assert sorted(names) == ["ant", "cat"]  # --top-k 5 is capped at the 2 classes


def test_smoothed_targets_and_mixup():
    import torch

    from mlpmixer.vision_train import mixup, smoothed_targets

    t = smoothed_targets(torch.tensor([0, 2]), 4, 0.1)
    assert torch.allclose(t.sum(-1), torch.ones(2)) and t[0, 0] == pytest.approx(0.925) and t[0, 1] == pytest.approx(0.025)
    x = torch.arange(4.0).view(4, 1)
    targets = smoothed_targets(torch.arange(4), 4, 0.0)
    mixed, mixed_t = mixup(x, targets, 0.4, torch.Generator().manual_seed(0))
    again, _ = mixup(x, targets, 0.4, torch.Generator().manual_seed(0))
    assert torch.equal(mixed, again) and torch.allclose(mixed_t.sum(-1), torch.ones(4))
    assert torch.allclose(mixed.squeeze(1), mixed_t @ torch.arange(4.0))  # images and targets mixed alike
    assert not torch.equal(mixed, x)
