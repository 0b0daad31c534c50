"""Parity with the seed experiment's layer: labml's MLPMixer wrapping a two-layer GELU FeedForward.

labml is sequence-first: it takes [seq_len, batch, d_model], transposes to [d_model, batch, seq_len]
and applies FeedForward(seq_len, tokens_mlp_dim) on the last axis. With the same weights
(layer1 -> fc1, layer2 -> fc2) TokenMixingMlp must give the same output on (batch, seq_len, d_model).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mlpmixer import MaskedLanguageModel, MLMConfig, TokenMixingMlp

mlp_mixer = pytest.importorskip("labml_nn.transformers.mlp_mixer",
                                reason="labml-nn is not installed (pip install --no-deps labml-nn)")
feed_forward = pytest.importorskip("labml_nn.transformers.feed_forward",
                                   reason="labml-nn is not installed (pip install --no-deps labml-nn)")


def labml_pair(seq_len: int, tokens_mlp_dim: int, dtype=torch.float32):
    reference = mlp_mixer.MLPMixer(
        feed_forward.FeedForward(seq_len, tokens_mlp_dim, dropout=0, activation=nn.GELU())).to(dtype).eval()
    ours = TokenMixingMlp(seq_len, tokens_mlp_dim).to(dtype).eval()
    with torch.no_grad():
        ours.fc1.weight.copy_(reference.mlp.layer1.weight)
        ours.fc1.bias.copy_(reference.mlp.layer1.bias)
        ours.fc2.weight.copy_(reference.mlp.layer2.weight)
        ours.fc2.bias.copy_(reference.mlp.layer2.bias)
    return reference, ours


@pytest.mark.parametrize("seq_len, tokens_mlp_dim, batch, d_model", [(32, 128, 4, 16), (7, 3, 2, 5), (16, 16, 1, 8)])
def test_token_mixing_mlp_matches_labml(seq_len, tokens_mlp_dim, batch, d_model):
    reference, ours = labml_pair(seq_len, tokens_mlp_dim, torch.float64)
    x = torch.randn(seq_len, batch, d_model, dtype=torch.float64)  # labml: sequence-first
    expected = reference(x, x, x)
    got = ours(x.transpose(0, 1)).transpose(0, 1)  # (N, B, D) -> (B, N, D) -> (N, B, D)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_token_mixing_mlp_matches_labml_float32_with_gradients():
    reference, ours = labml_pair(32, 128)
    x = torch.randn(32, 3, 16, requires_grad=True)
    x_ours = x.detach().clone().requires_grad_()
    expected = reference(x, x, x)
    got = ours(x_ours.transpose(0, 1)).transpose(0, 1)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    weights = torch.randn_like(expected)
    (expected * weights).sum().backward()
    (got * weights).sum().backward()
    torch.testing.assert_close(x_ours.grad, x.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.fc1.weight.grad, reference.mlp.layer1.weight.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours.fc2.weight.grad, reference.mlp.layer2.weight.grad, rtol=1e-4, atol=1e-5)


def test_default_mlm_block_has_the_seed_layer_shape():
    """The default model's token mixers are shaped like the seed's FeedForward(32, 128)."""
    reference, _ = labml_pair(32, 128)
    model = MaskedLanguageModel(MLMConfig(vocab_size=67))
    mixer = model.encoder.blocks[0].mlp_tokens
    assert mixer.fc1.weight.shape == reference.mlp.layer1.weight.shape
    assert mixer.fc2.weight.shape == reference.mlp.layer2.weight.shape
