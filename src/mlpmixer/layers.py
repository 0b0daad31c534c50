"""The parts of MLP-Mixer (Tolstikhin et al., 2021, arXiv 2105.01601).

A Mixer block applies two MLPs to a table of S tokens x C channels, X of shape (B, S, C):

    U = X + W2 · σ(W1 · LN(X))            token mixing, Eq. 1: an MLP along the sequence,
                                           shared by every channel   (W1: D_S x S, W2: S x D_S)
    Y = U + W4 · σ(W3 · LN(U)ᵀ)ᵀ          channel mixing, Eq. 2: an MLP along the channels,
                                           shared by every token     (W3: D_C x C, W4: C x D_C)

The token-mixing MLP moves information between positions, which is the job attention does in a
transformer; `TokenMixer` is the interface both implement, so a block does not care which it holds.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from . import fused, kernels

ACTIVATIONS = tuple(fused.ACT_FORWARD)


def activation_fn(name: str):
    """The element-wise non-linearity σ by name (``gelu_tanh`` is Flax's default ``nn.gelu``): one table,
    `fused.ACT_FORWARD`, which the fused MLP's backward pass pairs with its derivatives."""
    if name not in fused.ACT_FORWARD:
        raise ValueError(f"unknown activation {name!r}; choose one of {', '.join(ACTIVATIONS)}")
    return fused.ACT_FORWARD[name]


class Dropout(nn.Module):
    """Inverted dropout whose masks cost a fraction of ``nn.Dropout``'s on the CPU.

    Each element gets a uniform 16-bit integer u and is dropped when u < round(p·2^16). The mask is
    thus i.i.d. Bernoulli with drop probability p' = round(p·2^16)/2^16 (|p' − p| <= 2^-17, e.g.
    0.1000061 for p = 0.1), and kept elements are scaled by 1/(1 − p'), so E[output] = input exactly.
    It is as reproducible as ``nn.Dropout`` (seeded by ``torch.manual_seed``). On other devices it is
    ``F.dropout``.

    Where `kernels` are compiled (float32 and bfloat16), a call draws one 64-bit key from torch's
    generator and u is a function of (key, element) (`kernels.lanes`): one pass writes the result, at
    any thread count the same, and backward makes the mask again from the key. Elsewhere one 64-bit
    draw from torch's generator gives four u, the mask is made in a few 16-bit integer passes and kept
    for backward. The Mixer applies the masks with no pass of their own: in a hidden layer through
    `fused.mlp` (which takes `biased`), on a residual branch through `add_to`.
    """

    def __init__(self, p: float = 0.0):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p = p
        self.threshold = round(p * 65536)
        self.scale = 1.0 / (1.0 - self.threshold / 65536)

    def extra_repr(self) -> str:
        return f"p={self.p}"

    def active(self, x: Tensor) -> bool:
        return self.training and self.threshold > 0 and x.device.type == "cpu"

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.threshold == 0:
            return x
        if not self.active(x):
            return F.dropout(x, self.p, True)
        if kernels.supports(x):
            return _DropoutMul.apply(x, kernels.new_key(), self.threshold, self.scale)
        return x * self.mask(x.shape, x.dtype)

    def biased(self, bias: Tensor, shape: torch.Size, per_row: bool, dropped: float) -> Tensor:
        """A fresh ``shape`` (rows, columns) tensor: ``bias`` (one value per row if ``per_row``, else per
        column) plus ``dropped`` at the dropped elements (`fused.mlp`'s pre-activation buffer)."""
        if kernels.supports(bias):
            return kernels.dropout_bias(bias, shape[0], shape[1], per_row, kernels.new_key(), self.threshold,
                                        dropped)
        h = self.indicator(shape, bias.dtype, dropped=True)
        return torch.add(bias[:, None] if per_row else bias, h, alpha=dropped, out=h)

    def indicator(self, shape: torch.Size, dtype: torch.dtype, dropped: bool) -> Tensor:
        """1.0 where an element is dropped (``dropped=True``) or kept (``False``), else 0.0: the mask that
        a call on a ``dtype`` tensor would draw from the generator's present state."""
        if kernels.supports_dtype(dtype):
            u = kernels.lanes(kernels.new_key(), shape.numel()).view(shape)
            return (u < self.threshold if dropped else u >= self.threshold).to(dtype)
        n = shape.numel()
        bits = torch.empty((n + 3) // 4, dtype=torch.int64).random_(torch.iinfo(torch.int64).min, None)
        u = bits.view(torch.int16)[:n].view(shape)  # four uniform 16-bit lanes per draw, as -32768 … 32767
        t = self.threshold - 32768  # dropped iff u < t
        c = u.clamp_(t - 1, t)  # t − 1 where dropped, t where kept; 16-bit integer passes are cheap, bools are not
        return (c.sub_(t).neg_() if dropped else c.sub_(t - 1)).to(dtype)  # 1 where dropped (or kept), else 0

    def mask(self, shape: torch.Size, dtype: torch.dtype) -> Tensor:
        """The scaled keep-mask: 0 with probability p', 1/(1 − p') otherwise."""
        return self.indicator(shape, dtype, dropped=False).mul_(self.scale)

    def add_to(self, x: Tensor, branch: Tensor) -> Tensor:
        """``x + dropout(branch)`` in one pass; its backward is one pass too."""
        if not (self.training and self.threshold):
            return x + branch
        if not self.active(branch):
            return x + F.dropout(branch, self.p, True)
        if x.shape == branch.shape and kernels.supports(x, branch) and (
                x.dtype == branch.dtype or (x.dtype, branch.dtype) == (torch.float32, torch.bfloat16)):
            return _DropoutAdd.apply(x, branch, kernels.new_key(), self.threshold, self.scale)
        if kernels.supports(branch):  # broadcasting or another dtype pair: the compiled mask, then torch's add
            return x + self(branch)
        return torch.addcmul(x, branch, self.indicator(branch.shape, branch.dtype, dropped=False), value=self.scale)


class _DropoutMul(torch.autograd.Function):
    """``x · mask``; backward makes the mask again from the key."""

    @staticmethod
    def forward(ctx, x: Tensor, key: int, threshold: int, scale: float) -> Tensor:
        ctx.args = key, threshold, scale
        return kernels.dropout_mul(x, key, threshold, scale)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy: Tensor):
        return kernels.dropout_mul(dy, *ctx.args), None, None, None


class _DropoutAdd(torch.autograd.Function):
    """``x + branch · mask``; backward passes dy to x and dy · mask to the branch, the mask made again."""

    @staticmethod
    def forward(ctx, x: Tensor, branch: Tensor, key: int, threshold: int, scale: float) -> Tensor:
        ctx.args = key, threshold, scale
        return kernels.dropout_add(x, branch, key, threshold, scale)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy: Tensor):
        dbranch = kernels.dropout_mul(dy, *ctx.args) if ctx.needs_input_grad[1] else None
        return dy if ctx.needs_input_grad[0] else None, dbranch, None, None, None


def two_layer_mlp(x: Tensor, fc1: nn.Linear | tuple[Tensor, Tensor], fc2: nn.Linear | tuple[Tensor, Tensor],
                  activation: str, drop: Dropout, left: bool) -> Tensor:
    """``fc2(drop(σ(fc1(·))))`` over the rows of a 2-D ``x``, or over its columns when ``left``.

    ``fc1``/``fc2`` are Linear layers or (weight, bias) pairs. One fused autograd node (`fused.mlp`),
    except for dropout on another device, where it is torch's own.
    """
    (w1, b1), (w2, b2) = (f if isinstance(f, tuple) else (f.weight, f.bias) for f in (fc1, fc2))
    if drop.training and drop.threshold and not drop.active(x):
        act = activation_fn(activation)
        if left:
            return torch.addmm(b2[:, None], w2, drop(act(torch.addmm(b1[:, None], w1, x))))
        return F.linear(drop(act(F.linear(x, w1, b1))), w2, b2)
    return fused.mlp(x, w1, b1, w2, b2, activation, left, drop if drop.active(x) else None)


@runtime_checkable
class TokenMixer(Protocol):
    """Anything that mixes information across the sequence axis.

    ``x`` is batch-first (B, N, D); ``padding_mask`` is bool (B, N), True at padding (the
    ``key_padding_mask`` convention of ``torch.nn.MultiheadAttention``). Padded positions must
    contribute nothing to real ones. Returns (B, N, D).
    """

    def forward(self, x: Tensor, padding_mask: Tensor | None = None) -> Tensor: ...

    def __call__(self, x: Tensor, padding_mask: Tensor | None = None) -> Tensor: ...


class Mlp(nn.Module):
    """Two dense layers with a non-linearity between: ``fc2(drop(σ(fc1(x))))`` on the last axis.

    This is the channel-mixing MLP of Eq. 2 (and a transformer's feed-forward network).
    """

    def __init__(self, in_features: int, hidden_features: int, dropout: float = 0.0,
                 activation: str = "gelu"):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.activation = activation
        activation_fn(activation)  # an unknown name fails here, at construction
        self.drop = Dropout(dropout)
        self.fc2 = nn.Linear(hidden_features, in_features)

    def forward(self, x: Tensor) -> Tensor:
        rows = x.reshape(-1, x.shape[-1])  # (..., C) -> (M, C): one GEMM per layer over all tokens
        y = two_layer_mlp(rows, self.fc1, self.fc2, self.activation, self.drop, left=False)  # (M, C)
        return y.view(*x.shape[:-1], y.shape[-1])


class TokenMixingMlp(nn.Module):
    """The MLP of Eq. 1 applied along the sequence axis, shared across channels: ``W2·σ(W1·X)``.

    Weights are stored as ``nn.Linear`` weights, ``fc1.weight`` (D_S, S) and ``fc2.weight``
    (S, D_S), the layout of timm's ``mlp_tokens``; how the forward pass lays out the product is an
    internal detail.

    Variable length: a sequence of N < ``seq_len`` tokens is treated as right-padded, i.e. only the
    first N columns of W1 and the first N rows of W2 are used. Positions marked in ``padding_mask``
    are zeroed before mixing, so they contribute nothing to other positions, and their outputs are
    zero.

    ``causal=True`` makes output i depend only on inputs j <= i: both weight matrices are masked to
    their lower triangle in every forward pass (so optimiser updates to the upper triangle never
    matter), which needs a square hidden layer, ``tokens_mlp_dim == seq_len``:
    ``h_k = σ(Σ_{j<=k} W1[k, j] x_j + b1_k)`` and ``y_i = Σ_{k<=i} W2[i, k] h_k + b2_i``.
    """

    def __init__(self, seq_len: int, tokens_mlp_dim: int, dropout: float = 0.0,
                 activation: str = "gelu", causal: bool = False):
        super().__init__()
        if seq_len <= 0 or tokens_mlp_dim <= 0:
            raise ValueError(f"seq_len ({seq_len}) and tokens_mlp_dim ({tokens_mlp_dim}) must be positive")
        if causal and tokens_mlp_dim != seq_len:
            raise ValueError(
                f"causal token mixing needs tokens_mlp_dim == seq_len (got tokens_mlp_dim={tokens_mlp_dim}, "
                f"seq_len={seq_len}): only square lower-triangular weights keep it exactly causal"
            )
        self.seq_len = seq_len
        self.causal = causal
        self.fc1 = nn.Linear(seq_len, tokens_mlp_dim)
        self.activation = activation
        activation_fn(activation)  # an unknown name fails here, at construction
        self.drop = Dropout(dropout)
        self.fc2 = nn.Linear(tokens_mlp_dim, seq_len)
        if causal:
            self.register_buffer("tril", torch.ones(seq_len, seq_len).tril().bool(), persistent=False)

    def extra_repr(self) -> str:
        return f"seq_len={self.seq_len}, causal={self.causal}"

    def weights(self, n: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """W1 (D_S, n), b1 (D_S,), W2 (n, D_S), b2 (n,) for a sequence of n <= seq_len tokens."""
        w1, w2 = self.fc1.weight, self.fc2.weight
        if n == self.seq_len and not self.causal:
            return w1, self.fc1.bias, w2, self.fc2.bias  # the parameters themselves: no slicing nodes
        if self.causal:
            w1 = w1.masked_fill(~self.tril, 0.0)
            w2 = w2.masked_fill(~self.tril, 0.0)
        return w1[:, :n], self.fc1.bias, w2[:n], self.fc2.bias[:n]

    def forward(self, x: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        b, n, d = x.shape
        if n > self.seq_len:
            raise ValueError(
                f"sequence length {n} is longer than the token-mixing MLP's seq_len {self.seq_len}; "
                f"build the model with seq_len >= {n} or split the input into windows"
            )
        if padding_mask is not None:
            x = x.masked_fill(padding_mask.unsqueeze(-1), 0.0)  # keeps x's memory layout
        w1, b1, w2, b2 = self.weights(n)
        xs = x.transpose(0, 1)  # (B, N, D) -> (N, B, D)
        if xs.is_contiguous():
            # Sequence-first memory: Eq. 1 is two plain GEMMs over all channels of all sequences at once.
            # W2 · σ(W1 · X + b1) + b2 with X (N, B·D): (D_S, N) @ (N, B·D) -> (D_S, B·D) -> (N, B·D)
            y = two_layer_mlp(xs.reshape(n, b * d), (w1, b1), (w2, b2), self.activation, self.drop, left=True)
            y = y.view(n, b, d).transpose(0, 1)  # -> (B, N, D)
        else:
            cols = x.transpose(1, 2).reshape(b * d, n)  # (B, N, D) -> (B·D, N), a copy
            y = two_layer_mlp(cols, (w1, b1), (w2, b2), self.activation, self.drop, left=False)  # (B·D, N)
            y = y.view(b, d, n).transpose(1, 2)  # -> (B, N, D)
        if padding_mask is not None:
            y = y.masked_fill(padding_mask.unsqueeze(-1), 0.0)
        return y


class DropPath(nn.Module):
    """Stochastic depth: drops a sample's whole residual branch with probability ``p`` in training.

    ``batch_dim`` is the axis that indexes samples (1 for the sequence-first (N, B, D) layout).
    """

    def __init__(self, p: float = 0.0, batch_dim: int = 0):
        super().__init__()
        self.p, self.batch_dim = p, batch_dim

    def extra_repr(self) -> str:
        return f"p={self.p}"

    def forward(self, x: Tensor) -> Tensor:
        if self.p == 0.0 or not self.training:
            return x
        shape = [1] * x.ndim
        shape[self.batch_dim] = x.shape[self.batch_dim]
        keep = x.new_empty(shape).bernoulli_(1.0 - self.p)
        return x * keep / (1.0 - self.p)


class LayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` (the same parameters and state dict) over one axis, computed by `fused.layer_norm`:
    the compiled kernels where they take the input, else torch's."""

    def forward(self, x: Tensor) -> Tensor:
        if self.weight is None or self.bias is None or len(self.normalized_shape) != 1:
            return super().forward(x)
        return fused.layer_norm(x, self.weight, self.bias, self.eps)


class MixerBlock(nn.Module):
    """Pre-norm block: ``x + drop(mixer(LN(x)))`` then ``x + drop(MLP(LN(x)))``.

    ``mlp_tokens`` holds any `TokenMixer` (the paper's token-mixing MLP, or attention); the module
    names follow the official checkpoints as timm spells them (``norm1``, ``mlp_tokens``, ``norm2``,
    ``mlp_channels``), so pretrained weights load without renaming.
    """

    def __init__(self, dim: int, token_mixer: TokenMixer, channels_mlp_dim: int, dropout: float = 0.0,
                 drop_path: float = 0.0, activation: str = "gelu", eps: float = 1e-6):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.mlp_tokens = token_mixer
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp_channels = Mlp(dim, channels_mlp_dim, dropout=dropout, activation=activation)
        self.drop = Dropout(dropout)
        self.drop_path = DropPath(drop_path, batch_dim=1)  # blocks run sequence-first

    def forward(self, x: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        """x: (B, N, D) -> (B, N, D)."""
        return self.forward_seq_first(x.transpose(0, 1).contiguous(), padding_mask).transpose(0, 1)

    def forward_seq_first(self, xs: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        """xs: (N, B, D) -> (N, B, D), the layout models keep between blocks.

        In sequence-first memory the token mixer's (B, N, D) view turns Eq. 1 into plain GEMMs, and
        LayerNorm and the channel MLP (Eq. 2) are position-wise, so no step copies the activations. With
        the paper's token-mixing MLP on the CPU, each residual branch is one autograd node
        (`fused.residual_mlp`: the norm, the MLP and the residual dropout-add; 2–5 % off the MLM step).
        """
        if padding_mask is None and self._fusable(xs):  # each of Eq. 1 and Eq. 2 as one node (`fused`)
            tokens, ch = self.mlp_tokens, self.mlp_channels
            branch = self.drop if self.drop.active(xs) else None
            xs = self._residual(xs, self.norm1, tokens.weights(xs.shape[0]), tokens, branch, left=True)
            return self._residual(xs, self.norm2, (ch.fc1.weight, ch.fc1.bias, ch.fc2.weight, ch.fc2.bias), ch,
                                  branch, left=False)
        mixed = self.mlp_tokens(self.norm1(xs).transpose(0, 1), padding_mask).transpose(0, 1)  # (N, B, D)
        xs = self.drop.add_to(xs, self.drop_path(mixed))
        return self.drop.add_to(xs, self.drop_path(self.mlp_channels(self.norm2(xs))))

    def _fusable(self, xs: Tensor) -> bool:
        """Whether both residual branches can run as `fused.residual_mlp`: the paper's token-mixing MLP,
        no stochastic depth at work, and an input `fused.fusable` takes."""
        tokens, norm1, norm2 = self.mlp_tokens, self.norm1, self.norm2
        return (isinstance(tokens, TokenMixingMlp) and xs.shape[0] <= tokens.seq_len
                and (self.drop_path.p == 0.0 or not self.training)
                and norm1.weight is not None and norm1.bias is not None
                and norm2.weight is not None and norm2.bias is not None and fused.fusable(xs))

    @staticmethod
    def _residual(xs: Tensor, norm: nn.LayerNorm, weights: tuple[Tensor, Tensor, Tensor, Tensor], mlp: nn.Module,
                  branch: Dropout | None, left: bool) -> Tensor:
        """``xs + branch(MLP(LN(xs)))`` in one node: the token-mixing MLP (``left``) or the channel MLP, with
        the block's dropout on the branch where it is active."""
        return fused.residual_mlp(xs, (norm.weight, norm.bias, norm.eps), *weights, mlp.activation, left,
                                  mlp.drop if mlp.drop.active(xs) else None, branch)


class PatchEmbed(nn.Module):
    """Per-patch linear embedding: a convolution with kernel = stride = patch size.

    (B, in_chans, H, W) -> (B, S, C) with S = (H / P) · (W / P) tokens in row-major order.
    """

    def __init__(self, patch_size: int, in_chans: int, hidden_dim: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, hidden_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, C, H/P, W/P) -> (B, S, C)

    def forward_seq_first(self, x: Tensor) -> Tensor:
        """(B, in_chans, H, W) -> (S, B, C), contiguous: the layout `MixerBlock.forward_seq_first` keeps."""
        return self.proj(x).flatten(2).permute(2, 0, 1).contiguous()  # (B, C, S) -> (S, B, C)
