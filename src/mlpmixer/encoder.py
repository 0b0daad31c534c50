"""A pre-norm transformer encoder whose token mixer is chosen by name (``TOKEN_MIXERS``).

    x = x + drop(mixer(LN(x)))      mixer: TokenMixingMlp (Eq. 1), SelfAttention, FourierMixing or GatedMlpMixer
    x = x + drop(FFN(LN(x)))        FFN: the channel-mixing MLP (Eq. 2)

then a final LayerNorm. Each block owns its own token-mixing weights. Shapes: (B, N, D) throughout.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from . import fused
from .attention import RotaryEmbedding, SelfAttention
from .errors import unknown_choice
from .layers import ACTIVATIONS, LayerNorm, MixerBlock, TokenMixer, TokenMixingMlp
from .mixers import FourierMixing, GatedMlpMixer

TOKEN_MIXERS = ("mlp", "attention", "fourier", "gmlp")
POS_EMBEDDINGS = ("sinusoidal", "learned", "none", "rotary")


@dataclass(frozen=True, kw_only=True)
class EncoderConfig:
    """Shape of a token-mixer encoder. Defaults are the seed experiment's (labml's MLP-Mixer MLM)."""

    seq_len: int = 32
    """Longest sequence; the token-mixing MLP's input width S."""
    d_model: int = 128
    """Width of a token embedding, C."""
    n_layers: int = 6
    """Number of blocks."""
    n_heads: int = 8
    """Attention heads (``token_mixer="attention"`` only)."""
    d_ff: int = 256
    """Hidden width of the channel-mixing MLP (feed-forward network), D_C; with ``token_mixer="gmlp"`` also the
    gMLP mixer's d_ffn (even: its gate splits it into two halves)."""
    tokens_mlp_dim: int = 128
    """Hidden width of the token-mixing MLP, D_S."""
    dropout: float = 0.1
    """Dropout in the MLPs' hidden layers and on each residual branch."""
    activation: str = "gelu"
    """Non-linearity σ: one of ``layers.ACTIVATIONS``."""
    token_mixer: str = "mlp"
    """``"mlp"`` (the paper's token-mixing MLP), ``"attention"`` (multi-head self-attention), ``"fourier"`` (FNet's
    Re(FFT2), not causal) or ``"gmlp"`` (gMLP's spatial gating unit); see docs/mixers.md."""
    causal: bool = False
    """Position i sees only positions <= i (autoregressive models)."""
    pos_embedding: str = "sinusoidal"
    """Positions: sinusoidal (the seed's) or learned (init N(0, 0.02²)) added, none, rotary (attention's q, k)."""
    embed_scale: bool = True
    """Multiply token embeddings by √d_model before adding positions (the seed's); off: their N(0, 1) scale."""
    embed_norm: bool = False
    """LayerNorm on token + position embeddings before the first block (BERT's embedding norm)."""

    def __post_init__(self) -> None:
        for name in ("seq_len", "d_model", "n_layers", "n_heads", "d_ff", "tokens_mlp_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        _check_choice("token_mixer", self.token_mixer, TOKEN_MIXERS)
        _check_choice("activation", self.activation, ACTIVATIONS)
        _check_choice("pos_embedding", self.pos_embedding, POS_EMBEDDINGS)
        if self.token_mixer == "attention" and self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        for name in ("embed_scale", "embed_norm"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.pos_embedding == "rotary" and self.token_mixer != "attention":
            raise ValueError(f"pos_embedding 'rotary' rotates attention's queries and keys, so it needs "
                             f"token_mixer 'attention', got {self.token_mixer!r}; use sinusoidal, learned or none")
        if self.pos_embedding == "rotary" and (self.d_model // self.n_heads) % 2:
            raise ValueError(f"pos_embedding 'rotary' needs an even head width d_model / n_heads, got "
                             f"{self.d_model} / {self.n_heads}")
        if self.token_mixer == "mlp" and self.causal and self.tokens_mlp_dim != self.seq_len:
            raise ValueError(f"causal token mixing needs tokens_mlp_dim == seq_len; got tokens_mlp_dim="
                             f"{self.tokens_mlp_dim}, seq_len={self.seq_len} (set --tokens-mlp-dim {self.seq_len})")
        if self.token_mixer == "fourier" and self.causal:
            raise ValueError("Fourier mixing is not causal: every output sees every position; "
                             "train lm needs --token-mixer mlp, gmlp or attention")
        if self.token_mixer == "gmlp" and self.d_ff % 2:
            raise ValueError(f"the gmlp token mixer splits d_ff into two halves, so d_ff must be even; got {self.d_ff}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise unknown_choice(name, value, allowed)


def make_token_mixer(config: EncoderConfig) -> TokenMixer:
    """One block's token mixer, as named by ``config.token_mixer``."""
    if config.token_mixer == "mlp":
        return TokenMixingMlp(config.seq_len, config.tokens_mlp_dim, dropout=config.dropout,
                              activation=config.activation, causal=config.causal)
    if config.token_mixer == "fourier":
        return FourierMixing(config.seq_len, causal=config.causal)
    if config.token_mixer == "gmlp":
        return GatedMlpMixer(config.d_model, config.d_ff, config.seq_len, causal=config.causal,
                             dropout=config.dropout, activation=config.activation)
    return SelfAttention(config.d_model, config.n_heads, dropout=config.dropout, causal=config.causal)


class Encoder(nn.Module):
    """``n_layers`` pre-norm blocks and a final LayerNorm; (B, N, D) -> (B, N, D)."""

    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.config = config
        self.blocks = nn.ModuleList(
            MixerBlock(config.d_model, make_token_mixer(config), config.d_ff, dropout=config.dropout,
                       activation=config.activation, eps=1e-5)
            for _ in range(config.n_layers)
        )
        self.norm = LayerNorm(config.d_model)  # the kernels' LayerNorm where they take the input
        if config.pos_embedding == "rotary":  # every block's attention rotates its q and k by position
            for block in self.blocks:
                block.mlp_tokens.rotary = RotaryEmbedding(config.d_model // config.n_heads, config.seq_len)

    def forward(self, x: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        """x: (B, N, D) -> (B, N, D)."""
        return self.forward_seq_first(x.transpose(0, 1).contiguous(), padding_mask).transpose(0, 1)

    def forward_seq_first(self, xs: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        """xs: (N, B, D) -> (N, B, D); the layout that makes token mixing a plain GEMM."""
        return self.norm(self.blocks_seq_first(xs, padding_mask))

    def blocks_seq_first(self, xs: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        """The blocks without the final norm, (N, B, D) -> (N, B, D): for a caller that needs the output at
        some positions only (the norm is per position, so it then normalises just those)."""
        for block in self.blocks:
            xs = block.forward_seq_first(xs, padding_mask)
        return xs


class TokenEmbedding(nn.Module):
    """Token embedding (scaled by √D unless ``embed_scale`` is off) plus an additive position embedding,
    then optionally a LayerNorm: ids (B, N) -> (N, B, D), sequence-first.

    The scale matters: N(0, 1) embeddings times √D have norm ≈ D, while sinusoidal positions have norm
    √(D/2), so after the first pre-norm the position is a few per cent of the signal.
    """

    def __init__(self, vocab_size: int, config: EncoderConfig):
        super().__init__()
        self.scale = math.sqrt(config.d_model) if config.embed_scale else 1.0
        self.tokens = nn.Embedding(vocab_size, config.d_model)
        self.kind = config.pos_embedding
        if self.kind == "learned":  # small random init, as BERT and GPT-2
            self.positions = nn.Parameter(torch.randn(config.seq_len, config.d_model) * 0.02)
        elif self.kind == "sinusoidal":
            self.register_buffer("positions", sinusoidal_positions(config.seq_len, config.d_model), persistent=False)
        self.norm = nn.LayerNorm(config.d_model) if config.embed_norm else None

    def forward(self, ids: Tensor) -> Tensor:
        # the table lookup, scale and positions in one pass where the kernels take it (`fused.embed`);
        # rotary positions act inside attention instead
        xs = fused.embed(ids, self.tokens, self.scale,
                         self.positions if self.kind in ("sinusoidal", "learned") else None)  # (N, B, D)
        return xs if self.norm is None else self.norm(xs)


def sinusoidal_positions(n: int, d: int) -> Tensor:
    """The fixed encodings of Vaswani et al.: sin on even channels, cos on odd; (n, d)."""
    position = torch.arange(n, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, d, 2, dtype=torch.float32) * (-math.log(10000.0) / d))
    table = torch.zeros(n, d)
    table[:, 0::2] = torch.sin(position * freq)
    table[:, 1::2] = torch.cos(position * freq)[:, : d // 2]
    return table
