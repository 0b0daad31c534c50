"""mlpmixer.optim.AdamW (its step with the gradient scaling and clipping, optim.cpp) against torch's
AdamW after `rescale_gradients`."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from mlpmixer import node, optim

built = pytest.mark.skipif(node.ops() is None, reason=f"no C++ library here: {node.status()}")


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(16, 40), torch.nn.GELU(), torch.nn.Linear(40, 8),
                               torch.nn.LayerNorm(8))


def _groups(model: torch.nn.Module) -> list[dict]:
    return [{"params": [p for p in model.parameters() if p.ndim >= 2], "weight_decay": 0.1},
            {"params": [p for p in model.parameters() if p.ndim < 2], "weight_decay": 0.0}]


def _backward(model: torch.nn.Module, step: int, skip_last: bool = False) -> None:
    x = torch.randn(32, 16, generator=torch.Generator().manual_seed(step)).to(model[0].weight.dtype)
    out = model[:3](x) if skip_last else model(x)
    (out.square().sum() * 50).backward()  # large: max_norm 1 clips


def _train(opt_class, steps: int, multiplier: float, max_norm: float, skip_last_until: int = 0,
           dtype: torch.dtype = torch.float32):
    """``steps`` steps of a small model in ``dtype``; the parameters after each step. Before
    ``skip_last_until`` the LayerNorm gets no gradient (torch's step skips it and makes no state for it)."""
    model = _model().to(dtype)
    opt = opt_class(_groups(model), lr=1e-2, fused=True)
    after = []
    for step in range(steps):
        _backward(model, step, skip_last=step < skip_last_until)
        if opt_class is optim.AdamW:
            opt.step(grad_multiplier=multiplier, max_norm=max_norm)
        else:
            optim.rescale_gradients(list(model.parameters()), multiplier, max_norm)
            opt.step()
        opt.zero_grad(set_to_none=True)
        after.append([p.detach().clone() for p in model.parameters()])
    return after


def _step(model: torch.nn.Module, opt: optim.AdamW, step: int) -> None:
    """One step of ``model`` with ``opt`` (multiplier 0.5, clipped to 1), the gradients then cleared."""
    _backward(model, step)
    opt.step(grad_multiplier=0.5, max_norm=1.0)
    opt.zero_grad()


def _max_difference(a, b) -> float:
    return max(float((x - y).abs().max()) for step_a, step_b in zip(a, b) for x, y in zip(step_a, step_b))


@built
def test_without_clipping_the_step_equals_torch_adamw_bit_for_bit():
    """The scaling is the same float32 products and the update torch's own fused kernel."""
    ours, reference = _train(optim.AdamW, 5, 0.25, 0.0), _train(torch.optim.AdamW, 5, 0.25, 0.0)
    assert _max_difference(ours, reference) == 0.0


@built
@pytest.mark.parametrize("multiplier, max_norm", [(0.25, 1.0), (3.0, 0.5), (1.0, 1e6)])
def test_with_clipping_the_gradients_are_clipped_as_torchs_and_the_update_is_torchs(multiplier, max_norm):
    """The step leaves the scaled and clipped gradients in .grad: equal to `rescale_gradients`' to the
    norm's rounding (float64 sums here, float32 in torch), and the update is torch's AdamW of exactly
    those gradients, bit for bit."""
    model, twin = _model(), _model()
    opt = optim.AdamW(_groups(model), lr=1e-2, fused=True)
    twin_opt = torch.optim.AdamW(_groups(twin), lr=1e-2, fused=True)
    for step in range(4):
        _backward(model, step), _backward(twin, step)
        optim.rescale_gradients(list(twin.parameters()), multiplier, max_norm)
        expected = [p.grad.clone() for p in twin.parameters()]
        opt.step(grad_multiplier=multiplier, max_norm=max_norm)
        for ours, reference in zip(model.parameters(), expected):
            torch.testing.assert_close(ours.grad, reference, rtol=1e-6, atol=0.0)
        for ours, theirs in zip(model.parameters(), twin.parameters()):
            theirs.grad.copy_(ours.grad)
        twin_opt.step()
        assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters())), step
        opt.zero_grad(), twin_opt.zero_grad()
    twin_norm = torch.linalg.vector_norm(torch.stack([e.norm() for e in expected]))
    assert (float(twin_norm) < max_norm * 1.0001) and (max_norm > 1e3 or float(twin_norm) > 0.99 * max_norm), \
        "the clipping is at work where max_norm is small and not where it is huge"


@built
def test_a_parameter_that_gets_its_first_gradient_later_is_stepped_as_torch_does():
    ours = _train(optim.AdamW, 5, 0.5, 1.0, skip_last_until=2)
    reference = _train(torch.optim.AdamW, 5, 0.5, 1.0, skip_last_until=2)
    assert _max_difference(ours, reference) < 1e-6
    assert torch.equal(ours[1][-1], _model()[3].bias.detach()), "no gradient, no step"


@built
def test_the_model_steps_through_the_cpp_operator():
    model = _model()
    opt = optim.AdamW(_groups(model), lr=1e-2, fused=True)
    for step in range(3):
        _backward(model, step)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            opt.step(grad_multiplier=0.5, max_norm=1.0)
        opt.zero_grad()
        counts = {e.key: e.count for e in prof.key_averages()}
        assert counts.get("mlpmixer::adamw_step") == 1
        # the first step finds no state: torch's own step (with the foreach norm) makes it
        assert ("aten::_foreach_norm" in counts) == (step == 0), step


@built
def test_a_loaded_state_dict_continues_exactly_as_the_original():
    """load_state_dict replaces the state: the operator's lists are made again from the loaded tensors. A
    copied optimiser (torch's __getstate__ keeps state and groups only) makes lists of its own."""
    model = _model()
    opt = optim.AdamW(_groups(model), lr=1e-2, fused=True)
    for step in range(3):
        _step(model, opt, step)
    twin = copy.deepcopy(model)
    twin_opt = optim.AdamW(_groups(twin), lr=1e-2, fused=True)
    twin_opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # (loading shares same-dtype tensors)
    clone = copy.deepcopy(opt)
    for step in range(3, 6):
        for m, o in ((model, opt), (twin, twin_opt)):
            _step(m, o, step)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters()))
    assert twin_opt.state_dict()["state"][0]["step"].item() == 6
    assert clone._lists is None or clone._lists is not opt._lists


def test_without_the_cpp_library_the_step_is_torchs(monkeypatch):
    monkeypatch.setattr(node, "_ops", None)
    monkeypatch.setattr(node, "_status", "Python (test)")
    ours, reference = _train(optim.AdamW, 4, 0.5, 1.0), _train(torch.optim.AdamW, 4, 0.5, 1.0)
    assert _max_difference(ours, reference) == 0.0


def test_float16_gradient_scaling_and_a_closure_take_torchs_step():
    """With found_inf set (float16's GradScaler) the step is skipped as torch's is; a closure is called."""
    model = _model()
    opt = optim.AdamW(_groups(model), lr=1e-2, fused=True)
    _backward(model, 0)
    opt.step()
    before = [p.detach().clone() for p in model.parameters()]
    _backward(model, 1)
    opt.found_inf = torch.ones(())
    opt.step(grad_multiplier=0.5, max_norm=1.0)
    del opt.found_inf
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters())), "an inf was found: no update"
    calls = []

    def closure():
        calls.append(1)
        return torch.zeros(())

    opt.step(closure)
    assert calls == [1]


def test_parameters_the_operator_does_not_take_get_torchs_step():
    """float64 parameters (as any off the CPU or not float32): torch's own step, bit for bit."""
    ours = _train(optim.AdamW, 3, 0.5, 1.0, dtype=torch.float64)
    assert _max_difference(ours, _train(torch.optim.AdamW, 3, 0.5, 1.0, dtype=torch.float64)) == 0.0
