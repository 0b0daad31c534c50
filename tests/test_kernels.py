"""The compiled dropout kernels (mlpmixer.kernels) against their torch reference, and the fallback."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import broken_compiler, run_python
from mlpmixer import kernels
from mlpmixer.layers import Dropout

compiled = pytest.mark.skipif(kernels.library() is None, reason=f"no compiled kernels here: {kernels.status()}")
DTYPES = (torch.float32, torch.bfloat16)
KEYS = (0, 1, 2**64 - 1, 0x0123456789ABCDEF)


def splitmix64_word(key: int, w: int) -> int:
    """SplitMix64's output at position w + 1 from ``key``, in Python integers (the published algorithm)."""
    m = (1 << 64) - 1
    z = (key + (w + 1) * 0x9E3779B97F4A7C15) & m
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & m
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & m
    return z ^ (z >> 31)


@pytest.mark.parametrize("key", KEYS)
def test_torch_lanes_are_splitmix64_words_in_16_bit_lanes(key):
    n = 4 * 37 + 3
    want = [(splitmix64_word(key, e // 4) >> (16 * (e % 4))) & 0xFFFF for e in range(n)]
    assert kernels.lanes(key, n).tolist() == want


def test_splitmix64_reference_matches_a_published_value():
    # SplitMix64 seeded with 1234567: first output 6457827717110365317 (Vigna's splitmix64.c)
    assert splitmix64_word(1234567, 0) == 6457827717110365317


@compiled
@pytest.mark.parametrize("n", [1, 3, 4, 5, 1023, 1024, 1025, 4099, 70001])
@pytest.mark.parametrize("key", KEYS)
def test_compiled_lanes_equal_the_torch_reference(n, key):
    assert torch.equal(kernels.compiled_lanes(key, n), kernels.lanes(key, n))


def test_lanes_are_uniform_and_independent():
    u = kernels.lanes(12345, 1 << 22).double()
    n = u.numel()
    assert abs(u.mean().item() - 32767.5) < 5 * 65536 / math.sqrt(12 * n)
    for t in (656, 6554, 32768, 58982):  # p = 0.01, 0.1, 0.5, 0.9
        p = t / 65536
        assert abs((u < t).double().mean().item() - p) < 5 * math.sqrt(p * (1 - p) / n)
    c = (u - u.mean()) / u.std()
    for lag in (1, 2, 3, 4, 5):  # neighbours inside a word (1-3) and across words
        assert abs((c[:-lag] * c[lag:]).mean().item()) < 5 / math.sqrt(n)
    other = kernels.lanes(12346, 1 << 22).double()
    assert abs(((other - other.mean()) / other.std() * c).mean().item()) < 5 / math.sqrt(n)


def _keep(key: int, shape, threshold: int) -> torch.Tensor:
    return (kernels.lanes(key, math.prod(shape)) >= threshold).view(shape)


@compiled
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("per_row", [True, False])
@pytest.mark.parametrize("shape", [(37, 1030), (128, 256), (3, 5)])
def test_dropout_bias_equals_torch(dtype, per_row, shape):
    rows, cols = shape
    bias = torch.randn(rows if per_row else cols).to(dtype)
    got = kernels.dropout_bias(bias, rows, cols, per_row, 77, 6554, -1e9)
    hit = (~_keep(77, shape, 6554)).to(dtype)
    want = torch.add(bias[:, None] if per_row else bias, hit, alpha=-1e9)
    assert got.dtype == dtype and torch.equal(got, want)


@compiled
@pytest.mark.parametrize("dtypes", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                    (torch.float32, torch.bfloat16)])
def test_dropout_add_and_mul_equal_torch(dtypes):
    xdt, bdt = dtypes
    x, branch = torch.randn(5, 40001).to(xdt), torch.randn(5, 40001).to(bdt)
    scale = 1 / (1 - 6554 / 65536)
    keep = _keep(99, x.shape, 6554)
    got = kernels.dropout_add(x, branch, 99, 6554, scale)
    assert got.dtype == xdt and torch.equal(got, torch.addcmul(x, branch, keep.to(bdt), value=scale))
    got = kernels.dropout_mul(branch, 99, 6554, scale)
    assert torch.equal(got, branch.mul(keep.to(bdt)).mul_(scale))


@compiled
def test_results_do_not_depend_on_the_thread_count():
    threads = torch.get_num_threads()
    x, bias = torch.randn(300, 700), torch.randn(700)
    try:
        torch.set_num_threads(1)
        one = (kernels.dropout_bias(bias, 300, 700, False, 5, 30000, -1e9), kernels.dropout_mul(x, 5, 30000, 2.0))
        torch.set_num_threads(2)
        two = (kernels.dropout_bias(bias, 300, 700, False, 5, 30000, -1e9), kernels.dropout_mul(x, 5, 30000, 2.0))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(one, two))


@compiled
@pytest.mark.parametrize("xdtype,bdtype", [(torch.float32, torch.float32), (torch.float32, torch.bfloat16)])
def test_residual_dropout_gradients_remake_the_forward_mask(xdtype, bdtype):
    drop = Dropout(0.3).train()
    x = torch.randn(64, 33, dtype=xdtype, requires_grad=True)
    branch = torch.randn(64, 33).to(bdtype).requires_grad_()
    torch.manual_seed(3)
    y = drop.add_to(x, branch)
    dy = torch.randn_like(y)
    y.backward(dy)
    torch.manual_seed(3)
    mask = drop.mask(branch.shape, torch.float32)
    assert torch.equal(x.grad, dy)
    assert branch.grad.dtype == bdtype
    torch.testing.assert_close(branch.grad.float(), (dy * mask).to(bdtype).float())
    torch.testing.assert_close(y, x.detach() + branch.detach().float() * mask)


@compiled
def test_dropout_forward_and_backward_share_the_mask():
    drop = Dropout(0.5).train()
    x = torch.randn(1000, requires_grad=True)
    y = drop(x)
    y.sum().backward()
    kept = y != 0
    assert torch.equal(x.grad, kept.float() * drop.scale)
    assert 400 < int(kept.sum()) < 600


def test_float64_uses_the_torch_path_with_the_same_distribution():
    drop = Dropout(0.25).train()
    torch.manual_seed(0)
    y = drop(torch.ones(1 << 16, dtype=torch.float64))
    assert abs((y == 0).double().mean().item() - drop.threshold / 65536) < 0.01
    assert set(y.unique().tolist()) == {0.0, drop.scale}


STATUS = "from mlpmixer import kernels; print(kernels.status())"


def test_disabled_or_unbuildable_kernels_fall_back_to_torch(tmp_path):
    off = run_python(STATUS, MLPMIXER_KERNELS="0")
    assert off.returncode == 0 and off.stdout.strip() == "torch (MLPMIXER_KERNELS=0)"
    none = run_python(STATUS, CC=str(tmp_path / "no-such-cc"), MLPMIXER_CACHE_DIR=str(tmp_path / "c1"), MLPMIXER_KERNELS="1")
    assert none.returncode == 0 and none.stdout.startswith("torch (no C compiler")
    bad_cc = broken_compiler(tmp_path / "bad-cc")
    bad = run_python(STATUS, CC=str(bad_cc), MLPMIXER_CACHE_DIR=str(tmp_path / "c2"), MLPMIXER_KERNELS="1")
    assert bad.returncode == 0 and bad.stdout.startswith("torch (the kernels could not be built"), bad.stdout
    assert not list((tmp_path / "c2").iterdir())  # no temporary file left behind
    step = ("import torch; from mlpmixer.layers import Dropout; torch.manual_seed(0); "
            "print(float(Dropout(0.1).train().add_to(torch.zeros(4096), torch.ones(4096)).sum()))")
    assert run_python(step, MLPMIXER_KERNELS="0").returncode == 0


@compiled
def test_the_build_is_cached_per_source_and_machine(tmp_path):
    first = run_python(STATUS, MLPMIXER_CACHE_DIR=str(tmp_path))
    assert first.returncode == 0 and first.stdout.startswith("compiled kernels"), first.stdout + first.stderr
    built = list(tmp_path.glob("kernels-*.so"))
    assert len(built) == 1
    stamp = built[0].stat().st_mtime_ns
    again = run_python(STATUS, MLPMIXER_CACHE_DIR=str(tmp_path))
    assert again.stdout == first.stdout and built[0].stat().st_mtime_ns == stamp
    assert sorted(p.name for p in tmp_path.iterdir()) == [built[0].name]


@compiled
def test_a_damaged_cached_build_is_built_again(tmp_path):
    assert run_python(STATUS, MLPMIXER_CACHE_DIR=str(tmp_path)).stdout.startswith("compiled kernels")
    (built,) = tmp_path.glob("kernels-*.so")
    built.write_bytes(b"not a shared library")
    again = run_python(STATUS, MLPMIXER_CACHE_DIR=str(tmp_path))
    assert again.returncode == 0 and again.stdout.startswith("compiled kernels"), again.stdout + again.stderr
    assert built.read_bytes()[:4] == b"\x7fELF"


@compiled
def test_bfloat16_gelu_by_table_is_torchs_gelu_bit_for_bit():
    every = torch.arange(1 << 16, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    finite = torch.isfinite(every)
    got, want = kernels.gelu_bf16(every), torch.nn.functional.gelu(every)
    assert torch.equal(got[finite], want[finite]) and torch.isnan(got[~finite & torch.isnan(every)]).all()
    torch.manual_seed(0)
    for shape in [(3,), (1025, 7), (128, 8192)]:
        h = (torch.randn(shape) * 4).to(torch.bfloat16)
        assert torch.equal(kernels.gelu_bf16(h), torch.nn.functional.gelu(h))
        dy = torch.randn(shape).to(torch.bfloat16)
        want = torch.ops.aten.gelu_backward(dy, h)
        got = kernels.gelu_backward_bf16_(dy.clone(), h)
        assert torch.equal(got, want)
    h = torch.tensor([-1e9, -1e4, -10.0, 0.0, 1e-30, 10.0, 1e4], dtype=torch.bfloat16)  # dropped units: exactly 0
    dy = torch.ones_like(h)
    assert torch.equal(kernels.gelu_bf16(h), torch.nn.functional.gelu(h))
    assert torch.equal(kernels.gelu_backward_bf16_(dy.clone(), h), torch.ops.aten.gelu_backward(dy, h))


@compiled
def test_the_fused_mlp_under_bf16_autocast_equals_torchs_ops():
    from mlpmixer import fused

    torch.manual_seed(0)
    x = torch.randn(32, 300, requires_grad=True)
    w1, b1 = torch.randn(64, 32, requires_grad=True), torch.randn(64, requires_grad=True)
    w2, b2 = torch.randn(32, 64, requires_grad=True), torch.randn(32, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = fused.mlp(x, w1, b1, w2, b2, "gelu", left=True)
    y.float().square().sum().backward()
    got = [t.grad.clone() for t in (x, w1, b1, w2, b2)]
    for t in (x, w1, b1, w2, b2):
        t.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the same products, torch's own GELU
        want_y = torch.addmm(b2[:, None], w2, torch.nn.functional.gelu(torch.addmm(b1[:, None], w1, x)))
    want_y.float().square().sum().backward()
    assert torch.equal(y, want_y)
    for g, t in zip(got, (x, w1, b1, w2, b2)):
        torch.testing.assert_close(g, t.grad, rtol=2e-2, atol=2e-2)


@compiled
def test_residual_dropout_with_broadcasting_or_another_dtype_pair_uses_the_same_mask():
    drop = Dropout(0.3).train()
    for x, branch in ((torch.randn(4, 1, 7), torch.randn(4, 5, 7)),  # broadcast
                      (torch.randn(4, 5, 7, dtype=torch.bfloat16), torch.randn(4, 5, 7))):  # bf16 x, fp32 branch
        torch.manual_seed(1)
        got = drop.add_to(x, branch)
        torch.manual_seed(1)
        want = torch.addcmul(x, branch, drop.indicator(branch.shape, branch.dtype, dropped=False), value=drop.scale)
        assert got.dtype == want.dtype and torch.equal(got, want)


@compiled
def test_dropout_mul_into_bfloat16_rounds_the_float32_product_once():
    t = torch.randn(3, 40001)
    scale = 1 / (1 - 6554 / 65536)
    got = kernels.dropout_mul(t, 7, 6554, scale, dtype=torch.bfloat16)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, kernels.dropout_mul(t, 7, 6554, scale).to(torch.bfloat16))


def _layer_norm_case(rows: int, d: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, d, generator=g) * 3 + 1
    return x, torch.randn(d, generator=g), torch.randn(d, generator=g)


@compiled
@pytest.mark.parametrize("shape", [(2048, 128), (7, 3, 16), (1, 512)])
def test_layer_norm_kernel_equals_torch_to_float32_rounding(shape):
    x, w, b = _layer_norm_case(-(-math.prod(shape) // shape[-1]), shape[-1])
    x = x.view(shape)
    y, mean, rstd = kernels.layer_norm(x, w, b, 1e-5)
    want, want_mean, want_rstd = torch.ops.aten.native_layer_norm(x, [shape[-1]], w, b, 1e-5)
    assert y.shape == x.shape and y.dtype == torch.float32
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mean, want_mean.reshape(-1), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(rstd, want_rstd.reshape(-1), rtol=1e-5, atol=0)
    low, *_ = kernels.layer_norm(x, w, b, 1e-5, torch.bfloat16)  # the cast rides in the same pass
    assert low.dtype == torch.bfloat16 and torch.equal(low, y.to(torch.bfloat16))


@compiled
@pytest.mark.parametrize("grad_dtype", DTYPES)
@pytest.mark.parametrize("residual", [False, True])
def test_layer_norm_backward_kernel_equals_autograd(grad_dtype, residual):
    x, w, b = _layer_norm_case(300, 64, seed=1)
    dy = torch.randn(300, 64).to(grad_dtype)
    res = torch.randn(300, 64) if residual else None
    xr, wr, br = (t.clone().requires_grad_() for t in (x, w, b))
    torch.nn.functional.layer_norm(xr, (64,), wr, br, 1e-5).backward(dy.float())
    _, mean, rstd = kernels.layer_norm(x, w, b, 1e-5)
    dx, dw, db = kernels.layer_norm_backward(dy, x, mean, rstd, w, residual=res)
    torch.testing.assert_close(dx, xr.grad + (res if residual else 0), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(dw, wr.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(db, br.grad, rtol=1e-4, atol=1e-4)


@compiled
def test_layer_norm_results_do_not_depend_on_the_thread_count():
    x, w, b = _layer_norm_case(1000, 128, seed=2)
    dy = torch.randn(1000, 128)
    threads = torch.get_num_threads()
    runs = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            y, mean, rstd = kernels.layer_norm(x, w, b, 1e-5)
            runs.append((y, *kernels.layer_norm_backward(dy, x, mean, rstd, w)))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(*runs))


@compiled
@pytest.mark.parametrize("shape,per_row", [((128, 1040), True), ((130, 48), False), ((3, 16), True), ((1, 32), False)])
def test_gelu_backward_with_the_bias_gradient_in_the_same_pass(shape, per_row):
    g = torch.Generator().manual_seed(4)
    h, dy = (torch.randn(shape, generator=g).to(torch.bfloat16) for _ in range(2))
    want = torch.ops.aten.gelu_backward(dy, h)
    got, sums = kernels.gelu_backward_sum_bf16_(dy.clone(), h, per_row)
    assert torch.equal(got, want)  # torch's bfloat16 gradient, bit for bit
    assert sums.dtype == torch.float32  # summed in float32 and kept there, not rounded to bfloat16
    torch.testing.assert_close(sums, want.double().sum(1 if per_row else 0).float(), rtol=1e-5, atol=1e-5)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = kernels.gelu_backward_sum_bf16_(dy.clone(), h, per_row)[1]
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, sums)


@compiled
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape, per_row", [((32, 4096), True), ((1000, 48), False), ((130, 2064), False)])
@pytest.mark.parametrize("threshold", [6554, 0])
def test_dropout_mul_with_the_bias_gradient_in_the_same_pass(dtype, shape, per_row, threshold):
    """The branch's gradient is `dropout_mul`'s bit for bit (the same mask from the same key; none at
    threshold 0), and the sums are the float32 sums of it as rounded, whatever the thread count."""
    t = torch.randn(shape, generator=torch.Generator().manual_seed(5))
    key, scale = 0x1234_5678_9ABC_DEF0 - (1 << 63), 1 / 0.9
    got, sums = kernels.dropout_mul_sum(t, *shape, per_row, key, threshold, scale, dtype)
    want = kernels.dropout_mul(t, key, threshold, scale, dtype=dtype) if threshold else (t * scale).to(dtype)
    assert torch.equal(got, want) and sums.dtype == torch.float32
    torch.testing.assert_close(sums, want.double().sum(1 if per_row else 0).float(), rtol=1e-5, atol=1e-4)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2 if threads == 1 else 1)
        again = kernels.dropout_mul_sum(t, *shape, per_row, key, threshold, scale, dtype)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(again[0], got) and torch.equal(again[1], sums)


@compiled
def test_the_vectorised_kernels_refuse_rows_that_are_not_whole_vectors():
    x, w, b = _layer_norm_case(4, 24)
    with pytest.raises(ValueError, match="multiple of 16"):
        kernels.layer_norm(x, w, b, 1e-5)
    with pytest.raises(ValueError, match="multiple of 16"):
        kernels.gelu_backward_sum_bf16_(torch.zeros(3, 24, dtype=torch.bfloat16), torch.zeros(3, 24, dtype=torch.bfloat16), True)
    with pytest.raises(ValueError, match="multiple of 16"):
        kernels.dropout_mul_sum(torch.zeros(3, 24), 3, 24, True, 0, 0, 1.0, torch.bfloat16)


@compiled
@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("d", [128, 24])  # 24: not whole 16-value rows, so torch's LayerNorm runs
def test_the_kernels_layer_norm_module_equals_torchs(bf16, d):
    from mlpmixer.layers import LayerNorm

    torch.manual_seed(0)
    ours, theirs = LayerNorm(d), torch.nn.LayerNorm(d)
    with torch.no_grad():
        ours.weight.copy_(torch.randn(d)), ours.bias.copy_(torch.randn(d))
    theirs.load_state_dict(ours.state_dict())  # the same parameters, under the same names
    x = torch.randn(32, 8, d, requires_grad=True)
    dy = torch.randn(32, 8, d)
    results = []
    for norm in (ours, theirs):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            y = norm(x)
        assert y.dtype == torch.float32  # autocast runs LayerNorm in float32
        (gx,) = torch.autograd.grad(y, x, dy, retain_graph=True)
        gw, gb = torch.autograd.grad(y, (norm.weight, norm.bias), dy)
        results.append((y, gx, gw, gb))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@compiled
@pytest.mark.parametrize("positions", [None, "buffer", "learned"])
@pytest.mark.parametrize("shape", [(64, 32, 67, 128), (3, 5, 11, 16), (7, 33, 1000, 48)])
def test_the_embedding_kernels_give_torchs_bits_forward_and_backward(positions, shape):
    """fused.embed: the lookup, scale and positions in one pass; the table's gradient summed per id in
    torch's row order (bit for bit), the learned positions' by torch's own sum; any thread count."""
    from mlpmixer import fused

    b, n, vocab, d = shape
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, vocab, (b, n), generator=g)
    weight = torch.randn(vocab, d, generator=g)
    pos = None if positions is None else torch.randn(n + 3, d, generator=g)
    dout = torch.randn(n, b, d, generator=g)
    results = []
    for ours, threads in ((True, 1), (True, 2), (False, 1)):
        torch.set_num_threads(threads)
        tokens = torch.nn.Embedding.from_pretrained(weight.clone(), freeze=False)
        w = tokens.weight
        p = None if pos is None else pos.clone().requires_grad_(positions == "learned")
        if ours:
            out = fused.embed(ids, tokens, d ** 0.5, p)
        else:
            out = torch.nn.functional.embedding(ids.t(), w) * d ** 0.5
            out = out if p is None else out + p[:n, None]
        out.backward(dout)
        results.append([out, w.grad] + ([p.grad] if positions == "learned" else []))
    torch.set_num_threads(1)
    for ours in results[:2]:
        assert all(torch.equal(a, b) for a, b in zip(ours, results[2]))


@compiled
def test_an_embedding_id_out_of_range_is_an_index_error_naming_it():
    from mlpmixer import fused

    with pytest.raises(IndexError, match="token id 5 is out of range for an embedding of 3 ids"):
        fused.embed(torch.tensor([[0, 5]]), torch.nn.Embedding(3, 16), 1.0)


@compiled
def test_a_sequence_longer_than_the_positions_never_reaches_the_embedding_kernel():
    """fused.embed hands it to torch's ops, which refuse it as before; the kernel itself refuses it too
    (it would read past the positions table)."""
    from mlpmixer import fused

    ids, weight, positions = torch.randint(0, 10, (2, 40)), torch.randn(10, 16), torch.randn(16, 16)
    with pytest.raises(RuntimeError, match="must match the size of tensor b \\(16\\)"):
        fused.embed(ids, torch.nn.Embedding.from_pretrained(weight), 1.0, positions)
    with pytest.raises(ValueError, match="embed needs 40 positions of width 16"):
        kernels.embed(ids, weight, 1.0, positions)


@compiled
def test_an_embedding_the_kernels_do_not_take_gets_torchs_ops():
    """A padding index (its row gets no gradient), a max norm or a sparse gradient: torch's embedding."""
    from mlpmixer import fused

    ids = torch.tensor([[0, 1, 2, 0]])
    for options in ({"padding_idx": 0}, {"max_norm": 1.0}, {"sparse": True}):
        torch.manual_seed(0)
        ours, theirs = torch.nn.Embedding(3, 16, **options), torch.nn.Embedding(3, 16, **options)
        theirs.load_state_dict(ours.state_dict())
        out = fused.embed(ids, ours, 4.0)
        want = theirs(ids.t()) * 4.0
        out.sum().backward(), want.sum().backward()
        assert torch.equal(out, want) and torch.equal(ours.weight.grad.to_dense(), theirs.weight.grad.to_dense())



@compiled
@pytest.mark.parametrize("n", [1, 15, 16, 33, 4096 + 7, 70_000])  # tails, one vector, and the threaded size
@pytest.mark.parametrize("scale", [1.0, 1 / 0.9, 1 / (1 - 6554 / 65536)])
def test_the_cast_kernels_equal_torchs_cast_and_bfloat16_product(n, scale):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, generator=g) * 3
    specials = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan"), 3.0e38, -1.0e-40, 1.00390625])
    x[: min(n, len(specials))] = specials[: min(n, len(specials))]  # ties to even, overflow, subnormals, NaN
    want = x.to(torch.bfloat16)
    if scale != 1.0:
        want = want * scale
    _same_bits(kernels.to_bf16(x, scale), want, torch.int16)
    b = (torch.randn(n, generator=g) * 3).to(torch.bfloat16)
    b[: min(n, len(specials))] = specials[: min(n, len(specials))].to(torch.bfloat16)
    _same_bits(kernels.to_f32(b, scale), (b * scale if scale != 1.0 else b).to(torch.float32), torch.int32)


@compiled
def test_the_cast_kernels_refuse_a_tensor_of_the_other_dtype():
    with pytest.raises(ValueError, match="to_bf16 takes a float32 tensor, got torch.bfloat16"):
        kernels.to_bf16(torch.zeros(16, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="to_f32 takes a bfloat16 tensor, got torch.float32"):
        kernels.to_f32(torch.zeros(16))


def _same_bits(got: torch.Tensor, want: torch.Tensor, bits: torch.dtype) -> None:
    """Equal bit for bit, a NaN as any NaN (torch's own cast writes a NaN as 0xFFFF in its vector loop and
    0x7FC0 in its scalar one)."""
    assert got.dtype == want.dtype and got.isnan().equal(want.isnan())
    keep = ~want.isnan()
    assert got[keep].view(bits).equal(want[keep].view(bits))


@compiled
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("per_row", [True, False])
@pytest.mark.parametrize("shape", [(32, 8192), (2048, 128), (5, 48)])
@pytest.mark.parametrize("threshold", [0, 6554])
def test_dropout_add_with_the_branch_bias_equals_torch(dtype, per_row, shape, threshold):
    """The residual node's end: x + (branch + b2) · scale where kept, b2 added in float32, the mask
    `dropout_add`'s (lanes by element) and none drawn at threshold 0."""
    g = torch.Generator().manual_seed(1)
    rows, cols = shape
    x, branch = torch.randn(rows * cols, generator=g), torch.randn(rows, cols, generator=g).to(dtype)
    bias = torch.randn(rows if per_row else cols, generator=g).to(dtype)
    key, scale = 0x0123456789ABCDEF, 1 / (1 - threshold / 65536)
    got = kernels.dropout_add_bias(x, branch, bias, per_row, key, threshold, scale)
    summed = branch.float() + (bias.float()[:, None] if per_row else bias.float())
    want = torch.where(kernels.lanes(key, x.numel()) < threshold, x, x + summed.reshape(-1) * scale)
    assert got.view(torch.int32).equal(want.view(torch.int32))
    # the same elements dropped as `dropout_add` drops under the key: with a branch of ones and no bias the two agree
    ones, zeros = torch.ones(rows, cols, dtype=dtype), torch.zeros(rows if per_row else cols, dtype=dtype)
    plain = kernels.dropout_add(x, ones.reshape(-1), key, threshold, scale)
    assert kernels.dropout_add_bias(x, ones, zeros, per_row, key, threshold, scale).equal(plain)


@compiled
def test_dropout_add_with_the_branch_bias_refuses_what_it_would_misread():
    x, branch, bias = torch.zeros(4 * 16), torch.zeros(4, 16), torch.zeros(16)
    for args in ((x.bfloat16(), branch, bias), (x, branch.reshape(-1), bias), (x, branch, bias[:8]),
                 (x, branch.bfloat16(), bias), (x[:32], branch, bias)):
        with pytest.raises(ValueError, match="dropout_add_bias takes"):
            kernels.dropout_add_bias(*args, False, 1, 0, 1.0)
    assert kernels.dropout_add_bias(x, branch, torch.ones(4), True, 1, 0, 1.0).equal(torch.ones(4).repeat_interleave(16))
