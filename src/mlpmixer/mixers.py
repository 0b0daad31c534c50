"""Two more `TokenMixer`s: Fourier mixing (FNet) and gMLP's spatial gating unit.

FNet (Lee-Thorp et al., 2021, arXiv 2105.03824) mixes tokens with a parameter-free 2-D discrete
Fourier transform and keeps the real part; for X of shape (B, N, D):

    Y = Re(F_seq(F_hidden(X)))      F_hidden: DFT over the D channels, F_seq: DFT over the positions
    Y[b, i, c] = Re Σ_j Σ_k X[b, j, k] · exp(-2πi (i·j / L + c·k / D))

with L = ``seq_len``, a fixed transform length: a sequence of N <= L tokens is zero-padded to L,
and Y is read at its first N positions.

gMLP (Liu et al., 2021, arXiv 2105.08050) mixes tokens in a gated MLP over the channels:

    Z = σ(X U)                       U: D x F, channel projection (B, N, D) -> (B, N, F)
    Z1, Z2 = split(Z)                two halves of F/2 channels each
    s(Z) = Z1 ⊙ (W · LN(Z2) + b)     the spatial gating unit: W (S x S) mixes positions, b (S,)
    Y = s(Z) V                       V: F/2 x D, back to (B, N, D)

W starts near zero and b at one, so that at initialisation s(Z) ≈ Z1 and each block is close to a
per-token MLP (the paper's Sec. 2.1).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .layers import Dropout, activation_fn


def _check_length(n: int, seq_len: int, what: str) -> None:
    if n > seq_len:
        raise ValueError(f"sequence length {n} is longer than the {what}'s seq_len {seq_len}; "
                         f"build the model with seq_len >= {n} or split the input into windows")


class FourierMixing(nn.Module):
    """FNet's token mixing, ``Re(FFT_seq(FFT_hidden(x)))``; no parameters. A `TokenMixer`.

    Padding: positions marked in ``padding_mask`` are zeroed before the transform, and the sequence
    transform always has length ``seq_len`` (shorter inputs are zero-padded up to it), so output i
    at a real position is the same whether the sequence is followed by pads, by other pad contents,
    or by nothing. Outputs at padded positions are zero. Lengths N > ``seq_len`` are refused.

    Every output sees every position, so there is no causal variant: ``causal=True`` raises.
    The transform runs in float32 (also under bf16 autocast) and the result is cast back to the
    input's dtype.
    """

    def __init__(self, seq_len: int, causal: bool = False):
        super().__init__()
        if causal:
            raise ValueError("Fourier mixing is not causal: every output sees every position; "
                             "use the mlp, gmlp or attention token mixer for a causal model")
        if seq_len <= 0:
            raise ValueError(f"seq_len must be positive, got {seq_len}")
        self.seq_len = seq_len
        self.causal = False

    def extra_repr(self) -> str:
        return f"seq_len={self.seq_len}"

    def forward(self, x: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        b, n, d = x.shape
        _check_length(n, self.seq_len, "Fourier mixing")
        if padding_mask is not None:
            x = x.masked_fill(padding_mask.unsqueeze(-1), 0.0)
        exact = x if x.dtype in (torch.float32, torch.float64) else x.float()  # cuFFT has no bf16
        with torch.autocast(x.device.type, enabled=False):
            # (B, N, D) -> zero-padded to (B, L, D) -> complex (B, L, D); its real part at the first N rows
            y = torch.fft.fft2(exact, s=(self.seq_len, d), dim=(1, 2)).real[:, :n]
        y = y.to(x.dtype)
        if padding_mask is not None:
            y = y.masked_fill(padding_mask.unsqueeze(-1), 0.0)
        return y


class SpatialGatingUnit(nn.Module):
    """``s(Z) = Z1 ⊙ (W · LN(Z2) + b)``: (B, N, F) -> (B, N, F/2), W (S, S) over the positions.

    ``proj`` is an ``nn.Linear(seq_len, seq_len)``, so ``proj.weight`` is W (row i: the weights output
    position i gives each input position) and ``proj.bias`` is b; W is initialised uniform in ±``eps``
    (``1e-3 / seq_len`` unless given), b to ones. N < ``seq_len`` tokens are treated as right-padded:
    only ``W[:N, :N]`` and ``b[:N]`` are used. Rows of LN(Z2) at padded positions are zeroed before
    the projection, so they contribute nothing to other positions.

    ``causal=True`` masks W to its lower triangle in every forward pass (so optimiser updates to the
    upper triangle never matter): output i sees positions j <= i only.
    """

    def __init__(self, d_ffn: int, seq_len: int, causal: bool = False, eps: float | None = None):
        super().__init__()
        if d_ffn <= 0 or d_ffn % 2:
            raise ValueError(f"the gMLP hidden width d_ffn must be a positive even number (it is split into two "
                             f"halves), got {d_ffn}")
        if seq_len <= 0:
            raise ValueError(f"seq_len must be positive, got {seq_len}")
        self.seq_len = seq_len
        self.causal = causal
        self.norm = nn.LayerNorm(d_ffn // 2)
        self.proj = nn.Linear(seq_len, seq_len)
        eps = 1e-3 / seq_len if eps is None else eps
        nn.init.uniform_(self.proj.weight, -eps, eps)
        nn.init.ones_(self.proj.bias)
        if causal:
            self.register_buffer("tril", torch.ones(seq_len, seq_len).tril().bool(), persistent=False)

    def extra_repr(self) -> str:
        return f"seq_len={self.seq_len}, causal={self.causal}"

    def weights(self, n: int) -> tuple[Tensor, Tensor]:
        """W (n, n) and b (n,) for a sequence of n <= seq_len tokens."""
        w = self.proj.weight
        if self.causal:
            w = w.masked_fill(~self.tril, 0.0)
        return w[:n, :n], self.proj.bias[:n]

    def forward(self, zs: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        """zs: sequence-first (N, B, F) -> (N, B, F/2)."""
        n, b, _ = zs.shape
        _check_length(n, self.seq_len, "spatial gating unit")
        u, v = zs.chunk(2, dim=-1)  # (N, B, F/2) each
        v = self.norm(v)
        if padding_mask is not None:
            v = v.masked_fill(padding_mask.t().unsqueeze(-1), 0.0)  # (B, N) -> (N, B, 1)
        w, bias = self.weights(n)
        # W · LN(Z2) + b as one GEMM over all channels of all sequences: (N, N) @ (N, B·F/2) -> (N, B·F/2)
        gate = torch.addmm(bias[:, None].to(v.dtype), w.to(v.dtype), v.reshape(n, -1)).view_as(v)
        return u * gate


class GatedMlpMixer(nn.Module):
    """gMLP's token mixer: ``fc2(drop(s(σ(fc1(x)))))`` with `SpatialGatingUnit` s; a `TokenMixer`.

    ``fc1`` widens D -> ``d_ffn``, the gate halves it, ``fc2`` narrows ``d_ffn / 2`` -> D (the module
    names are timm's ``GatedMlp``: ``fc1``, ``gate.norm``, ``gate.proj``, ``fc2``). The channel
    projections act on each position alone, so padding and causality are the gate's: padded rows
    never reach another position, and outputs at padded positions are zero.
    """

    def __init__(self, d_model: int, d_ffn: int, seq_len: int, causal: bool = False, dropout: float = 0.0,
                 activation: str = "gelu"):
        super().__init__()
        self.fc1 = nn.Linear(d_model, d_ffn)
        self.act = activation_fn(activation)
        self.gate = SpatialGatingUnit(d_ffn, seq_len, causal=causal)
        self.drop = Dropout(dropout)
        self.fc2 = nn.Linear(d_ffn // 2, d_model)

    @property
    def causal(self) -> bool:
        return self.gate.causal

    @property
    def seq_len(self) -> int:
        return self.gate.seq_len

    def forward(self, x: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        xs = x.transpose(0, 1)  # (B, N, D) -> (N, B, D): a free view of the encoder's sequence-first memory
        ys = self.fc2(self.drop(self.gate(self.act(self.fc1(xs)), padding_mask)))  # (N, B, F) -> (N, B, D)
        if padding_mask is not None:
            ys = ys.masked_fill(padding_mask.t().unsqueeze(-1), 0.0)
        return ys.transpose(0, 1)  # -> (B, N, D)
