"""Run directories: safetensors weights, config.json, trainer state, metrics.jsonl."""

from __future__ import annotations

import json

import pytest
import torch

from mlpmixer import MaskedLanguageModel
from mlpmixer import checkpoints as ck
from mlpmixer import runs


def test_weights_round_trip(tmp_path, tiny_mlm_config):
    model = MaskedLanguageModel(tiny_mlm_config())
    ck.save_weights(model, tmp_path / "model.safetensors")
    other = MaskedLanguageModel(tiny_mlm_config())
    assert not torch.equal(other.head.weight, model.head.weight)
    ck.load_weights(other, tmp_path / "model.safetensors")
    for (k, a), b in zip(model.state_dict().items(), other.state_dict().values()):
        assert torch.equal(a, b), k
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"], "no temporary files left"


def test_mismatched_weights_are_one_clear_error(tmp_path, tiny_mlm_config):
    ck.save_weights(MaskedLanguageModel(tiny_mlm_config(d_model=24, n_heads=4)), tmp_path / "model.safetensors")
    with pytest.raises(ck.CheckpointError, match="mis-shaped"):
        ck.load_weights(MaskedLanguageModel(tiny_mlm_config()), tmp_path / "model.safetensors")
    ck.save_weights(MaskedLanguageModel(tiny_mlm_config(n_layers=1)), tmp_path / "model.safetensors")
    with pytest.raises(ck.CheckpointError, match="missing"):
        ck.load_weights(MaskedLanguageModel(tiny_mlm_config()), tmp_path / "model.safetensors")


def test_truncated_or_missing_weights(tmp_path, tiny_mlm_config):
    model = MaskedLanguageModel(tiny_mlm_config())
    with pytest.raises(ck.CheckpointError, match="no model.safetensors"):
        ck.load_weights(model, tmp_path / "model.safetensors")
    ck.save_weights(model, tmp_path / "model.safetensors")
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ck.CheckpointError, match="truncated"):
        ck.load_weights(model, tmp_path / "model.safetensors")


def test_json_helpers(tmp_path):
    ck.write_json(tmp_path / "config.json", {"a": 1, "b": [1, 2]})
    assert ck.read_json(tmp_path / "config.json") == {"a": 1, "b": [1, 2]}
    with pytest.raises(ck.CheckpointError, match="no missing.json"):
        ck.read_json(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ck.CheckpointError, match="not valid JSON"):
        ck.read_json(tmp_path / "bad.json")


def test_metrics_log_truncates_on_resume_and_skips_cut_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    log = runs.MetricsLog(path)
    for step in (5, 10, 15, 20):
        log.write({"step": step, "loss": 1.0 / step, "accuracy": 0.5, "tokens_per_s": 100.0})
    with open(path, "a") as f:
        f.write('{"step": 25, "lo')  # a line cut short by a crash
    assert [r["step"] for r in runs.read_metrics(path)] == [5, 10, 15, 20]
    runs.MetricsLog(path, truncate_after=10)
    assert [r["step"] for r in runs.read_metrics(path)] == [5, 10]
    runs.MetricsLog(path)  # a fresh run starts an empty log
    assert runs.read_metrics(path) == []
    assert all(json.loads(line) for line in path.read_text().splitlines() if line)


def test_trainer_state_keeps_the_metrics_summed_since_the_last_row(tmp_path, tiny_mlm_config):
    # a checkpoint between two logged rows: the resumed run's next row must sum the same steps
    model = MaskedLanguageModel(tiny_mlm_config())
    opt = torch.optim.Adam(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    sums = {"loss": 12.345678901234567, "correct": 17.0, "count": 40.0}
    ck.save_trainer_state(tmp_path, model, opt, sched, 15, sums)
    got: dict = {}
    assert ck.load_trainer_state(tmp_path, model, opt, sched, got) == 15 and got == sums
    ck.save_trainer_state(tmp_path, model, opt, sched, 16)  # none saved: nothing restored
    got = {}
    assert ck.load_trainer_state(tmp_path, model, opt, sched, got) == 16 and got == {}


def test_trainer_state_refuses_pickled_objects(tmp_path, tiny_mlm_config):
    model = MaskedLanguageModel(tiny_mlm_config())
    opt = torch.optim.Adam(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    ck.save_trainer_state(tmp_path, model, opt, sched, 7)
    assert ck.load_trainer_state(tmp_path, model, opt, sched) == 7

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"step": 1, "evil": Evil()}, tmp_path / "trainer_state.pt")
    with pytest.raises(ck.CheckpointError, match="refused"):
        ck.load_trainer_state(tmp_path, model, opt, sched)
