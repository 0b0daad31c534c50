"""The fast paths equal the plain computations they replace, and the fast dropout has dropout's statistics.

- `fused.mlp` (one autograd node, σ(h) kept or recomputed for backward, dropout folded into the bias and W2)
  against nn.Linear → σ → mask → nn.Linear under ordinary autograd, forward and every gradient;
- `fused.residual_mlp` (x + drop(MLP(LN(x))) as one node, Eq. 1 and Eq. 2) against the block's modules,
  fp32 and bf16 autocast, with dropout, causal, shorter sequences; which blocks take it;
- sequence-first blocks and vision model against their batch-first forms;
- gradient checkpointing against no checkpointing (dropout and drop-path replayed exactly);
- `Dropout`: drop fraction, unbiased mean, independence of neighbours (also the four 16-bit lanes of
  one 64-bit draw), gradient = mask · scale, identity in eval.
No timings here: benchmarks/ measures speed.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import run_python
from mlpmixer import MixerBlock, Mlp, MlpMixer, TokenMixingMlp, allocator, fused
from mlpmixer.fused import ACT_FORWARD, dropped_value, mlp
from mlpmixer.layers import Dropout, activation_fn
from mlpmixer.vision import VisionConfig

ACTS = sorted(ACT_FORWARD)


def plain_mlp(x, w1, b1, w2, b2, act, left, keep=None, scale=1.0):
    """The textbook computation: two affine maps, σ between, optional inverted-dropout keep mask."""
    h = w1 @ x + b1[:, None] if left else x @ w1.t() + b1
    g = activation_fn(act)(h)
    if keep is not None:
        g = g * keep * scale
    return w2 @ g + b2[:, None] if left else g @ w2.t() + b2


def leaves(*shapes, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=dtype).requires_grad_() for s in shapes]


def grads(out, inputs, seed=1):
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    return torch.autograd.grad((out * weights).sum(), inputs)


def mlp_shapes(left, k=7, m=11, hidden=5, out=None):
    out = out or k
    x = (k, m) if left else (m, k)
    return [x, (hidden, k), (hidden,), (out, hidden), (out,)]


@pytest.fixture(params=["kept", "recomputed"])
def activation_storage(request, monkeypatch):
    """Both ways the fused node gets σ(h) back in backward: kept from forward (small), recomputed (large)."""
    monkeypatch.setattr(fused, "KEEP_ACTIVATION_BYTES", 1 << 40 if request.param == "kept" else 0)
    monkeypatch.setattr(allocator, "keeping", lambda: request.param == "kept")
    return request.param


@pytest.mark.parametrize("left", [True, False])
@pytest.mark.parametrize("act", ACTS)
def test_fused_mlp_equals_plain_autograd(act, left, activation_storage):
    inputs = leaves(*mlp_shapes(left))
    fused_out = mlp(*inputs, act, left)
    plain_out = plain_mlp(*inputs, act, left)
    torch.testing.assert_close(fused_out, plain_out, rtol=1e-12, atol=1e-12)
    for a, b in zip(grads(fused_out, inputs), grads(plain_out, inputs)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dropout", [None, 0.5])
@pytest.mark.parametrize("m", [1, 3])
@pytest.mark.parametrize("left", [True, False])
def test_fused_mlp_never_writes_into_its_inputs(left, m, dropout, activation_storage):
    """With one column the broadcast bias is already contiguous: it must still be copied, not accumulated into."""
    inputs = leaves(*mlp_shapes(left, k=1, m=m, hidden=1))
    before = [t.detach().clone() for t in inputs]
    drop = Dropout(dropout).train() if dropout else None
    for _ in range(2):
        mlp(*inputs, "gelu", left, dropout=drop).sum().backward()
    for t, b in zip(inputs, before):
        assert torch.equal(t.detach(), b)


@pytest.mark.parametrize("left", [True, False])
def test_fused_mlp_passes_gradcheck(left, activation_storage):
    inputs = leaves(*mlp_shapes(left, k=4, m=3, hidden=6))
    assert torch.autograd.gradcheck(lambda *t: mlp(*t, "gelu", left), inputs)


@pytest.mark.parametrize("left", [True, False])
@pytest.mark.parametrize("act", ACTS)
def test_fused_dropout_equals_masking_the_activation(act, left, activation_storage):
    """Same seed, same mask: the bias trick and W2 · 1/(1 − p') give exactly dropout(σ(h))."""
    drop = Dropout(0.3).train()
    inputs = leaves(*mlp_shapes(left, k=6, m=40, hidden=9))
    hidden_shape = torch.Size((9, 40) if left else (40, 9))
    torch.manual_seed(5)
    fused_out = mlp(*inputs, act, left, dropout=drop)
    torch.manual_seed(5)
    keep = drop.indicator(hidden_shape, torch.float64, dropped=False)
    assert 0 < keep.sum() < keep.numel()
    plain_out = plain_mlp(*inputs, act, left, keep=keep, scale=drop.scale)
    torch.testing.assert_close(fused_out, plain_out, rtol=1e-12, atol=1e-12)
    for a, b in zip(grads(fused_out, inputs), grads(plain_out, inputs)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("act", ACTS)
def test_dropped_units_are_exactly_zero_with_zero_slope(act, dtype):
    """σ(v + h) = 0 and σ'(v + h) = 0 at the dropped value v, for pre-activations far beyond any real one."""
    h = torch.tensor([-300.0, -1.0, 0.0, 1.0, 300.0, 3000.0], dtype=dtype) + dropped_value(dtype)
    h.requires_grad_()
    y = ACT_FORWARD[act](h)
    y.backward(torch.ones_like(y))
    assert (y == 0).all() and (h.grad == 0).all() and torch.isfinite(h.grad).all()


def test_fused_mlp_under_bf16_autocast_multiplies_in_bf16_and_keeps_fp32_gradients():
    inputs = leaves(*mlp_shapes(False, k=16, m=32, hidden=24), dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = mlp(*inputs, "gelu", False)
    assert out.dtype == torch.bfloat16
    reference = plain_mlp(*inputs, "gelu", False)
    torch.testing.assert_close(out.float(), reference, rtol=0.05, atol=0.1)
    for grad, leaf in zip(grads(out.float(), inputs), inputs):
        assert grad.dtype == torch.float32 and grad.shape == leaf.shape


# --- the modules that use it ------------------------------------------------------------------------

def token_mixer_reference(mixer: TokenMixingMlp, x):
    """Eq. 1 the slow way: transpose to (B, D, N), two nn.Linear-style products, transpose back."""
    n = x.shape[1]
    w1, b1, w2, b2 = mixer.weights(n)
    h = activation_fn(mixer.activation)(F.linear(x.transpose(1, 2), w1, b1))
    return F.linear(h, w2, b2).transpose(1, 2)


@pytest.mark.parametrize("layout", ["seq_first_view", "batch_first"])
@pytest.mark.parametrize("n, causal", [(8, False), (5, False), (8, True)])
def test_token_mixing_fast_paths_equal_the_reference(layout, n, causal):
    torch.manual_seed(0)
    mixer = TokenMixingMlp(8, 8 if causal else 12, causal=causal).double()
    xs = torch.randn(n, 3, 4, dtype=torch.float64)
    x = (xs.transpose(0, 1) if layout == "seq_first_view" else xs.transpose(0, 1).contiguous()).requires_grad_()
    assert x.transpose(0, 1).is_contiguous() == (layout == "seq_first_view")
    ref_x = x.detach().clone().requires_grad_()
    got, want = mixer(x), token_mixer_reference(mixer, ref_x)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    params = list(mixer.parameters())
    for a, b in zip(grads(got, [x, *params]), grads(want, [ref_x, *params])):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_channel_mlp_equals_linear_gelu_linear():
    torch.manual_seed(0)
    m = Mlp(6, 10).double()
    x = torch.randn(4, 3, 6, dtype=torch.float64, requires_grad=True)
    got, want = m(x), m.fc2(F.gelu(m.fc1(x)))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    params = list(m.parameters())
    for a, b in zip(grads(got, [x, *params]), grads(want, [x, *params])):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_residual_dropout_add_equals_x_plus_masked_branch():
    drop = Dropout(0.25).train()
    x, branch = leaves((5, 3, 8), (5, 3, 8))
    torch.manual_seed(3)
    got = drop.add_to(x, branch)
    torch.manual_seed(3)
    want = x + branch * drop.mask(branch.shape, branch.dtype)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for a, b in zip(grads(got, [x, branch]), grads(want, [x, branch])):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def block_pair(dropout=0.0):
    torch.manual_seed(0)
    block = MixerBlock(6, TokenMixingMlp(5, 7, dropout=dropout), 9, dropout=dropout).double()
    return block, torch.randn(3, 5, 6, dtype=torch.float64)


def test_sequence_first_block_equals_batch_first_block_and_gradients():
    block, x = block_pair()
    xb = x.clone().requires_grad_()
    xs = x.transpose(0, 1).contiguous().requires_grad_()
    out_b, out_s = block(xb), block.forward_seq_first(xs).transpose(0, 1)
    torch.testing.assert_close(out_s, out_b, rtol=1e-12, atol=1e-12)
    params = list(block.parameters())
    gb, gs = grads(out_b, [xb, *params]), grads(out_s, [xs, *params])
    torch.testing.assert_close(gs[0].transpose(0, 1), gb[0], rtol=1e-12, atol=1e-12)
    for a, b in zip(gs[1:], gb[1:]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_block_with_dropout_equals_the_plain_formula_with_the_same_masks():
    """x + m1·T(LN(x)) then + m2·C(LN(·)), the masks drawn in the block's order (token hidden, branch, ...)."""
    block, x = block_pair(dropout=0.2)
    block.train()
    xs = x.transpose(0, 1).contiguous()
    torch.manual_seed(11)
    got = block.forward_seq_first(xs)
    torch.manual_seed(11)
    d, t, c = block.drop, block.mlp_tokens, block.mlp_channels
    n, b, ch = xs.shape
    keep_t = d.indicator(torch.Size((7, b * ch)), xs.dtype, dropped=False)
    h = activation_fn("gelu")(t.fc1.weight @ block.norm1(xs).reshape(n, b * ch) + t.fc1.bias[:, None])
    mixed = (t.fc2.weight @ (h * keep_t * d.scale) + t.fc2.bias[:, None]).view(n, b, ch)
    u = xs + mixed * d.mask(mixed.shape, xs.dtype)
    keep_c = d.indicator(torch.Size((n * b, 9)), xs.dtype, dropped=False)
    hc = activation_fn("gelu")(c.fc1(block.norm2(u))).reshape(n * b, 9)
    branch = c.fc2(hc * keep_c * d.scale).view(n, b, ch)
    want = u + branch * d.mask(branch.shape, xs.dtype)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def tiny_vision(**overrides) -> MlpMixer:
    torch.manual_seed(0)
    config = VisionConfig(patch_size=2, hidden_dim=8, tokens_mlp_dim=6, channels_mlp_dim=12, num_blocks=3,
                          num_classes=5, img_size=8, in_chans=2, **overrides)
    return MlpMixer(config).double()


def test_vision_sequence_first_equals_batch_first_blocks():
    model = tiny_vision()
    torch.nn.init.normal_(model.head.weight)
    x = torch.randn(4, 2, 8, 8, dtype=torch.float64)
    tokens = model.stem(x)  # (B, S, C)
    for block in model.blocks:
        tokens = block(tokens)  # the batch-first form, one transpose copy in and out per block
    want = model.norm(tokens)
    got = model.forward_features(x)
    assert got.shape == want.shape == (4, 16, 8)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(model(x), model.head(want.mean(1)), rtol=1e-12, atol=1e-12)


def test_grad_checkpointing_gives_the_same_gradients_with_dropout_and_drop_path():
    results = []
    for enable in (False, True):
        model = tiny_vision(dropout=0.2, drop_path=0.3).train()
        torch.nn.init.normal_(model.head.weight)
        model.set_grad_checkpointing(enable)
        x = torch.randn(4, 2, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        torch.manual_seed(7)
        out = model(x)
        out.square().sum().backward()
        results.append((out.detach(), [p.grad.clone() for p in model.parameters()]))
    (out0, g0), (out1, g1) = results
    torch.testing.assert_close(out1, out0, rtol=0, atol=0)
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_grad_checkpointing_is_off_by_default_and_inactive_without_grad():
    model = tiny_vision()
    assert model.grad_checkpointing is False
    model.set_grad_checkpointing()
    with torch.no_grad():
        assert model(torch.randn(2, 2, 8, 8, dtype=torch.float64)).shape == (2, 5)


# --- dropout statistics -----------------------------------------------------------------------------

N = 1 << 22  # 4M draws: the standard error of a fraction near 0.1 is 1.5e-4


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dropout_drop_fraction_is_p(p):
    drop = Dropout(p).train()
    torch.manual_seed(0)
    dropped = drop.indicator(torch.Size((N,)), torch.float32, dropped=True)
    assert set(dropped.unique().tolist()) <= {0.0, 1.0}
    exact = drop.threshold / 65536
    assert abs(exact - p) <= 2 ** -17
    assert abs(dropped.mean().item() - exact) < 5 * math.sqrt(exact * (1 - exact) / N)


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_is_unbiased(p):
    drop = Dropout(p).train()
    torch.manual_seed(1)
    x = torch.full((N,), 3.0, dtype=torch.float64)
    out = drop(x)
    kept = out != 0
    torch.testing.assert_close(out[kept], torch.full_like(out[kept], 3.0 * drop.scale))
    sd = 3.0 * drop.scale * math.sqrt(drop.threshold / 65536 * (1 - drop.threshold / 65536) / N)
    assert abs(out.mean().item() - 3.0) < 5 * sd


def test_dropout_neighbours_are_independent():
    """Lags 1–3 fall inside one 64-bit draw (its four 16-bit lanes), lag 4 and 5 across draws."""
    drop = Dropout(0.3).train()
    torch.manual_seed(2)
    d = drop.indicator(torch.Size((N,)), torch.float64, dropped=True)
    p = drop.threshold / 65536
    for lag in (1, 2, 3, 4, 5, 64):
        both = (d[:-lag] * d[lag:]).mean().item()
        assert abs(both - p * p) < 5 * math.sqrt(p * p * (1 - p * p) / (N - lag)), lag
    lanes = d.view(-1, 4)  # one row per 64-bit draw: all 16 patterns of four lanes at their product rates
    codes = (lanes * torch.tensor([1.0, 2.0, 4.0, 8.0], dtype=torch.float64)).sum(1).long()
    counts = torch.bincount(codes, minlength=16).double()
    k = torch.tensor([bin(c).count("1") for c in range(16)], dtype=torch.float64)
    expected = len(codes) * p ** k * (1 - p) ** (4 - k)
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    assert chi2 < 45.0  # 15 degrees of freedom: P(chi2 > 45) ≈ 1e-4


def test_dropout_gradient_is_the_mask_times_the_scale_and_eval_is_identity():
    drop = Dropout(0.4).train()
    x = torch.randn(1000, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(4)
    out = drop(x)
    out.backward(torch.ones_like(out))
    torch.manual_seed(4)
    mask = drop.mask(x.shape, x.dtype)
    assert set(mask.unique().tolist()) == {0.0, drop.scale}
    torch.testing.assert_close(x.grad, mask, rtol=0, atol=0)
    torch.testing.assert_close(out, x * mask, rtol=0, atol=0)
    drop.eval()
    assert drop(x) is x
    assert Dropout(0.0).train()(x) is x


def test_dropout_is_reproducible_from_the_seed():
    drop = Dropout(0.5).train()
    torch.manual_seed(9)
    a = drop.indicator(torch.Size((1001,)), torch.float32, dropped=True)
    torch.manual_seed(9)
    b = drop.indicator(torch.Size((1001,)), torch.float32, dropped=True)
    assert torch.equal(a, b) and not torch.equal(a, drop.indicator(torch.Size((1001,)), torch.float32, True))


def test_allocator_leaves_an_explicit_malloc_setting_alone(monkeypatch):
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "1000000")
    assert allocator._apply() == "malloc as set by MALLOC_*_THRESHOLD_"
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_")
    monkeypatch.setenv("LD_PRELOAD", "/usr/lib/libjemalloc.so.2")
    assert allocator._apply() == "malloc from LD_PRELOAD"


def test_a_small_activation_is_kept_only_where_malloc_keeps_freed_memory(monkeypatch):
    seen = []
    real = torch.autograd.function.FunctionCtx.save_for_backward
    monkeypatch.setattr(torch.autograd.function.FunctionCtx, "save_for_backward",
                        lambda ctx, *t: (seen.append(len(t)), real(ctx, *t))[1])
    for keeping in (False, True):
        monkeypatch.setattr(allocator, "keeping", lambda: keeping)
        mlp(*leaves(*mlp_shapes(True)), "gelu", True)
    assert seen == [4, 5]  # x, W1, W2, h (+ σ(h))


def test_allocator_setting_is_made_once_and_said():
    said = allocator.keep_freed_memory()
    assert said == allocator.keep_freed_memory()
    assert "glibc" in said or "unchanged" in said or "MALLOC" in said or "LD_PRELOAD" in said
    assert allocator.keeping() == ("keeps freed memory" in said)  # the flag says what the message says


def _block_run(block, xs, fuse: bool, dtype=None, seed=3):
    """Output and gradients of ``block.forward_seq_first`` with `fused.residual_mlp` on or off."""
    block.zero_grad(set_to_none=True)
    x = xs.clone().requires_grad_()
    fusable = MixerBlock._fusable
    try:
        if not fuse:
            MixerBlock._fusable = lambda self, xs: False
        torch.manual_seed(seed)  # the same dropout keys, drawn in the same order, on both paths
        with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            y = block.forward_seq_first(x)
        y.float().pow(2).sum().backward()
    finally:
        MixerBlock._fusable = fusable
    return y.detach(), x.grad, {n: p.grad for n, p in block.named_parameters()}


@pytest.mark.skipif(not fused.kernels.supports_dtype(torch.float32), reason="no compiled kernels here")
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("n", [12, 9])
def test_each_residual_branch_as_one_node_equals_the_modules(training, causal, n):
    torch.manual_seed(0)
    block = MixerBlock(32, TokenMixingMlp(12, 12 if causal else 20, dropout=0.1, causal=causal), 48, dropout=0.1)
    block.train(training)
    xs = torch.randn(n, 5, 32)  # (N, B, D), sequence-first
    calls = []
    real = fused.residual_mlp
    fused.residual_mlp = lambda *a, **k: (calls.append(a[-3]), real(*a, **k))[1]  # records ``left``
    try:
        got = _block_run(block, xs, fuse=True)
    finally:
        fused.residual_mlp = real
    want = _block_run(block, xs, fuse=False)
    assert calls == [True, False]  # Eq. 1, then Eq. 2
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1], want[1], rtol=1e-4, atol=1e-5)
    for name, grad in want[2].items():
        torch.testing.assert_close(got[2][name], grad, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.skipif(not fused.kernels.supports_dtype(torch.bfloat16), reason="no compiled kernels here")
def test_each_residual_branch_as_one_node_under_bf16_autocast_keeps_fp32_results_and_gradients():
    torch.manual_seed(0)
    block = MixerBlock(32, TokenMixingMlp(12, 20, dropout=0.1), 48, dropout=0.1).train()
    xs = torch.randn(12, 5, 32)
    got, want = _block_run(block, xs, True, torch.bfloat16), _block_run(block, xs, False, torch.bfloat16)
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.float32
    assert all(g.dtype == torch.float32 for g in got[2].values())
    # the two paths differ only where a float32 LayerNorm rounds to another bfloat16 neighbour
    torch.testing.assert_close(got[0], want[0], rtol=0.02, atol=0.02)
    for name, grad in want[2].items():
        assert (got[2][name] - grad).norm() <= 0.02 * grad.norm() + 1e-6, name


def test_padding_stochastic_depth_and_other_mixers_take_the_modules_path():
    from mlpmixer.attention import SelfAttention
    xs = torch.randn(12, 5, 32)
    plain = MixerBlock(32, TokenMixingMlp(12, 20), 48).train()
    assert plain._fusable(xs) == fused.kernels.supports(xs)
    assert not MixerBlock(32, TokenMixingMlp(12, 20), 48, drop_path=0.1).train()._fusable(xs)
    assert MixerBlock(32, TokenMixingMlp(12, 20), 48, drop_path=0.1).eval()._fusable(xs) == fused.kernels.supports(xs)
    assert not MixerBlock(32, SelfAttention(32, 4), 48)._fusable(xs)
    assert not MixerBlock(24, TokenMixingMlp(12, 20), 48)._fusable(torch.randn(12, 5, 24))  # 24 % 16 != 0
    assert not plain._fusable(xs.double())
    calls = []
    real = fused.residual_mlp
    fused.residual_mlp = lambda *a, **k: (calls.append(1), real(*a, **k))[1]
    try:
        plain.forward_seq_first(xs, torch.zeros(5, 12, dtype=torch.bool))  # a padding mask: the modules
    finally:
        fused.residual_mlp = real
    assert calls == []


HUGE = """
import torch
from mlpmixer import allocator
said = allocator.keep_freed_memory()
tensors = [torch.ones(1 << 20) for _ in range(16)]  # 64 MiB of float32 from the heap
rollup = open("/proc/self/smaps_rollup").read()
huge = int(rollup.split("AnonHugePages:")[1].split()[0])
print(said)
print(huge)
"""


def test_the_training_heap_sits_on_transparent_huge_pages_where_the_kernel_allows():
    setting = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if not setting.exists() or "[never]" in setting.read_text() or not Path("/proc/self/smaps_rollup").exists():
        pytest.skip("no transparent huge pages on this machine")
    on = run_python(HUGE)
    said, huge = on.stdout.strip().splitlines()
    if "glibc" not in said:
        pytest.skip(f"not glibc's malloc here: {said}")
    assert "heap in transparent huge pages" in said and int(huge) >= 32 << 10, on.stdout + on.stderr  # KiB
    off = run_python(HUGE, MLPMIXER_HUGE_PAGES="0")
    said, huge = off.stdout.strip().splitlines()
    assert said.endswith("heap pages unchanged (MLPMIXER_HUGE_PAGES=0)") and "keeps freed memory" in said
