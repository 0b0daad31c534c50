"""SelfAttention against a manual softmax(QKᵀ/√d)V and nn.MultiheadAttention; swap_attention on
PyTorch's own transformer."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from mlpmixer import SelfAttention, TokenMixingMlp, swap_attention
from mlpmixer.attention import MixingAsAttention


def manual_attention(attn: SelfAttention, x: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Multi-head attention written out from the module's weights: head h uses channels h·d_h … (h+1)·d_h
    of Q = x Wqᵀ, K = x Wkᵀ, V = x Wvᵀ (Wq, Wk, Wv the three row blocks of ``qkv``)."""
    b, n, d = x.shape
    h = attn.n_heads
    dh = d // h
    wq, wk, wv = attn.qkv.weight.split(d)
    bq, bk, bv = attn.qkv.bias.split(d)
    heads = []
    for i in range(h):
        sl = slice(i * dh, (i + 1) * dh)
        q = x @ wq[sl].T + bq[sl]
        k = x @ wk[sl].T + bk[sl]
        v = x @ wv[sl].T + bv[sl]
        scores = q @ k.transpose(1, 2) / math.sqrt(dh)  # (B, N, N)
        if padding_mask is not None:
            scores = scores.masked_fill(padding_mask[:, None, :], float("-inf"))
        heads.append(scores.softmax(-1) @ v)
    return torch.cat(heads, -1) @ attn.proj.weight.T + attn.proj.bias


@pytest.mark.parametrize("n_heads", [1, 4])
def test_self_attention_matches_manual_softmax(n_heads):
    attn = SelfAttention(16, n_heads).double().eval()
    x = torch.randn(3, 7, 16, dtype=torch.float64)
    torch.testing.assert_close(attn(x), manual_attention(attn, x))
    mask = torch.zeros(3, 7, dtype=torch.bool)
    mask[1, 4:] = True
    mask[2, 1:] = True
    torch.testing.assert_close(attn(x, mask)[~mask], manual_attention(attn, x, mask)[~mask])


def test_self_attention_matches_torch_multihead_attention():
    attn = SelfAttention(16, 4).eval()
    mha = nn.MultiheadAttention(16, 4, batch_first=True).eval()
    with torch.no_grad():
        mha.in_proj_weight.copy_(attn.qkv.weight)
        mha.in_proj_bias.copy_(attn.qkv.bias)
        mha.out_proj.weight.copy_(attn.proj.weight)
        mha.out_proj.bias.copy_(attn.proj.bias)
    x = torch.randn(2, 9, 16)
    mask = torch.zeros(2, 9, dtype=torch.bool)
    mask[0, 6:] = True
    expected, _ = mha(x, x, x, key_padding_mask=mask, need_weights=False)
    torch.testing.assert_close(attn(x, mask)[~mask], expected[~mask], rtol=1e-5, atol=1e-5)


def test_self_attention_padding_invariance():
    attn = SelfAttention(16, 4).eval()
    real = torch.randn(1, 5, 16)
    reference = attn(real)
    for total in (6, 9):
        for fill in (0.0, 50.0, -50.0):
            x = torch.cat([real, torch.full((1, total - 5, 16), fill)], dim=1)
            mask = torch.arange(total)[None] >= 5
            torch.testing.assert_close(attn(x, mask)[:, :5], reference, rtol=1e-5, atol=1e-5)


def test_self_attention_causal_sees_only_the_past():
    attn = SelfAttention(8, 2, causal=True)
    x = torch.randn(1, 5, 8, requires_grad=True)
    for mask in (None, torch.zeros(1, 5, dtype=torch.bool)):
        y = attn(x, mask)
        for i in range(5):
            (grad,) = torch.autograd.grad(y[0, i].sum(), x, retain_graph=True)
            assert (grad[0, i + 1:] == 0).all()


def test_self_attention_rejects_indivisible_heads():
    with pytest.raises(ValueError, match="n_heads"):
        SelfAttention(10, 4)


# --- swap_attention on nn.TransformerEncoder -----------------------------------------------------------

SEQ, BATCH, DIM = 8, 3, 16


def stock_encoder(batch_first: bool, norm_first: bool = False) -> nn.TransformerEncoder:
    layer = nn.TransformerEncoderLayer(DIM, 4, 32, dropout=0.0, batch_first=batch_first, norm_first=norm_first)
    return nn.TransformerEncoder(layer, num_layers=2)


def as_batch_first(y: torch.Tensor, batch_first: bool) -> torch.Tensor:
    return y if batch_first else y.transpose(0, 1)


def make_input(batch_first: bool, n: int = SEQ) -> torch.Tensor:
    return torch.randn(BATCH, n, DIM) if batch_first else torch.randn(n, BATCH, DIM)


@pytest.mark.parametrize("batch_first", [True, False])
def test_swap_replaces_every_multihead_attention(batch_first):
    enc = stock_encoder(batch_first)
    assert swap_attention(enc, SEQ, 12) is enc
    assert not any(isinstance(m, nn.MultiheadAttention) for m in enc.modules())
    mixers = [m for m in enc.modules() if isinstance(m, MixingAsAttention)]
    assert len(mixers) == 2
    assert mixers[0].mixer.fc1.weight is not mixers[1].mixer.fc1.weight


@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("batch_first", [True, False])
def test_swapped_encoder_forward_backward(batch_first, norm_first):
    enc = swap_attention(stock_encoder(batch_first, norm_first), SEQ, 12)
    x = make_input(batch_first)
    y = enc(x)
    assert y.shape == x.shape and torch.isfinite(y).all()
    y.square().mean().backward()
    for m in enc.modules():
        if isinstance(m, MixingAsAttention):
            for p in (m.mixer.fc1.weight, m.mixer.fc2.weight):
                assert p.grad is not None and p.grad.abs().sum() > 0


@pytest.mark.parametrize("mode", ["train", "eval", "inference"])
@pytest.mark.parametrize("batch_first", [True, False])
def test_swapped_encoder_padding_invariance(batch_first, mode):
    """With src_key_padding_mask, outputs at real positions ignore the padding, in training, in eval
    mode, and under torch.no_grad() (where PyTorch's encoder may take its fast path)."""
    enc = swap_attention(stock_encoder(batch_first), SEQ, 12)
    enc.train(mode == "train")
    lengths = torch.tensor([SEQ, 5, 2])
    mask = torch.arange(SEQ)[None] >= lengths[:, None]  # (B, N), True at padding
    x1 = make_input(batch_first)
    x2 = x1.clone()
    pad = mask if batch_first else mask.T
    x2[pad] = torch.randn(int(pad.sum()), DIM) * 10
    with torch.set_grad_enabled(mode != "inference"):
        y1 = as_batch_first(enc(x1, src_key_padding_mask=mask), batch_first)
        y2 = as_batch_first(enc(x2, src_key_padding_mask=mask), batch_first)
    real = ~mask
    torch.testing.assert_close(y1[real], y2[real])
    # and a shorter batch equals the padded one at its real positions
    short = as_batch_first(x1, batch_first)[1:2, :5]
    with torch.set_grad_enabled(mode != "inference"):
        y_short = as_batch_first(enc(short if batch_first else short.transpose(0, 1)), batch_first)
    torch.testing.assert_close(y_short[0], y1[1, :5])


def test_swapped_module_returns_what_multihead_attention_returns():
    mixer = MixingAsAttention(DIM, SEQ, 12, batch_first=False)
    x = torch.randn(SEQ, BATCH, DIM)
    out, weights = mixer(x, x, x, need_weights=True)
    assert out.shape == x.shape and weights is None


def test_swap_refuses_cross_attention():
    # nn.TransformerDecoderLayer holds self-attention and cross-attention; the cross call must fail clearly.
    layer = swap_attention(nn.TransformerDecoderLayer(DIM, 4, 32, dropout=0.0, batch_first=True), SEQ, 12)
    tgt, memory = torch.randn(2, SEQ, DIM), torch.randn(2, SEQ, DIM)
    with pytest.raises(ValueError, match="cross-attention"):
        layer(tgt, memory)
    mixer = MixingAsAttention(DIM, SEQ, 12, batch_first=True)
    q = torch.randn(2, SEQ, DIM)
    with pytest.raises(ValueError, match="self-attention"):
        mixer(q, q.clone(), q.clone())


def test_swap_refuses_attention_with_other_key_width():
    model = nn.Sequential(nn.MultiheadAttention(DIM, 4, kdim=8, vdim=8))
    with pytest.raises(ValueError, match="self-attention"):
        swap_attention(model, SEQ, 12)


@pytest.mark.parametrize("batch_first", [True, False])
def test_swap_refuses_an_attn_mask_it_cannot_honour(batch_first):
    enc = swap_attention(stock_encoder(batch_first), SEQ, 12)
    x = make_input(batch_first)
    arbitrary = torch.rand(SEQ, SEQ) < 0.3
    arbitrary.fill_diagonal_(False)
    with pytest.raises(ValueError, match="attn_mask"):
        enc(x, mask=arbitrary)
    causal = nn.Transformer.generate_square_subsequent_mask(SEQ)
    with pytest.raises(ValueError, match="attn_mask"):  # a non-causal mixer cannot honour the causal mask either
        enc(x, mask=causal)


@pytest.mark.parametrize("batch_first", [True, False])
def test_causal_swap_honours_the_causal_mask(batch_first):
    enc = swap_attention(stock_encoder(batch_first), SEQ, SEQ, causal=True)
    causal = nn.Transformer.generate_square_subsequent_mask(SEQ)
    x = make_input(batch_first).requires_grad_()
    y = as_batch_first(enc(x, mask=causal, is_causal=True), batch_first)
    (grad,) = torch.autograd.grad(y[:, 2].sum(), x)
    grad = as_batch_first(grad, batch_first)
    assert (grad[:, 3:] == 0).all() and (grad[:, :3] != 0).any()


def test_swap_without_attention_is_an_error():
    with pytest.raises(ValueError, match="MultiheadAttention"):
        swap_attention(nn.Linear(4, 4), SEQ, 12)


def test_swap_keeps_working_on_other_models():
    """Any model: attention nested in a custom module is found and replaced."""

    class Custom(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = nn.ModuleDict({"attn": nn.MultiheadAttention(DIM, 2, batch_first=True)})

        def forward(self, x, mask=None):
            return self.inner["attn"](x, x, x, key_padding_mask=mask)[0]

    model = swap_attention(Custom(), SEQ, 12)
    assert isinstance(model.inner["attn"], MixingAsAttention)
    x = torch.randn(2, 5, DIM)
    torch.testing.assert_close(model(x), model.inner["attn"].mixer(x))
    assert isinstance(model.inner["attn"].mixer, TokenMixingMlp)
