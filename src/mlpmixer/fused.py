"""The two-layer MLP of a Mixer as one autograd node: ``W2 · drop(σ(W1 · x + b1)) + b2``.

Both mixing MLPs are this function, on different sides of the activations:

    left  (token mixing, Eq. 1):   x (K, M) -> W2 · σ(W1 · x + b1) + b2       (weights multiply from the left)
    right (channel mixing, Eq. 2): x (M, K) -> σ(x · W1ᵀ + b1) · W2ᵀ + b2     (from the right)

Eager autograd keeps two hidden-size tensors per MLP for backward: the pre-activation h (for σ') and
σ(h) (for W2's gradient). When σ(h) is large (above `KEEP_ACTIVATION_BYTES`, 8 MiB: every vision
model at a real batch) this node keeps only h and recomputes σ(h) in backward, one element-wise pass
against a hidden-size tensor less memory per MLP. A small σ(h) (the MLM seed configuration's are 2 and
4 MiB) is kept instead, saving that pass, when malloc keeps freed memory (`allocator`, as `mlpmixer
train` sets it); with glibc's default the kept tensor's fresh pages cost more than the pass
(docs/benchmarks.md, issue 17). Dropout after σ is folded into
the products (see `Dropout.biased`): a dropped unit gets a huge negative value added to its bias,
so σ is exactly 0 there and σ' exactly 0 too, and the 1/(1 − p) rescaling multiplies W2 (small)
instead of the hidden layer (large). Bias adds ride in the matrix products (``addmm``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from . import allocator, kernels, node

ACT_FORWARD = {
    "gelu": F.gelu,
    "gelu_tanh": lambda h: F.gelu(h, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
}
ACT_BACKWARD_ = {  # (gradient w.r.t. σ(h), h) -> gradient w.r.t. h, written over the first argument
    "gelu": lambda g, h: torch.ops.aten.gelu_backward.grad_input(g, h, grad_input=g),
    "gelu_tanh": lambda g, h: torch.ops.aten.gelu_backward.grad_input(g, h, approximate="tanh", grad_input=g),
    "relu": lambda g, h: torch.ops.aten.threshold_backward.grad_input(g, h, 0, grad_input=g),
    "silu": lambda g, h: torch.ops.aten.silu_backward.grad_input(g, h, grad_input=g),
}


KEEP_ACTIVATION_BYTES = 8 << 20
"""σ(h) is kept for backward when it takes at most this many bytes, else recomputed there (see below)."""


def dropped_value(dtype: torch.dtype) -> float:
    """A pre-activation so negative that every σ here gives exactly 0 and slope exactly 0.

    erf, tanh and exp saturate below about -90; -1e9 keeps any realistic pre-activation added to it
    far below that, and x³ (in the tanh GELU's derivative) finite in float32/bfloat16. float16's
    range stops at 65504, so there it is -1e4.
    """
    return -1.0e4 if dtype == torch.float16 else -1.0e9


def mlp(x: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, activation: str, left: bool,
        dropout=None) -> Tensor:
    """``W2 · drop(σ(W1 · x + b1)) + b2`` over the columns (``left``) or rows of a 2-D ``x``.

    ``dropout`` is a `layers.Dropout` that is active on this device, or None. Under CPU autocast the
    inputs are cast to its dtype first, as autocast would cast ``addmm``'s.
    """
    dt = autocast_dtype(x.device.type)
    if dt is not None:
        with torch.autocast(x.device.type, enabled=False):  # the node casts: no cast node per input
            return _Mlp.apply(x, w1, b1, w2, b2, activation, left, dropout, dt)
    return _Mlp.apply(x, w1, b1, w2, b2, activation, left, dropout, None)


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast runs matrix products in on this device type, or None when it is off."""
    try:
        if torch.is_autocast_enabled(device_type):
            return torch.get_autocast_dtype(device_type)
    except (RuntimeError, TypeError, AttributeError):  # meta tensors; torch < 2.4
        if device_type == "cpu" and torch.is_autocast_cpu_enabled():
            return torch.get_autocast_cpu_dtype()
    return None


def _forward(activation: str, h: Tensor) -> Tensor:
    """σ(h); a bfloat16 exact GELU by the compiled table lookup (torch's result, bit for bit)."""
    if activation == "gelu" and h.dtype == torch.bfloat16 and kernels.supports(h):
        return kernels.gelu_bf16(h)
    return ACT_FORWARD[activation](h)


def _backward_(activation: str, g: Tensor, h: Tensor, left: bool) -> tuple[Tensor, Tensor]:
    """σ'(h) · g written over the 2-D g, and its sums over each row (``left``) or column: the hidden
    bias's gradient. A bfloat16 exact GELU by the compiled table lookup, the sums in the same pass (in
    float32) where the rows are whole 16-value vectors."""
    if activation == "gelu" and h.dtype == torch.bfloat16 and g.is_contiguous() and kernels.supports(h):
        if g.shape[1] % 16 == 0:
            return kernels.gelu_backward_sum_bf16_(g, h, per_row=left)
        dh = kernels.gelu_backward_bf16_(g, h)
    else:
        dh = ACT_BACKWARD_[activation](g, h)
    return dh, dh.sum(1 if left else 0)


def _cast(dtype: torch.dtype | None, *tensors: Tensor) -> tuple[Tensor, ...]:
    return tensors if dtype is None else tuple(t.to(dtype) for t in tensors)


def _mlp_forward(ctx, x: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor | None, activation: str,
                 left: bool, dropout) -> tuple[Tensor, tuple[Tensor, ...]]:
    """``W2 · drop(σ(W1 · x + b1)) + b2``, and the tensors `_mlp_backward` needs (for the caller to
    save); the rest of what it needs goes on ``ctx``. ``b2`` None: without it (the residual node adds it
    in its residual pass)."""
    bias1 = b1[:, None] if left else b1
    shape = torch.Size((w1.shape[0], x.shape[1]) if left else (x.shape[0], w1.shape[0]))
    if dropout is None:
        scale = 1.0
        h = torch.addmm(bias1, w1, x) if left else torch.addmm(bias1, x, w1.t())
    else:  # a fresh full-size bias, with dropped units pushed to where σ is flat zero
        scale = dropout.scale
        h = dropout.biased(b1, shape, per_row=left, dropped=dropped_value(x.dtype))
        h = h.addmm_(w1, x) if left else h.addmm_(x, w1.t())  # accumulate the product into it: no copy
    g = _forward(activation, h)
    w2s = w2 if scale == 1.0 else w2 * scale
    if b2 is None:
        y = w2s @ g if left else g @ w2s.t()
    else:
        y = torch.addmm(b2[:, None], w2s, g) if left else torch.addmm(b2, g, w2s.t())
    keep = _keeps_bytes(g.numel() * g.element_size())
    ctx.activation, ctx.left, ctx.scale = activation, left, scale
    return y, (x, w1, w2s, h, *((g,) if keep else ()))


def _mlp_backward(ctx, saved: tuple[Tensor, ...], dy: Tensor, need_dx: bool,
                  db2: Tensor | None = None) -> tuple[Tensor | None, Tensor, Tensor, Tensor, Tensor]:
    """The gradients of x, W1, b1, W2, b2 from the output's ``dy`` (`_mlp_forward`'s dtype); b2's is
    ``db2`` where the caller has it."""
    x, w1, w2s, h, *kept = saved
    left, scale = ctx.left, ctx.scale
    g = kept[0] if kept else _forward(ctx.activation, h)  # σ(h), kept or recomputed; dropped units are 0
    dw2 = dy @ g.t() if left else dy.t() @ g
    if scale != 1.0:
        dw2.mul_(scale)  # W2 entered as W2 · scale
    # a recomputed σ(h) is ours to overwrite: one hidden-size buffer then serves σ(h), its gradient and
    # h's (fewer fresh pages per step); a kept one belongs to the graph, which may run backward again
    buf = torch.empty_like(g) if kept else g
    torch.mm(w2s.t(), dy, out=buf) if left else torch.mm(dy, w2s, out=buf)  # gradient w.r.t. σ(h)
    dh, db1 = _backward_(ctx.activation, buf, h, left)  # and b1's gradient
    dw1 = dh @ x.t() if left else dh.t() @ x
    dx = (w1.t() @ dh if left else dh @ w1) if need_dx else None
    if db2 is None:
        db2 = dy.sum(1) if left else dy.sum(0)
    return dx, dw1, db1, dw2, db2


class _Mlp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, activation: str, left: bool,
                dropout, dtype: torch.dtype | None) -> Tensor:
        ctx.dtypes = x.dtype, w1.dtype, b1.dtype, w2.dtype, b2.dtype  # gradients go back in these
        # autocast's dtype: multiply in it, as autocast would cast addmm's inputs
        y, saved = _mlp_forward(ctx, *_cast(dtype, x, w1, b1, w2, b2), activation, left, dropout)
        ctx.save_for_backward(*saved)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy: Tensor):
        grads = _mlp_backward(ctx, ctx.saved_tensors, dy, ctx.needs_input_grad[0])
        return *(g if g is None else g.to(dt) for g, dt in zip(grads, ctx.dtypes)), None, None, None, None


def residual_mlp(x: Tensor, norm: tuple[Tensor, Tensor, float], w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor,
                 activation: str, left: bool, dropout=None, branch_dropout=None) -> Tensor:
    """``x + drop(MLP(LN(x)))`` as one autograd node: Eq. 1 (``left``: the MLP mixes along the sequence)
    or Eq. 2 (along the channels) with its pre-LayerNorm and its residual, for a sequence-first float32
    ``x`` (N, B, D).

    The norm is `kernels.layer_norm`, which writes autocast's dtype directly (no cast pass), and its
    backward adds the gradient that goes around it (no separate sum). ``norm`` is (weight, bias, eps);
    ``dropout`` acts in the hidden layer and ``branch_dropout`` on the branch (`layers.Dropout`s active
    here, or None). `fusable` says when this applies. Where `node.cpp` is built the node is its C++
    autograd function (``torch.ops.mlpmixer.residual_mlp``), else `_ResidualMlp` with the Python bodies
    below: the same operations in the same order, so the same results.
    """
    dt = autocast_dtype(x.device.type)
    native = node.ops()
    # the operator takes what `fusable` takes (asked here without its library and autocast look-ups: the node
    # library exists only beside the kernels, and dt is at hand), with float32 or bfloat16 weights of one
    # dtype; torch.compile traces the Python bodies (the operator has no fake-tensor form)
    if (native is not None and _layout_fusable(x) and x.device.type == "cpu" and dt in (None, torch.bfloat16)
            and w1.dtype in (torch.float32, torch.bfloat16) and w1.dtype == b1.dtype == w2.dtype == b2.dtype
            and not _compiling()):
        hidden = (dropout.threshold, dropout.scale) if dropout is not None else (0, 1.0)
        branch = (branch_dropout.threshold, branch_dropout.scale) if branch_dropout is not None else (0, 1.0)
        return native.residual_mlp(x, norm[0], norm[1], w1, b1, w2, b2, norm[2], activation, left,
                                   dt == torch.bfloat16, *hidden, *branch, _keeps(x, w1, left, dt))
    with torch.autocast(x.device.type, enabled=False):
        return _ResidualMlp.apply(x, norm[0], norm[1], w1, b1, w2, b2, norm[2], activation, left, dropout,
                                  branch_dropout, dt)


def fusable(x: Tensor) -> bool:
    """Whether `residual_mlp` takes this input: contiguous (N, B, D) float32 on the CPU with the kernels,
    D a multiple of 16, and autocast off or in bfloat16 (the norm must be affine: the caller's check)."""
    return (_layout_fusable(x) and kernels.supports(x)
            and autocast_dtype(x.device.type) in (None, torch.bfloat16))


def _layout_fusable(x: Tensor) -> bool:
    """`fusable`'s part about x itself: contiguous (N, B, D) float32, D a multiple of 16."""
    return x.dtype == torch.float32 and x.dim() == 3 and x.shape[-1] % 16 == 0 and x.is_contiguous()


def _compiling() -> bool:
    try:
        return torch.compiler.is_compiling()
    except AttributeError:  # torch < 2.3
        return False


def _keeps(x: Tensor, w1: Tensor, left: bool, dtype: torch.dtype | None) -> bool:
    """Whether `_mlp_forward` would keep σ(h) for this branch, from the shapes, before σ(h) exists."""
    hidden = w1.shape[0] * x.numel() // (x.shape[0] if left else x.shape[-1])
    return _keeps_bytes(hidden * (dtype or x.dtype).itemsize)


def _keeps_bytes(size: int) -> bool:
    """Whether a σ(h) of ``size`` bytes is kept for backward (see the module docstring)."""
    return allocator.keeping() and size <= KEEP_ACTIVATION_BYTES


class _ResidualMlp(torch.autograd.Function):
    """The node with Python bodies: where `node.cpp` is not built, and under torch.compile."""

    @staticmethod
    def forward(ctx, x: Tensor, norm_w: Tensor, norm_b: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor,
                eps: float, activation: str, left: bool, dropout, branch_dropout, dtype: torch.dtype | None) -> Tensor:
        n, d = x.shape[0], x.shape[-1]
        u, mean, rstd = kernels.layer_norm(x, norm_w, norm_b, eps, dtype or x.dtype)  # (N, B, D)
        u = u.view(n, -1) if left else u.view(-1, d)  # (N, B·D) for Eq. 1, (N·B, D) for Eq. 2
        w1c, b1c, w2c, b2c = _cast(dtype, w1, b1, w2, b2)
        y, saved = _mlp_forward(ctx, u, w1c, b1c, w2c, None, activation, left, dropout)  # (N, B·D) or (N·B, D)
        # b2 joins in the residual pass (in float32; the product needs no bias copy)
        ctx.branch = None if branch_dropout is None else (kernels.new_key(), branch_dropout.threshold,
                                                           branch_dropout.scale)
        out = kernels.dropout_add_bias(x, y, b2c, left, *(ctx.branch or (0, 0, 1.0)))
        ctx.save_for_backward(x, norm_w, mean, rstd, *saved)
        ctx.dtypes, ctx.y_dtype = (w1.dtype, b1.dtype, w2.dtype, b2.dtype), y.dtype
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dout: Tensor):
        x, norm_w, mean, rstd, *saved = ctx.saved_tensors
        rows = x.shape[0] if ctx.left else x.numel() // x.shape[-1]  # dy as the MLP saw its output
        # the branch's gradient (the forward mask made again from its key; nothing dropped without branch
        # dropout) in the products' dtype, and b2's gradient, in one pass
        dy, db2 = kernels.dropout_mul_sum(dout, rows, x.numel() // rows, ctx.left, *(ctx.branch or (0, 0, 1.0)),
                                          dtype=ctx.y_dtype)
        du, dw1, db1, dw2, db2 = _mlp_backward(ctx, saved, dy, need_dx=True, db2=db2)
        dx, dnorm_w, dnorm_b = kernels.layer_norm_backward(du.view(x.shape), x, mean, rstd, norm_w, residual=dout)
        grads = (g.to(dt) for g, dt in zip((dw1, db1, dw2, db2), ctx.dtypes))
        return dx, dnorm_w, dnorm_b, *grads, None, None, None, None, None, None


def layer_norm(x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    """LayerNorm over the last axis of a float32 ``x``: by the kernels (`kernels.layer_norm`, its backward
    `kernels.layer_norm_backward`) where they take ``x`` (contiguous, on the CPU, the last axis a multiple
    of 16 values, float32 weight and bias), else torch's. Float32 out under autocast too, as torch's.
    The same arithmetic as torch's two-pass LayerNorm, equal to float32 rounding (tests/test_kernels.py),
    at a fraction of its time (issue 17: at the MLM seed configuration, 1 thread, torch's took 0.6 ms
    forward and 0.6 ms backward per call, the kernels about 0.06 and 0.09). Like the residual node, its
    backward is not itself differentiable (no gradients of gradients); ``MLPMIXER_KERNELS=0`` gives
    torch's LayerNorm everywhere."""
    if (x.dtype == torch.float32 and x.dim() >= 2 and x.shape[-1] % 16 == 0 and x.is_contiguous()
            and weight.dtype == bias.dtype == torch.float32 and kernels.supports(x)):
        with torch.autocast(x.device.type, enabled=False):
            return _LayerNorm.apply(x, weight, bias, eps)
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


class _LayerNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
        y, mean, rstd = kernels.layer_norm(x, weight, bias, eps, torch.float32)
        ctx.save_for_backward(x, weight, mean, rstd)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy: Tensor):
        x, weight, mean, rstd = ctx.saved_tensors
        dx, dw, db = kernels.layer_norm_backward(dy, x, mean, rstd, weight)
        return dx, dw, db, None


def embed(ids: Tensor, tokens: nn.Embedding, scale: float, positions: Tensor | None = None) -> Tensor:
    """A text model's sequence-first input: ``tokens(ids.t()) · scale (+ positions[:N, None])``, ids (B, N)
    -> (N, B, D). By the kernels where they take it (a plain embedding: no padding index, max norm or sparse
    gradient; `kernels.embed`: one pass instead of an index_select, a mul and an add; its backward sums
    each id's rows in torch's order without a dispatch per row, 0.55 -> about 0.1 ms per MLM seed step):
    the same bits as torch's, forward and backward; else torch's own ops."""
    weight = tokens.weight
    if (tokens.padding_idx is None and tokens.max_norm is None and not tokens.sparse
            and ids.dtype == torch.int64 and ids.dim() == 2 and weight.dtype == torch.float32
            and kernels.supports(weight) and ids.device.type == "cpu" and not _compiling()
            and (positions is None or (positions.dtype == torch.float32 and positions.device.type == "cpu"
                                       and positions.shape == (positions.shape[0], weight.shape[1])
                                       and positions.shape[0] >= ids.shape[1]))):
        return _Embed.apply(ids, weight, scale, positions)
    xs = tokens(ids.t()) * scale
    return xs if positions is None else xs + positions[: ids.shape[1], None]


class _Embed(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ids: Tensor, weight: Tensor, scale: float, positions: Tensor | None) -> Tensor:
        ctx.save_for_backward(ids)
        ctx.scale, ctx.vocab, ctx.positions_shape = scale, weight.shape[0], None if positions is None else positions.shape
        return kernels.embed(ids, weight, scale, positions)

    @staticmethod
    @once_differentiable
    def backward(ctx, dout: Tensor):
        (ids,) = ctx.saved_tensors
        dweight = kernels.embed_backward(dout, ids, ctx.vocab, ctx.scale) if ctx.needs_input_grad[1] else None
        dpositions = None
        if ctx.positions_shape is not None and ctx.needs_input_grad[3]:  # the add's gradient, as torch sums it
            dpositions = dout.new_zeros(ctx.positions_shape)
            dpositions[: dout.shape[0]] = dout.sum(1)
        return None, dweight, None, dpositions

