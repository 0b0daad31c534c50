"""The parts: TokenMixingMlp against a NumPy re-derivation of Eq. 1, padding, the TokenMixer protocol,
Mlp and MixerBlock against Eq. 1 + Eq. 2."""

from __future__ import annotations

import inspect
import math

import numpy as np
import pytest
import torch

from mlpmixer import MixerBlock, Mlp, SelfAttention, TokenMixer, TokenMixingMlp


def np_gelu(x: np.ndarray) -> np.ndarray:
    """The exact GELU, x·Φ(x)."""
    return 0.5 * x * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))


NP_ACTIVATIONS = {
    "gelu": np_gelu,
    "gelu_tanh": lambda x: 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3))),
    "relu": lambda x: np.maximum(x, 0.0),
    "silu": lambda x: x / (1.0 + np.exp(-x)),
}


def np_layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float) -> np.ndarray:
    mean = x.mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(x.var(-1, keepdims=True) + eps) * weight + bias


def np_token_mixing(x: np.ndarray, w1: np.ndarray, b1: np.ndarray, w2: np.ndarray, b2: np.ndarray,
                    act=np_gelu) -> np.ndarray:
    """Eq. 1 without norm and residual, one sequence at a time: for X (N, C), Y = W2·σ(W1·X + b1) + b2.

    W1 (D_S, S), W2 (S, D_S); a sequence of N <= S tokens uses the first N columns of W1 and rows of W2.
    """
    n = x.shape[1]
    out = np.empty_like(x)
    for b in range(x.shape[0]):
        h = act(w1[:, :n] @ x[b] + b1[:, None])  # (D_S, N) @ (N, C) -> (D_S, C)
        out[b] = w2[:n] @ h + b2[:n, None]  # (N, D_S) @ (D_S, C) -> (N, C)
    return out


def weights_np(mixer: TokenMixingMlp):
    return tuple(t.detach().double().numpy() for t in
                 (mixer.fc1.weight, mixer.fc1.bias, mixer.fc2.weight, mixer.fc2.bias))


# --- TokenMixingMlp ----------------------------------------------------------------------------------

@pytest.mark.parametrize("activation", sorted(NP_ACTIVATIONS))
def test_token_mixing_matches_numpy_eq1(activation):
    mixer = TokenMixingMlp(seq_len=7, tokens_mlp_dim=5, activation=activation).double().eval()
    x = torch.randn(3, 7, 4, dtype=torch.float64)
    expected = np_token_mixing(x.numpy(), *weights_np(mixer), act=NP_ACTIVATIONS[activation])
    np.testing.assert_allclose(mixer(x).detach().numpy(), expected, rtol=1e-10, atol=1e-12)


def test_token_mixing_shares_the_mlp_across_channels_not_tokens():
    # Permuting the channels permutes the output the same way (one MLP for every channel) ...
    mixer = TokenMixingMlp(seq_len=6, tokens_mlp_dim=9).double().eval()
    x = torch.randn(2, 6, 5, dtype=torch.float64)
    perm = torch.randperm(5)
    torch.testing.assert_close(mixer(x[:, :, perm]), mixer(x)[:, :, perm])
    # ... while permuting the tokens does not (each position has its own weights).
    tok_perm = torch.tensor([1, 0, 2, 3, 4, 5])
    assert not torch.allclose(mixer(x[:, tok_perm]), mixer(x)[:, tok_perm])


def test_short_sequence_uses_the_leading_weights_numpy():
    mixer = TokenMixingMlp(seq_len=8, tokens_mlp_dim=6).double().eval()
    x = torch.randn(2, 5, 3, dtype=torch.float64)
    y = mixer(x)
    assert y.shape == (2, 5, 3)
    np.testing.assert_allclose(y.detach().numpy(), np_token_mixing(x.numpy(), *weights_np(mixer)),
                               rtol=1e-10, atol=1e-12)


def test_short_sequence_equals_explicitly_padded_sequence():
    mixer = TokenMixingMlp(seq_len=8, tokens_mlp_dim=6).eval()
    x = torch.randn(2, 5, 3)
    padded = torch.cat([x, torch.randn(2, 3, 3) * 100], dim=1)
    mask = torch.zeros(2, 8, dtype=torch.bool)
    mask[:, 5:] = True
    torch.testing.assert_close(mixer(padded, mask)[:, :5], mixer(x))


def test_padding_invariance_amount_and_content():
    """Outputs at real positions depend neither on how much padding follows nor on what it holds."""
    mixer = TokenMixingMlp(seq_len=10, tokens_mlp_dim=7).eval()
    real = torch.randn(1, 4, 6)
    reference = mixer(real)  # N < seq_len: implicitly right-padded
    for total in (4, 5, 7, 10):  # 0, 1, 3, 6 padded positions
        for fill in (0.0, 1.0, -1e4, float("nan")):
            pad = torch.full((1, total - 4, 6), fill)
            x = torch.cat([real, pad], dim=1)
            mask = torch.zeros(1, total, dtype=torch.bool)
            mask[:, 4:] = True
            y = mixer(x, mask)
            torch.testing.assert_close(y[:, :4], reference, msg=f"total {total}, padding value {fill}")
            assert torch.isfinite(y).all()


def test_padding_mask_per_sequence_in_a_batch():
    mixer = TokenMixingMlp(seq_len=6, tokens_mlp_dim=4).eval()
    lengths = [6, 3, 1]
    x = torch.randn(3, 6, 5)
    mask = torch.arange(6)[None] >= torch.tensor(lengths)[:, None]
    y = mixer(x, mask)
    for b, n in enumerate(lengths):
        torch.testing.assert_close(y[b, :n], mixer(x[b:b + 1, :n])[0])
        assert (y[b, n:] == 0).all(), "outputs at padding are zero"


def test_padded_positions_get_no_gradient_through_mixing():
    mixer = TokenMixingMlp(seq_len=6, tokens_mlp_dim=4)
    x = torch.randn(2, 6, 3, requires_grad=True)
    mask = torch.zeros(2, 6, dtype=torch.bool)
    mask[:, 4:] = True
    mixer(x, mask).sum().backward()
    assert (x.grad[:, 4:] == 0).all()
    assert (x.grad[:, :4] != 0).any()


def test_longer_than_seq_len_is_a_clear_error():
    mixer = TokenMixingMlp(seq_len=8, tokens_mlp_dim=4)
    with pytest.raises(ValueError) as err:
        mixer(torch.randn(1, 11, 3))
    assert "11" in str(err.value) and "8" in str(err.value)


@pytest.mark.parametrize("seq_len, dim", [(0, 4), (4, 0), (-1, 4)])
def test_token_mixing_rejects_non_positive_sizes(seq_len, dim):
    with pytest.raises(ValueError):
        TokenMixingMlp(seq_len, dim)


def test_weight_names_and_shapes_follow_timm():
    mixer = TokenMixingMlp(seq_len=7, tokens_mlp_dim=5)
    assert {k: tuple(v.shape) for k, v in mixer.state_dict().items()} == {
        "fc1.weight": (5, 7), "fc1.bias": (5,), "fc2.weight": (7, 5), "fc2.bias": (7,)}


def test_dropout_only_in_training():
    mixer = TokenMixingMlp(seq_len=6, tokens_mlp_dim=32, dropout=0.5)
    x = torch.randn(2, 6, 8)
    mixer.eval()
    torch.testing.assert_close(mixer(x), mixer(x))
    mixer.train()
    assert not torch.allclose(mixer(x), mixer(x))


def test_causal_token_mixing_sees_only_the_past():
    mixer = TokenMixingMlp(seq_len=6, tokens_mlp_dim=6, causal=True)
    x = torch.randn(1, 6, 3, requires_grad=True)
    y = mixer(x)
    for i in range(6):
        (grad,) = torch.autograd.grad(y[0, i].sum(), x, retain_graph=True)
        assert (grad[0, i + 1:] == 0).all(), f"output {i} depends on a later input"
        assert (grad[0, : i + 1] != 0).any()


def test_causal_needs_square_hidden_layer():
    with pytest.raises(ValueError, match="tokens_mlp_dim"):
        TokenMixingMlp(seq_len=6, tokens_mlp_dim=4, causal=True)


# --- the TokenMixer protocol -------------------------------------------------------------------------

@pytest.mark.parametrize("mixer", [TokenMixingMlp(8, 4), SelfAttention(16, 4)], ids=["mlp", "attention"])
def test_token_mixer_protocol(mixer):
    assert isinstance(mixer, TokenMixer)
    params = inspect.signature(mixer.forward).parameters
    assert list(params)[:2] == ["x", "padding_mask"] and params["padding_mask"].default is None
    y = mixer(torch.randn(2, 8, 16), torch.zeros(2, 8, dtype=torch.bool))
    assert y.shape == (2, 8, 16)


def test_token_mixer_protocol_rejects_non_modules():
    assert not isinstance(object(), TokenMixer)
    assert not isinstance("a string", TokenMixer)


# --- Mlp and MixerBlock --------------------------------------------------------------------------------

def test_mlp_matches_numpy():
    mlp = Mlp(5, 7).double()
    x = torch.randn(2, 3, 5, dtype=torch.float64)
    w1, b1, w2, b2 = (t.detach().numpy() for t in (mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight, mlp.fc2.bias))
    expected = np_gelu(x.numpy() @ w1.T + b1) @ w2.T + b2
    np.testing.assert_allclose(mlp(x).detach().numpy(), expected, rtol=1e-10, atol=1e-12)


def test_mixer_block_matches_eq1_and_eq2():
    """U = X + W2·σ(W1·LN(X)) along tokens; Y = U + W4·σ(W3·LN(U)) along channels."""
    seq_len, dim = 6, 5
    block = MixerBlock(dim, TokenMixingMlp(seq_len, 4), channels_mlp_dim=7).double().eval()
    x = torch.randn(2, seq_len, dim, dtype=torch.float64)
    ln = lambda norm, v: np_layer_norm(v, norm.weight.detach().numpy(), norm.bias.detach().numpy(), norm.eps)
    xn = x.numpy()
    u = xn + np_token_mixing(ln(block.norm1, xn), *weights_np(block.mlp_tokens))
    ch = block.mlp_channels
    w3, b3, w4, b4 = (t.detach().numpy() for t in (ch.fc1.weight, ch.fc1.bias, ch.fc2.weight, ch.fc2.bias))
    expected = u + np_gelu(ln(block.norm2, u) @ w3.T + b3) @ w4.T + b4
    np.testing.assert_allclose(block(x).detach().numpy(), expected, rtol=1e-9, atol=1e-10)


def test_mixer_block_forward_backward_with_either_mixer():
    for mixer in (TokenMixingMlp(8, 4), SelfAttention(16, 2)):
        block = MixerBlock(16, mixer, channels_mlp_dim=32, dropout=0.1)
        x = torch.randn(2, 8, 16)
        y = block(x, torch.zeros(2, 8, dtype=torch.bool))
        assert y.shape == x.shape and torch.isfinite(y).all()
        y.square().mean().backward()
        for name, p in block.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
