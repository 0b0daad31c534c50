"""The training loop: config, Noam and AdamW schedules, exact resume, validation, and that it learns."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from mlpmixer import MaskedLanguageModel, load
from mlpmixer.text_train import TextSource, resume_mlm, train_mlm
from mlpmixer.mlm import SAMPLE_PROMPTS
from mlpmixer.train import TrainConfig, make_optimizer, rescale_gradients

TINY_MODEL = dict(seq_len=16, d_model=32, n_layers=1, d_ff=32, tokens_mlp_dim=16)


def noam(step: int, d_model: int, warmup: int, factor: float = 1.0) -> float:
    t = step + 1
    return factor * d_model ** -0.5 * min(t ** -0.5, t * warmup ** -1.5)


# --- config --------------------------------------------------------------------------------------------

def test_train_config_defaults_are_the_seed_experiment():
    c = TrainConfig()
    assert (c.optimizer, c.lr, c.warmup, c.grad_clip, c.batch_size) == ("noam", 1.0, 2000, 1.0, 64)


@pytest.mark.parametrize("field, value", [
    ("steps", 0), ("batch_size", 0), ("eval_every", 0), ("log_every", -1), ("ckpt_every", 0),
    ("optimizer", "sgd"), ("precision", "fp8"), ("lr", 0.0), ("warmup", -1), ("grad_clip", -1.0),
])
def test_train_config_rejects_bad_values(field, value):
    with pytest.raises(ValueError) as err:
        TrainConfig(**{field: value})
    assert field in str(err.value)


def test_train_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        TrainConfig().steps = 1


# --- schedules -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("d_model, warmup, factor", [(128, 2000, 1.0), (32, 10, 2.0)])
def test_noam_schedule_values(d_model, warmup, factor):
    model = torch.nn.Linear(4, 4)
    opt, sched = make_optimizer(model, TrainConfig(lr=factor, warmup=warmup), d_model)
    assert opt.param_groups[0]["betas"] == (0.9, 0.999)
    seen = []
    for step in range(3 * warmup if warmup < 100 else 50):
        lr = opt.param_groups[0]["lr"]  # the rate of optimiser step `step` (0-based)
        assert lr == pytest.approx(noam(step, d_model, warmup, factor), rel=1e-12), step
        seen.append(lr)
        opt.step()
        sched.step()
    if warmup < 100:
        peak = max(range(len(seen)), key=seen.__getitem__)
        assert peak == warmup - 1, "the peak is at t = warmup"
        assert seen[peak] == pytest.approx(factor * d_model ** -0.5 * warmup ** -0.5)


def test_noam_spot_values():
    # hand-computed: d_model 128, warmup 2000 -> t=1: 128^-0.5 · 2000^-1.5; t=2000: 128^-0.5 · 2000^-0.5
    assert noam(0, 128, 2000) == pytest.approx(1 / math.sqrt(128) / 2000 ** 1.5)
    model = torch.nn.Linear(2, 2)
    opt, sched = make_optimizer(model, TrainConfig(), 128)
    assert opt.param_groups[0]["lr"] == pytest.approx(1 / math.sqrt(128) / 2000 ** 1.5, rel=1e-12)
    for _ in range(1999):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(1 / math.sqrt(128) / math.sqrt(2000), rel=1e-12)
    for _ in range(2000):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(1 / math.sqrt(128) / math.sqrt(4000), rel=1e-12)


def test_adamw_warmup_then_cosine():
    model = torch.nn.Linear(4, 4)
    config = TrainConfig(optimizer="adamw", lr=1e-3, warmup=10, steps=110, weight_decay=0.1)
    opt, sched = make_optimizer(model, config, 4)
    lrs = []
    for _ in range(110):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert lrs[10] == pytest.approx(1e-3)
    assert lrs[60] == pytest.approx(0.5e-3)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:])), "cosine decays monotonically"
    assert lrs[-1] < 1e-6
    decays = sorted(g["weight_decay"] for g in opt.param_groups)
    assert decays == [0.0, 0.1], "biases and norms are exempt from weight decay"


# --- fit --------------------------------------------------------------------------------------------------

def run(text_file, out, steps=20, **train):
    config = TrainConfig(**{"steps": steps, "batch_size": 8, "eval_every": 10, "log_every": 5, "warmup": 10,
                            "device": "cpu", **train})
    return train_mlm({**TINY_MODEL, "dropout": 0.2}, config, TextSource(text_file=str(text_file)), out, quiet=True)


def test_fit_writes_metrics_and_returns_eval_mode_validation(sonnet_file, tmp_path):
    out = tmp_path / "run"
    metrics = run(sonnet_file, out)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    val_rows = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in train_rows] == [5, 10, 15, 20]
    assert [r["step"] for r in val_rows] == [10, 20]
    for r in train_rows:
        # the rate of the row's last step (t = step) or of the next one (t = step + 1, get_last_lr())
        assert r["lr"] == pytest.approx(noam(r["step"], 32, 10)) or r["lr"] == pytest.approx(noam(r["step"] - 1, 32, 10))
        assert r["tokens_per_s"] > 0 and 0.0 <= r["accuracy"] <= 1.0 and math.isfinite(r["loss"])
    elapsed = [r["elapsed_s"] for r in train_rows]
    assert elapsed == sorted(elapsed)
    assert metrics == {k: val_rows[-1][k] for k in ("val_loss", "val_accuracy")}
    # validation ran in eval mode (no dropout) with fixed masks: the saved model reproduces it exactly
    model, tok = load(out)
    from mlpmixer.data.windows import split_train_val
    from mlpmixer.mlm import MLMTask
    ids = tok.encode(sonnet_file.read_text(encoding="utf-8"))
    train_ids, val_ids = split_train_val(ids)
    task = MLMTask(train_ids, val_ids, tok, 16, 8, 0, torch.device("cpu"))
    assert task.summarise(task.evaluate_sums(model.eval())) == pytest.approx(metrics, rel=1e-6)
    model.train()
    assert task.summarise(task.evaluate_sums(model)) != pytest.approx(metrics, rel=1e-6), "dropout 0.2 would change the figures"


def test_resume_repeats_an_uninterrupted_run(sonnet_file, tmp_path):
    straight = tmp_path / "straight"
    run(sonnet_file, straight, steps=30)
    part = tmp_path / "part"
    run(sonnet_file, part, steps=20)
    resume_mlm(part, changes={"steps": 30}, quiet=True)
    a, _ = load(straight)
    b, _ = load(part)
    for (k, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(x, y, rtol=0, atol=0, msg=k)
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("elapsed_s", "tokens_per_s")} for r in rows]
    read = lambda d: [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
    assert strip(read(part)) == strip(read(straight))


def test_a_tiny_mlm_learns(tmp_path):
    """On a periodic text every character is fixed by its neighbours, so masked characters can be
    recovered only by mixing tokens; a tiny model must get nearly all of them within 300 steps."""
    alphabet = "".join(sorted(set("".join(SAMPLE_PROMPTS))))  # every sample-prompt character
    path = tmp_path / "periodic.txt"
    path.write_text(alphabet * 200, encoding="utf-8")
    config = TrainConfig(steps=300, batch_size=16, warmup=30, eval_every=300, log_every=25, device="cpu")
    metrics = train_mlm({**TINY_MODEL, "dropout": 0.0, "token_mixer": "mlp"}, config,
                        TextSource(text_file=str(path)), tmp_path / "run", quiet=True)
    assert metrics["val_accuracy"] > 0.9, metrics
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["accuracy"] < 0.5, "it starts by guessing"


class NaNTask:
    """A task whose loss turns non-finite at step 3."""

    name = "nan"
    best_metric = ("val_loss", False)

    def describe(self):
        return "four numbers"

    def batch(self, step, generator):
        return step

    def loss(self, model, batch, generator):
        y = model(torch.ones(2, 4)).mean()
        return (y * float("nan") if batch == 2 else y), {"correct": torch.tensor(0), "count": torch.tensor(1)}

    def evaluate_sums(self, model, rank, world):
        return {"loss": 0.0, "correct": 0.0, "count": 1.0}

    def summarise(self, sums):
        return {"val_loss": sums["loss"] / sums["count"]}

    def report(self, model, step):
        return None

    def tokens_per_batch(self, batch):
        return 1

    def epoch(self, step):
        return 0.0


def test_non_finite_loss_stops_the_run(tmp_path):
    from mlpmixer.train import NonFiniteLoss, fit

    with pytest.raises(NonFiniteLoss, match="step 3"):
        fit(torch.nn.Linear(4, 4), NaNTask(), TrainConfig(steps=10, device="cpu"), tmp_path, d_model=4,
            run_config={}, quiet=True)
    assert isinstance(NonFiniteLoss("x"), RuntimeError), "the CLI turns it into one line"


def test_gradients_are_clipped(tmp_path, monkeypatch):
    from mlpmixer.train import fit

    from mlpmixer import optim

    norms = []
    real = optim.AdamW.step

    def spy(self, *args, **kwargs):  # the gradients the optimiser stepped with (it leaves them in .grad)
        out = real(self, *args, **kwargs)
        norms.append(float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for g in self.param_groups
                                                                 for p in g["params"]]))))
        return out

    monkeypatch.setattr(optim.AdamW, "step", spy)

    class Finite(NaNTask):
        def loss(self, model, batch, generator):
            return model(torch.ones(2, 4)).mean() * 1e6, {"correct": torch.tensor(0), "count": torch.tensor(1)}

    model = torch.nn.Linear(4, 4)
    fit(model, Finite(), TrainConfig(steps=3, device="cpu"), tmp_path, d_model=4, run_config={}, quiet=True)
    assert norms == pytest.approx([1.0, 1.0, 1.0], rel=1e-5), "clipped from ~1e6 to --grad-clip 1.0"


@pytest.mark.parametrize("scale, max_norm", [(0.25, 0.0), (0.25, 1.0), (0.25, 100.0), (3.0, 0.5)])
def test_rescale_gradients_is_a_scaling_then_clip_grad_norm(scale, max_norm):
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.zeros(*shape)) for shape in ((5, 3), (7,), (2, 2, 2))]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)
    expected = [p.grad * scale for p in params]
    if max_norm:
        reference = [torch.nn.Parameter(torch.zeros_like(p)) for p in params]
        for r, e in zip(reference, expected):
            r.grad = e.clone()
        torch.nn.utils.clip_grad_norm_(reference, max_norm)
        expected = [r.grad for r in reference]
    rescale_gradients(params + [torch.nn.Parameter(torch.zeros(3))], scale, max_norm)  # one without a gradient
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.grad, e, rtol=1e-6, atol=1e-7)


def test_the_optimiser_is_fused_adamw_where_torch_has_it():
    """The fused kernel (one pass per tensor) on the CPU; its steps equal the multi-tensor form's."""
    model = torch.nn.Linear(8, 4)
    opt, _ = make_optimizer(model, TrainConfig(optimizer="adamw", lr=1e-2, warmup=0, weight_decay=0.1), 8)
    assert opt.defaults["fused"]
    twin = torch.nn.Linear(8, 4)
    twin.load_state_dict(model.state_dict())
    groups = [{"params": [twin.weight], "weight_decay": 0.1}, {"params": [twin.bias], "weight_decay": 0.0}]
    reference = torch.optim.AdamW(groups, lr=1e-2, foreach=True)
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(0))
    for _ in range(5):
        for m, o in ((model, opt), (twin, reference)):
            m(x).square().mean().backward()
            o.step()
            o.zero_grad()
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_thread_choice(monkeypatch):
    """--threads or OMP_NUM_THREADS as asked; else the cores that other processes leave idle now."""
    from mlpmixer import train as train_module
    from mlpmixer.distributed import Dist

    big = torch.nn.Linear(4, 4)
    cpu = Dist(rank=0, world=1, device=torch.device("cpu"))
    monkeypatch.setattr(train_module.os, "cpu_count", lambda: 4)
    assert train_module.choose_threads(3, big, cpu) == (3, "--threads")
    assert train_module.choose_threads(0, big, cpu) == (torch.get_num_threads(), "OMP_NUM_THREADS")
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert train_module.choose_threads(0, big, Dist(rank=0, world=2, device=torch.device("cpu")))[0] == 2
    for busy, expected in ((0.0, 4), (0.6, 4), (1.0, 3), (2.9, 1), (4.0, 1)):
        monkeypatch.setattr(train_module, "busy_cores", lambda: busy)
        assert train_module.choose_threads(0, big, cpu)[0] == expected, busy

