"""The pre-norm encoder with its token mixer chosen by name, and its config."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from mlpmixer import Encoder, EncoderConfig, SelfAttention, TokenMixingMlp

TINY = dict(seq_len=10, d_model=16, n_layers=3, n_heads=4, d_ff=24, tokens_mlp_dim=8, dropout=0.0)


@pytest.mark.parametrize("mixer, cls", [("mlp", TokenMixingMlp), ("attention", SelfAttention)])
def test_encoder_forward_backward_shapes(mixer, cls):
    enc = Encoder(EncoderConfig(**TINY, token_mixer=mixer))
    assert len(enc.blocks) == 3
    assert all(isinstance(b.mlp_tokens, cls) for b in enc.blocks)
    for n in (10, 4):
        x = torch.randn(2, n, 16)
        y = enc(x)
        assert y.shape == (2, n, 16) and torch.isfinite(y).all()
    enc(torch.randn(2, 10, 16)).square().mean().backward()
    for name, p in enc.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("mixer", ["mlp", "attention"])
def test_each_block_owns_its_token_mixing_weights(mixer):
    enc = Encoder(EncoderConfig(**TINY, token_mixer=mixer))
    per_block = [list(b.mlp_tokens.parameters()) for b in enc.blocks]
    ptrs = [p.data_ptr() for params in per_block for p in params]
    assert len(ptrs) == len(set(ptrs)), "blocks share token-mixing storage"
    first = [p.detach().clone() for p in per_block[0]]
    assert not all(torch.equal(a, b) for a, b in zip(first, per_block[1])), "blocks start with identical weights"
    # a gradient step on one block's mixer leaves the others alone
    with torch.no_grad():
        per_block[0][0].add_(1.0)
    assert not torch.equal(per_block[0][0], per_block[1][0])
    n_mixer = sum(p.numel() for p in enc.blocks[0].mlp_tokens.parameters())
    assert sum(p.numel() for b in enc.blocks for p in b.mlp_tokens.parameters()) == 3 * n_mixer


@pytest.mark.parametrize("mixer", ["mlp", "attention"])
def test_encoder_padding_invariance(mixer):
    enc = Encoder(EncoderConfig(**TINY, token_mixer=mixer)).eval()
    real = torch.randn(1, 6, 16)
    reference = enc(real)
    for total in (7, 10):
        x = torch.cat([real, torch.randn(1, total - 6, 16) * 10], dim=1)
        mask = torch.arange(total)[None] >= 6
        torch.testing.assert_close(enc(x, mask)[:, :6], reference, rtol=1e-5, atol=1e-5)


def test_encoder_is_pre_norm_with_final_norm():
    enc = Encoder(EncoderConfig(**{**TINY, "n_layers": 1})).eval()
    block = enc.blocks[0]
    x = torch.randn(2, 10, 16)
    u = x + block.mlp_tokens(block.norm1(x))
    expected = enc.norm(u + block.mlp_channels(block.norm2(u)))
    torch.testing.assert_close(enc(x), expected)


@pytest.mark.parametrize("field, value", [
    ("token_mixer", "conv"), ("activation", "tanh"), ("pos_embedding", "rope"),
])
def test_unknown_choice_is_a_value_error_naming_it(field, value):
    with pytest.raises(ValueError) as err:
        EncoderConfig(**{field: value})
    assert field in str(err.value) and repr(value) in str(err.value)


def test_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        EncoderConfig().d_model = 3


def test_config_defaults_are_the_seed_experiment():
    c = EncoderConfig()
    assert (c.seq_len, c.d_model, c.n_layers, c.d_ff, c.tokens_mlp_dim, c.activation, c.dropout, c.token_mixer) == \
        (32, 128, 6, 256, 128, "gelu", 0.1, "mlp")
