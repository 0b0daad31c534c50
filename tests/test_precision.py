"""--precision and --compile on the CPU: bf16 autocast trains, fp16 is refused clearly, compile runs."""

from __future__ import annotations

import json
import math

import pytest
import torch

from mlpmixer.cli import main

TINY = ["--seq-len", "16", "--d-model", "32", "--n-layers", "1", "--d-ff", "32", "--tokens-mlp-dim", "16",
        "--batch-size", "8", "--eval-every", "4", "--log-every", "2", "--quiet"]


def _rows(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("task", ["mlm", "lm"])
def test_bf16_autocast_trains_on_the_cpu(sonnet_file, tmp_path, task):
    run = tmp_path / "bf16"
    assert main(["train", task, "--text-file", str(sonnet_file), "--steps", "8", "--precision", "bf16",
                 "--out", str(run), *TINY]) == 0
    rows = _rows(run)
    assert all(math.isfinite(r.get("loss", r.get("val_loss"))) for r in rows)
    assert json.loads((run / "config.json").read_text())["train"]["precision"] == "bf16"
    # the weights stay float32 (autocast changes the compute dtype, not the parameters)
    from safetensors.torch import load_file
    assert all(t.dtype == torch.float32 for t in load_file(str(run / "model.safetensors")).values())


def test_bf16_is_close_to_fp32_on_the_same_weights(tiny_mlm_config):
    from mlpmixer import MaskedLanguageModel

    model = MaskedLanguageModel(tiny_mlm_config()).eval()
    ids = torch.randint(2, 20, (4, 12))
    reference = model(ids)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = model(ids).float()
    assert (low - reference).abs().max() < 0.1 * reference.abs().max()
    assert not torch.equal(low, reference), "autocast really ran in bf16"


def test_fp16_on_the_cpu_is_a_clear_error(sonnet_file, tmp_path, capsys):
    code = main(["train", "mlm", "--text-file", str(sonnet_file), "--steps", "2", "--precision", "fp16",
                 "--out", str(tmp_path / "r"), *TINY])
    err = capsys.readouterr().err
    assert code == 2 and "fp16 needs a CUDA device" in err and "Traceback" not in err


@pytest.mark.slow
def test_compile_trains_and_matches_eager_closely(sonnet_file, tmp_path):
    pytest.importorskip("torch._inductor", reason="torch.compile's inductor backend is not available")
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    base = ["train", "mlm", "--text-file", str(sonnet_file), "--steps", "3", "--dropout", "0", *TINY]
    assert main([*base, "--out", str(eager)]) == 0
    assert main([*base, "--compile", "--out", str(compiled)]) == 0
    a = [r["loss"] for r in _rows(eager) if "loss" in r]
    b = [r["loss"] for r in _rows(compiled) if "loss" in r]
    assert a == pytest.approx(b, rel=1e-3)
