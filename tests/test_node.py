"""The residual-MLP node's C++ bodies (mlpmixer.node, node.cpp) against fused.py's Python bodies."""

from __future__ import annotations

import contextlib
import itertools

import pytest
import torch

from conftest import broken_compiler, run_python
from mlpmixer import allocator, fused, kernels, node
from mlpmixer.layers import Dropout

built = pytest.mark.skipif(node.ops() is None, reason=f"no C++ node here: {node.status()}")


def _branch(native: bool, left: bool, dropout: bool, branch_dropout: bool, bf16: bool, activation: str,
            monkeypatch) -> list[torch.Tensor]:
    """One residual branch, forward and backward from seed 0: its output and every gradient."""
    monkeypatch.setattr(node, "_ops", node.ops() if native else None)
    monkeypatch.setattr(node, "_status", "test")
    torch.manual_seed(0)
    n, b, d, hidden = 32, 4, 32, 64
    x = torch.randn(n, b, d, requires_grad=True)
    norm_w, norm_b = (1 + 0.1 * torch.randn(d)).requires_grad_(), (0.1 * torch.randn(d)).requires_grad_()
    w1 = (0.2 * torch.randn(hidden, n if left else d)).requires_grad_()
    b1 = (0.1 * torch.randn(hidden)).requires_grad_()
    w2 = (0.2 * torch.randn(n if left else d, hidden)).requires_grad_()
    b2 = (0.1 * torch.randn(n if left else d)).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        out = fused.residual_mlp(x, (norm_w, norm_b, 1e-5), w1, b1, w2, b2, activation, left,
                                 Dropout(0.1) if dropout else None, Dropout(0.2) if branch_dropout else None)
    out.backward(torch.randn_like(out))
    return [out.detach()] + [t.grad for t in (x, norm_w, norm_b, w1, b1, w2, b2)]


@built
@pytest.mark.parametrize("left", [True, False])
@pytest.mark.parametrize("bf16", [True, False])
@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh", "relu", "silu"])
@pytest.mark.parametrize("keep", [True, False])
def test_the_cpp_node_equals_the_python_bodies_bit_for_bit(left, bf16, activation, keep, monkeypatch):
    monkeypatch.setattr(allocator, "keeping", lambda: keep)  # σ(h) kept for backward, or recomputed there
    for dropout, branch_dropout in itertools.product([True, False], repeat=2):
        ours = _branch(True, left, dropout, branch_dropout, bf16, activation, monkeypatch)
        python = _branch(False, left, dropout, branch_dropout, bf16, activation, monkeypatch)
        names = ["output", "x", "norm weight", "norm bias", "W1", "b1", "W2", "b2"]
        assert [n for n, a, b in zip(names, ours, python) if not torch.equal(a, b)] == [], (dropout, branch_dropout)
        assert all(g.dtype == torch.float32 for g in ours[1:])


@built
def test_the_cpp_node_is_what_the_model_runs_and_it_learns():
    """A training step of the MLM goes through the C++ operators (counted by the profiler) and lowers
    the loss."""
    from mlpmixer import MaskedLanguageModel, MLMConfig
    from mlpmixer.text import mlm_loss_of
    from mlpmixer.mlm import mask_tokens

    torch.manual_seed(0)
    model = MaskedLanguageModel(MLMConfig(vocab_size=20, seq_len=16, d_model=32, n_layers=2, d_ff=64,
                                          tokens_mlp_dim=32)).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ids = torch.randint(2, 20, (16, 16))
    losses = []
    with torch.profiler.profile() as prof:
        for _ in range(20):
            inputs, labels = mask_tokens(ids, mask_id=1, vocab_size=20, special_ids=(0, 1),
                                         generator=torch.Generator().manual_seed(len(losses)))
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = mlm_loss_of(model, inputs, labels)[0]
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
    calls = {e.key: e.count for e in prof.key_averages()}
    assert calls.get("mlpmixer::residual_mlp") == 20 * 2 * 2  # 2 layers × (token + channel branch) per step
    assert calls.get("torch::autograd::CppNode<(anonymous namespace)::ResidualMlp>") == 20 * 2 * 2  # backward
    assert sum(losses[-5:]) < sum(losses[:5])


STATUS = "from mlpmixer import node; print(node.status())"


def test_without_the_cpp_node_the_python_bodies_run(tmp_path):
    off = run_python(STATUS, MLPMIXER_NODE="0", timeout=300)
    assert off.returncode == 0 and off.stdout.strip() == "Python (MLPMIXER_NODE=0)"
    no_kernels = run_python(STATUS, MLPMIXER_KERNELS="0", timeout=300)
    assert no_kernels.stdout.strip() == "Python (the compiled kernels are not available)"
    if kernels.library() is None:
        return
    none = run_python(STATUS, CXX=str(tmp_path / "no-such-cxx"), MLPMIXER_CACHE_DIR=str(tmp_path / "c1"), timeout=300)
    assert none.returncode == 0 and none.stdout.startswith("Python (no C++ compiler"), none.stdout + none.stderr
    bad = broken_compiler(tmp_path / "bad-cxx")
    broken = run_python(STATUS, CXX=str(bad), MLPMIXER_CACHE_DIR=str(tmp_path / "c2"), timeout=300)
    assert broken.returncode == 0 and broken.stdout.startswith("Python (the C++ node could not be built"), broken.stdout
    assert "building the C++ residual node" in broken.stderr
    assert sorted(p.name for p in (tmp_path / "c2").iterdir() if p.name.startswith(".node")) == []  # no temporary left


@built
def test_inputs_the_operators_do_not_take_go_through_the_python_bodies():
    """A direct call with an x that `fused.fusable` refuses (here not contiguous) must not reach the C++
    operator, which reads x's memory as contiguous: its result is the Python bodies'."""
    torch.manual_seed(0)
    x = torch.randn(4, 32, 32).transpose(0, 1)  # (N, B, D) = (32, 4, 32), not contiguous
    assert not fused.fusable(x)
    w = (torch.ones(32), torch.zeros(32), 1e-5)
    w1, b1, w2, b2 = 0.2 * torch.randn(64, 32), torch.zeros(64), 0.2 * torch.randn(32, 64), torch.zeros(32)
    with torch.profiler.profile() as prof:
        got = fused.residual_mlp(x, w, w1, b1, w2, b2, "gelu", True)
    assert "mlpmixer::residual_mlp" not in {e.key for e in prof.key_averages()}
    torch.testing.assert_close(got, fused.residual_mlp(x.contiguous(), w, w1, b1, w2, b2, "gelu", True))


@built
@pytest.mark.parametrize("bf16", [True, False])
def test_the_node_under_no_grad_and_inference_mode_gives_the_training_forward(bf16):
    """No graph (no_grad: the autograd kernel records nothing; inference_mode: the CPU kernel, forward
    alone): the same output, from the same dropout draws."""
    torch.manual_seed(0)
    x = torch.randn(32, 4, 32, requires_grad=True)
    w = (1 + 0.1 * torch.randn(32), 0.1 * torch.randn(32), 1e-5)
    w1, b1, w2, b2 = (0.2 * torch.randn(64, 32), torch.zeros(64), 0.2 * torch.randn(32, 64), torch.zeros(32))

    def run(mode):
        torch.manual_seed(1)
        with mode, torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            return fused.residual_mlp(x, w, w1, b1, w2, b2, "gelu", True, Dropout(0.1), Dropout(0.2))

    training = run(contextlib.nullcontext())
    assert training.requires_grad
    for mode in (torch.no_grad(), torch.inference_mode()):
        out = run(mode)
        assert not out.requires_grad and torch.equal(out, training.detach())


@built
def test_the_nodes_backward_refuses_to_be_differentiated():
    torch.manual_seed(0)
    x = torch.randn(32, 4, 32, requires_grad=True)
    w = (torch.ones(32), torch.zeros(32), 1e-5)
    out = fused.residual_mlp(x, w, 0.2 * torch.randn(64, 32), torch.zeros(64), 0.2 * torch.randn(32, 64),
                             torch.zeros(32), "gelu", True)
    with pytest.raises(RuntimeError, match="not differentiable"):
        torch.autograd.grad(out.square().sum(), x, create_graph=True)
