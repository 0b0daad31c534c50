"""Self-attention behind the `TokenMixer` interface, and a swap that puts token-mixing MLPs (or
FNet's or gMLP's mixers, see `mixers`) into any model built on ``torch.nn.MultiheadAttention``.

Attention mixes tokens with weights computed from the input, softmax(Q Kᵀ / √d) V; the token-mixing
MLP mixes them with learned weights that do not depend on the input. Both have the same interface,
(B, N, D) in and out with a (B, N) padding mask, so they are interchangeable in a block.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layers import TokenMixer, TokenMixingMlp
from .mixers import FourierMixing, GatedMlpMixer


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (Su et al., 2021, RoFormer) for one head's queries or keys.

    Channel pairs (c, c + D/2) of the vector at position m are rotated by the angle m·θ_c with
    θ_c = base^(-2c/D), so that ⟨R_m q, R_n k⟩ depends on q, k and m − n only. (B, H, N, D) -> same.
    No parameters: the cos/sin tables are rebuilt, not saved, so checkpoints are unchanged.
    """

    def __init__(self, head_dim: int, max_len: int, base: float = 10000.0):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"rotary positions need an even head width, got {head_dim}")
        theta = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)  # (D/2,)
        angles = torch.arange(max_len, dtype=torch.float32)[:, None] * theta  # (max_len, D/2)
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        n, half = x.shape[-2], x.shape[-1] // 2
        cos, sin = self.cos[:n].to(x.dtype), self.sin[:n].to(x.dtype)  # (N, D/2), broadcast over B, H
        x1, x2 = x[..., :half], x[..., half:]
        return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


class SelfAttention(nn.Module):
    """Multi-head self-attention on ``scaled_dot_product_attention``; a `TokenMixer`.

    With ``rotary`` set, queries and keys are rotated by position before the dot product, so
    attention itself sees where each token is (``pos_embedding="rotary"``).
    """

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0, causal: bool = False,
                 rotary: RotaryEmbedding | None = None):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        self.n_heads = n_heads
        self.causal = causal
        self.dropout = dropout
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.rotary = rotary

    def forward(self, x: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        # q, k, v: (B, H, N, D/H)
        if self.rotary is not None:
            q, k = self.rotary(q), self.rotary(k)
        mask = None
        if padding_mask is not None:
            mask = ~padding_mask[:, None, None, :]  # (B, 1, 1, N), True where a key may be attended
            if self.causal:
                mask = mask & torch.ones(n, n, dtype=torch.bool, device=x.device).tril()
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0,
            is_causal=self.causal and mask is None,
        )
        return self.proj(y.transpose(1, 2).reshape(b, n, d))  # (B, H, N, D/H) -> (B, N, D)


class MixingAsAttention(nn.Module):
    """A token mixer (by default a token-mixing MLP) that answers ``torch.nn.MultiheadAttention``'s call.

    ``forward(query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None, ...)``
    returns ``(output, None)``: there are no attention weights to return. Only self-attention
    (query is key is value) can be replaced; an ``attn_mask`` is refused unless it is the causal
    mask and the mixer was built causal.
    """

    def __init__(self, embed_dim: int, seq_len: int, tokens_mlp_dim: int | None, batch_first: bool,
                 dropout: float = 0.0, causal: bool = False, mixer: TokenMixer | None = None):
        super().__init__()
        self.embed_dim = embed_dim
        self.batch_first = batch_first
        # nn.TransformerEncoderLayer reads these attributes of its self_attn
        self._qkv_same_embed_dim = True
        self.in_proj_bias = None
        self.in_proj_weight = None
        if mixer is None:
            mixer = TokenMixingMlp(seq_len, tokens_mlp_dim, dropout=dropout, causal=causal)
        self.mixer = mixer

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None = None,
                need_weights: bool = True, attn_mask: Tensor | None = None,
                average_attn_weights: bool = True, is_causal: bool = False) -> tuple[Tensor, None]:
        if not (query is key and key is value):
            raise ValueError("a token-mixing MLP can only replace self-attention (query is key is value); "
                             "this call is cross-attention, keep nn.MultiheadAttention there")
        if (attn_mask is not None or is_causal) and not self._honours(attn_mask, query.shape[1 if self.batch_first else 0]):
            raise ValueError("this attn_mask cannot be honoured by a token-mixing MLP; only the causal mask is "
                             "supported, and only with swap_attention(..., causal=True)")
        if key_padding_mask is not None and key_padding_mask.dtype != torch.bool:
            key_padding_mask = key_padding_mask != 0  # float masks: non-zero (−inf) marks padding
        x = query if self.batch_first else query.transpose(0, 1)  # (N, B, D) -> (B, N, D)
        y = self.mixer(x, key_padding_mask)
        return (y if self.batch_first else y.transpose(0, 1)), None

    def _honours(self, attn_mask: Tensor | None, n: int) -> bool:
        if not self.mixer.causal:
            return False
        if attn_mask is None:
            return True
        seq = attn_mask.shape[-1]
        causal = torch.ones(seq, seq, dtype=torch.bool, device=attn_mask.device).tril()
        allowed = ~attn_mask if attn_mask.dtype == torch.bool else attn_mask == 0
        return attn_mask.shape[-2:] == (seq, seq) and seq == n and bool((allowed == causal).all())


SWAP_MIXERS = ("mlp", "fourier", "gmlp")


def _swap_mixer(kind: str, embed_dim: int, seq_len: int, tokens_mlp_dim: int | None, d_ffn: int | None,
                dropout: float, causal: bool) -> TokenMixer:
    if kind == "mlp":
        if tokens_mlp_dim is None:
            raise ValueError("swap_attention(..., mixer='mlp') needs tokens_mlp_dim, the token-mixing MLP's "
                             "hidden width")
        return TokenMixingMlp(seq_len, tokens_mlp_dim, dropout=dropout, causal=causal)
    if kind == "fourier":
        return FourierMixing(seq_len, causal=causal)
    if kind == "gmlp":
        return GatedMlpMixer(embed_dim, d_ffn or 2 * embed_dim, seq_len, causal=causal, dropout=dropout)
    raise ValueError(f"unknown mixer {kind!r} for swap_attention; choose one of {', '.join(SWAP_MIXERS)}")


def swap_attention(module: nn.Module, seq_len: int, tokens_mlp_dim: int | None = None, dropout: float = 0.0,
                   causal: bool = False, *, mixer: str = "mlp", d_ffn: int | None = None) -> nn.Module:
    """Replace every ``nn.MultiheadAttention`` inside ``module`` with a token mixer, in place.

    ``mixer`` names it: ``"mlp"`` (a token-mixing MLP of hidden width ``tokens_mlp_dim``, the
    default), ``"fourier"`` (FNet's Fourier mixing; not causal) or ``"gmlp"`` (gMLP's gated MLP with
    hidden width ``d_ffn``, default twice the embedding width). Works on any model, e.g. a stock
    ``nn.TransformerEncoder`` (batch_first or not): each replacement accepts the same call and
    returns ``(output, None)``. Returns ``module``.
    """
    replaced = 0
    for m in module.modules():
        if isinstance(m, nn.TransformerEncoder):
            m.use_nested_tensor = False  # its fast path would call attention kernels the mixer does not have
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.MultiheadAttention):
                if not child._qkv_same_embed_dim:
                    raise ValueError(f"{name}: attention with kdim/vdim != embed_dim is cross-attention; "
                                     "a token-mixing MLP can only replace self-attention")
                inner = _swap_mixer(mixer, child.embed_dim, seq_len, tokens_mlp_dim, d_ffn, dropout, causal)
                wrapper = MixingAsAttention(child.embed_dim, seq_len, tokens_mlp_dim, child.batch_first,
                                            dropout=dropout, causal=causal, mixer=inner)
                setattr(parent, name, wrapper.to(next(child.parameters()).device))
                replaced += 1
    if replaced == 0:
        raise ValueError("swap_attention found no torch.nn.MultiheadAttention to replace in this module")
    return module
