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
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import allocator, kernels

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
        with torch.autocast(x.device.type, enabled=False):
            return _Mlp.apply(x.to(dt), w1.to(dt), b1.to(dt), w2.to(dt), b2.to(dt), activation, left, dropout)
    return _Mlp.apply(x, w1, b1, w2, b2, activation, left, dropout)


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


def _backward_(activation: str, g: Tensor, h: Tensor) -> Tensor:
    """σ'(h) · g written over g; a bfloat16 exact GELU by the compiled table lookup."""
    if activation == "gelu" and h.dtype == torch.bfloat16 and g.is_contiguous() and kernels.supports(h):
        return kernels.gelu_backward_bf16_(g, h)
    return ACT_BACKWARD_[activation](g, h)


class _Mlp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, activation: str, left: bool,
                dropout) -> Tensor:
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
        y = torch.addmm(b2[:, None], w2s, g) if left else torch.addmm(b2, g, w2s.t())
        keep = allocator.keeping() and g.numel() * g.element_size() <= KEEP_ACTIVATION_BYTES
        ctx.save_for_backward(x, w1, w2s, h, *((g,) if keep else ()))
        ctx.activation, ctx.left, ctx.scale = activation, left, scale
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy: Tensor):
        x, w1, w2s, h, *kept = ctx.saved_tensors
        left, scale = ctx.left, ctx.scale
        g = kept[0] if kept else _forward(ctx.activation, h)  # σ(h), kept or recomputed; dropped units are 0
        dw2 = dy @ g.t() if left else dy.t() @ g
        if scale != 1.0:
            dw2.mul_(scale)  # W2 entered as W2 · scale
        # a recomputed σ(h) is ours to overwrite: one hidden-size buffer then serves σ(h), its gradient and
        # h's (fewer fresh pages per step); a kept one belongs to the graph, which may run backward again
        buf = torch.empty_like(g) if kept else g
        torch.mm(w2s.t(), dy, out=buf) if left else torch.mm(dy, w2s, out=buf)  # gradient w.r.t. σ(h)
        dh = _backward_(ctx.activation, buf, h)
        dw1 = dh @ x.t() if left else dh.t() @ x
        dx = (w1.t() @ dh if left else dh @ w1) if ctx.needs_input_grad[0] else None
        db1, db2 = (dh.sum(1), dy.sum(1)) if left else (dh.sum(0), dy.sum(0))
        return dx, dw1, db1, dw2, db2, None, None, None
