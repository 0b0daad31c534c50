"""One design for text and vision (issue 11): the import graph of docs/architecture.md holds, the README's
Python API block runs, one `mlpmixer.load` and `evaluate` serve every run, and every saved RNG state is
restored on resume."""

from __future__ import annotations

import ast
import json
import random
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import mlpmixer
from mlpmixer import checkpoints
from mlpmixer.cli import main

from conftest import TRAIN_ARGS

SRC = Path(mlpmixer.__file__).resolve().parent
README = SRC.parents[1] / "README.md"
ARCHITECTURE = SRC.parents[1] / "docs" / "architecture.md"

MODELS = ("layers", "fused", "attention", "mixers", "encoder", "text", "vision", "official", "resize")
TRAINING = ("train", "text_train", "vision_train", "study")
RUN_DIRECTORY = ("runs", "checkpoints")


def imports_of(path: Path) -> set[str]:
    """The mlpmixer modules ``path`` imports anywhere (also inside functions), as dotted names under mlpmixer."""
    package = ".".join(path.relative_to(SRC).with_suffix("").parts[:-1])
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".") if package else []
                base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
                module = ".".join([*base, *(node.module.split(".") if node.module else [])])
                names = [module] if node.module else [f"{module}.{a.name}".strip(".") for a in node.names]
                found.update(n.strip(".") for n in names)
            elif node.module and node.module.startswith("mlpmixer"):
                found.add(node.module.removeprefix("mlpmixer").strip("."))
        elif isinstance(node, ast.Import):
            found.update(a.name.removeprefix("mlpmixer").strip(".") for a in node.names if a.name.startswith("mlpmixer"))
    return {name.split(".")[0] if not name.startswith("data") else name for name in found}


def module_files() -> dict[str, Path]:
    return {".".join(p.relative_to(SRC).with_suffix("").parts): p for p in SRC.rglob("*.py")}


def test_the_import_helper_sees_function_level_and_relative_imports(tmp_path):
    assert "train" in imports_of(SRC / "text_train.py") and "runs" in imports_of(SRC / "hub.py")
    assert "text" in imports_of(SRC / "hub.py"), "an import inside a function counts"
    assert "data.text" in imports_of(SRC / "data" / "images.py") or "errors" in imports_of(SRC / "data" / "images.py")


@pytest.mark.parametrize("module", MODELS)
def test_models_never_import_the_training_loop(module):
    forbidden = set(imports_of(SRC / f"{module}.py")) & set(TRAINING)
    assert not forbidden, f"{module}.py imports {forbidden}: a model must not know how it is trained"


def test_the_data_layer_never_imports_run_directory_code_or_models():
    for name, path in module_files().items():
        if name.startswith("data."):
            bad = {m for m in imports_of(path) if m in RUN_DIRECTORY + TRAINING + MODELS}
            assert not bad, f"{name} imports {bad}: data knows no model and no run folder"


def test_every_module_is_in_the_architecture_doc():
    doc = ARCHITECTURE.read_text(encoding="utf-8")
    for name in module_files():
        if name.endswith("__init__") or name.endswith("__main__"):
            continue
        assert f"`{name.replace('.', '/')}.py`" in doc, f"{name} is missing from docs/architecture.md"


def python_api_block() -> str:
    text = README.read_text(encoding="utf-8")
    section = text.split("## Python API", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_python_api_block_runs(sonnet_file, tmp_path, monkeypatch, capsys):
    """The README's API example, as written, on tiny runs made by the real commands in runs/."""
    monkeypatch.chdir(tmp_path)
    text = tmp_path / "text.txt"  # the sonnet, and the characters the example's prompts use
    text.write_text(sonnet_file.read_text() + "To be, or not to be, that is the question.\nROMEO:\n" * 20)
    for task in ("mlm", "lm"):
        assert main(["train", task, "--text-file", str(text), *TRAIN_ARGS, "--out", f"runs/{task}"]) == 0
    assert main(["train", "vision", "--steps", "4", "--batch-size", "16", "--quiet", "--out", "runs/vision"]) == 0
    from sklearn.datasets import load_digits
    from PIL import Image

    Image.fromarray((load_digits().images[0] * 16).astype(np.uint8)).save(tmp_path / "digit.png")
    capsys.readouterr()
    block = python_api_block()
    assert "mlpmixer.load(" in block and "runs/vision" in block and "runs/lm" in block
    exec(compile(block, "README.md", "exec"), {})
    printed = capsys.readouterr().out
    assert printed.strip(), "the example prints its results"


@pytest.mark.parametrize("task", ["mlm", "lm", "vision"])
def test_one_load_for_every_run(task, sonnet_file, tmp_path):
    out = tmp_path / task
    if task == "vision":
        assert main(["train", "vision", "--steps", "2", "--batch-size", "16", "--quiet", "--out", str(out)]) == 0
    else:
        assert main(["train", task, "--text-file", str(sonnet_file), *TRAIN_ARGS, "--out", str(out)]) == 0
    model, extra = mlpmixer.load(out)
    assert not model.training
    if task == "vision":
        assert isinstance(model, mlpmixer.MlpMixer) and extra == [str(i) for i in range(10)]
    else:
        assert isinstance(model, mlpmixer.LanguageModel) and model.config.causal == (task == "lm")
        assert isinstance(extra, mlpmixer.CharTokenizer)
    other = "vision" if task != "vision" else "mlm"
    with pytest.raises(ValueError, match="holds a"):
        mlpmixer.load(out, task=other)


def test_save_pretrained_and_from_pretrained_for_text(trained_run, tmp_path):
    model, tok = mlpmixer.load(trained_run)
    model.save_pretrained(tmp_path / "saved", tokenizer=tok)
    again = mlpmixer.LanguageModel.from_pretrained(tmp_path / "saved")
    ids = tok.encode("Shall I compare")[None]
    assert torch.equal(model(ids), again(ids))
    assert sorted(p.name for p in (tmp_path / "saved").iterdir()) == ["config.json", "model.safetensors", "vocab.json"]
    loaded, tok2 = mlpmixer.load(tmp_path / "saved")
    assert tok2.itos == tok.itos and torch.equal(loaded(ids), model(ids))


def test_evaluate_reproduces_the_runs_last_validation_and_measures_new_text(trained_run, tmp_path, capsys):
    rows = [json.loads(line) for line in (trained_run / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in rows if "val_accuracy" in r][-1]
    assert main(["evaluate", str(trained_run), "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics == pytest.approx({k: last[k] for k in ("val_loss", "val_accuracy")}, rel=1e-6)
    new = tmp_path / "new.txt"
    new.write_text("Shall I compare thee to a summer's day? Thou art more lovely and more temperate.\n" * 10)
    assert main(["evaluate", str(trained_run), "--text-file", str(new), "--json"]) == 0
    other = json.loads(capsys.readouterr().out)
    assert 0.0 <= other["val_accuracy"] <= 1.0 and np.isfinite(other["val_loss"]) and other != metrics
    assert mlpmixer.evaluate(trained_run) == pytest.approx(metrics, rel=1e-6), "the same from Python"
    assert main(["evaluate", str(trained_run), "--data-dir", str(tmp_path)]) == 2
    assert "evaluate it on text with --text-file" in capsys.readouterr().err


def test_evaluate_a_vision_run_on_its_data_and_on_a_folder(tmp_path, capsys):
    from sklearn.datasets import load_digits
    from PIL import Image

    run = tmp_path / "v"
    assert main(["train", "vision", "--epochs", "2", "--quiet", "--out", str(run)]) == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in rows if "val_top1" in r][-1]
    capsys.readouterr()
    assert main(["evaluate", str(run), "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["val_top1"] == pytest.approx(last["val_top1"]) and metrics["val_top5"] >= metrics["val_top1"]
    digits = load_digits()
    for i in range(30):
        folder = tmp_path / "imgs" / str(digits.target[i])
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray((digits.images[i] * 16).astype(np.uint8)).save(folder / f"{i}.png")
    assert main(["evaluate", str(run), "--data-dir", str(tmp_path / "imgs"), "--json"]) == 0
    folder_metrics = json.loads(capsys.readouterr().out)
    assert 0.0 <= folder_metrics["val_top1"] <= folder_metrics["val_top5"] <= 1.0


def test_resume_restores_every_saved_rng_state(trained_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    state = torch.load(run / "trainer_state.pt", weights_only=True)
    random.seed(12345)
    np.random.seed(12345)
    model, _ = mlpmixer.load(run)
    opt, sched = __import__("mlpmixer.train", fromlist=["make_optimizer"]).make_optimizer(
        model, __import__("mlpmixer.train", fromlist=["TrainConfig"]).TrainConfig(), 32)
    checkpoints.load_trainer_state(run, model, opt, sched)
    assert list(random.getstate()[1]) == [int(x) for x in state["rng"]["python"]]
    assert np.array_equal(np.random.get_state()[1], state["rng"]["numpy"].numpy().astype(np.uint32))
    assert np.random.get_state()[2] == state["rng"]["numpy_pos"]
    assert torch.equal(torch.get_rng_state(), state["rng"]["torch"])
