"""Fourier mixing (FNet) and gMLP's gated mixer: against numpy.fft, a NumPy re-derivation of the gMLP
equations and labml-nn's FNetMix; padding, causality, bf16; through the encoder, swap_attention, the CLI
and resume."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from mlpmixer import EncoderConfig, MaskedLanguageModel, load, swap_attention
from mlpmixer.text_train import TextSource, resume_text, train_text
from mlpmixer.attention import MixingAsAttention
from mlpmixer.cli import main
from mlpmixer.encoder import TOKEN_MIXERS, Encoder
from mlpmixer.lm import LMConfig
from mlpmixer.mixers import FourierMixing, GatedMlpMixer, SpatialGatingUnit
from mlpmixer.train import TrainConfig

from conftest import TRAIN_ARGS

SEQ, BATCH, DIM, FFN = 8, 3, 6, 10
FOURIER_REFUSAL = "Fourier mixing is not causal: every output sees every position"


def make(kind: str, dtype=torch.float64) -> nn.Module:
    """A mixer by test name, with every weight random and O(1) so that no mixing path is negligible."""
    if kind == "fourier":
        return FourierMixing(SEQ).to(dtype)
    mixer = GatedMlpMixer(DIM, FFN, SEQ, causal=kind == "gmlp-causal").to(dtype)
    with torch.no_grad():
        for p in mixer.parameters():
            p.copy_(torch.randn_like(p))
    return mixer


MIXERS = ("fourier", "gmlp", "gmlp-causal")


# --- against independent references -----------------------------------------------------------------------

@pytest.mark.parametrize("n", [SEQ, 5])
def test_fourier_matches_numpy_fft(n):
    x = torch.randn(BATCH, n, DIM, dtype=torch.float64)
    got = FourierMixing(SEQ)(x).numpy()
    # Re(F_seq(F_hidden(x))) with the sequence transform zero-padded to seq_len, read at the first n rows
    expected = np.fft.fft(np.fft.fft(x.numpy(), axis=2), n=SEQ, axis=1).real[:, :n]
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)


def test_fourier_matches_labml_fnet():
    fnet = pytest.importorskip("labml_nn.transformers.fnet",
                               reason="labml-nn is not installed (pip install --no-deps labml-nn)")
    x = torch.randn(SEQ, BATCH, DIM, dtype=torch.float64)  # labml: sequence-first, no mask
    expected = fnet.FNetMix()(x, x, x)
    got = FourierMixing(SEQ)(x.transpose(0, 1)).transpose(0, 1)  # (N, B, D) -> (B, N, D) -> (N, B, D)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def numpy_gmlp(m: GatedMlpMixer, x: np.ndarray, mask: np.ndarray | None, causal: bool) -> np.ndarray:
    """The paper's equations on (B, N, D): Z = GELU(X U + c); Z1, Z2 = split(Z);
    s = Z1 ⊙ (W · LN(Z2) + b); Y = s V + e; with W lower-triangular when causal, padded rows zeroed."""
    from math import erf

    w_in, b_in = m.fc1.weight.detach().numpy(), m.fc1.bias.detach().numpy()
    w_out, b_out = m.fc2.weight.detach().numpy(), m.fc2.bias.detach().numpy()
    w, b = m.gate.proj.weight.detach().numpy(), m.gate.proj.bias.detach().numpy()
    gamma, beta = m.gate.norm.weight.detach().numpy(), m.gate.norm.bias.detach().numpy()
    n = x.shape[1]
    w, b = (np.tril(w) if causal else w)[:n, :n], b[:n]
    z = x @ w_in.T + b_in
    z = 0.5 * z * (1 + np.vectorize(erf)(z / np.sqrt(2)))
    z1, z2 = np.split(z, 2, axis=-1)
    mu, var = z2.mean(-1, keepdims=True), z2.var(-1, keepdims=True)
    z2 = (z2 - mu) / np.sqrt(var + m.gate.norm.eps) * gamma + beta
    if mask is not None:
        z2 = np.where(mask[..., None], 0.0, z2)
    s = z1 * (np.einsum("ij,bjf->bif", w, z2) + b[:, None])
    y = s @ w_out.T + b_out
    return y if mask is None else np.where(mask[..., None], 0.0, y)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("n, padded", [(SEQ, False), (5, False), (SEQ, True)])
def test_gmlp_matches_the_papers_equations(causal, n, padded):
    m = make("gmlp-causal" if causal else "gmlp")
    x = torch.randn(BATCH, n, DIM, dtype=torch.float64)
    mask = (torch.arange(n)[None] >= torch.tensor([n, n - 2, 1])[:, None]) if padded else None
    got = m(x, mask).detach().numpy()
    expected = numpy_gmlp(m, x.numpy(), None if mask is None else mask.numpy(), causal)
    np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-10)


def test_gmlp_initialisation_is_the_papers():
    """W near zero and b = 1: at initialisation the gate is ≈ LN(Z2)'s bias term, s(Z) ≈ Z1."""
    sgu = SpatialGatingUnit(FFN, SEQ)
    assert sgu.proj.weight.abs().max() <= 1e-3 / SEQ and sgu.proj.weight.abs().max() > 0
    assert torch.equal(sgu.proj.bias, torch.ones(SEQ))
    m = GatedMlpMixer(DIM, FFN, SEQ)
    assert {k for k, _ in m.named_parameters()} == {"fc1.weight", "fc1.bias", "gate.norm.weight", "gate.norm.bias",
                                                     "gate.proj.weight", "gate.proj.bias", "fc2.weight", "fc2.bias"}


# --- padding, length, causality, precision ------------------------------------------------------------------

@pytest.mark.parametrize("kind", MIXERS)
def test_padding_contributes_nothing(kind):
    m = make(kind)
    lengths = torch.tensor([SEQ, 5, 2])
    mask = torch.arange(SEQ)[None] >= lengths[:, None]  # (B, N), True at padding
    x1 = torch.randn(BATCH, SEQ, DIM, dtype=torch.float64, requires_grad=True)
    x2 = x1.detach().clone()
    x2[mask] = torch.randn(int(mask.sum()), DIM, dtype=torch.float64) * 100
    y1, y2 = m(x1, mask), m(x2, mask)
    torch.testing.assert_close(y1[~mask], y2[~mask], rtol=1e-12, atol=1e-12)
    assert (y1[mask] == 0).all(), "outputs at padded positions are zero"
    for b, n in enumerate(lengths.tolist()):  # the same sequence without its pads (a shorter N)
        alone = m(x1[b:b + 1, :n].detach())
        torch.testing.assert_close(alone[0], y1[b, :n].detach(), rtol=1e-10, atol=1e-10)
    y1.square().sum().backward()
    assert (x1.grad[mask] == 0).all(), "no gradient reaches a padded input"
    assert (x1.grad[~mask] != 0).any()


@pytest.mark.parametrize("kind", MIXERS)
def test_longer_than_seq_len_is_refused(kind):
    with pytest.raises(ValueError, match=f"sequence length {SEQ + 1} .* seq_len {SEQ}"):
        make(kind)(torch.randn(1, SEQ + 1, DIM, dtype=torch.float64))


def jacobian(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """dy[i] / dx[j] summed over channels: (N, N) for one sequence x of (1, N, D)."""
    jac = torch.autograd.functional.jacobian(lambda t: m(t), x)  # (1, N, D, 1, N, D)
    return jac[0, :, :, 0].abs().sum(dim=(1, 3))


def test_causal_gmlp_jacobian_is_zero_above_the_diagonal_before_and_after_a_step():
    m = make("gmlp-causal")  # W dense and O(1): only the mask can make the upper triangle vanish
    x = torch.randn(1, SEQ, DIM, dtype=torch.float64)
    opt = torch.optim.AdamW(m.parameters(), lr=0.1, weight_decay=0.1)
    for _ in range(2):
        j = jacobian(m, x)
        assert (j.triu(1) == 0).all(), "an output depends on a later position"
        assert (j[torch.ones(SEQ, SEQ, dtype=torch.bool).tril()] != 0).all(), "every j <= i reaches i"
        m(torch.randn(4, SEQ, DIM, dtype=torch.float64)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    non_causal = jacobian(make("gmlp"), x)
    assert (non_causal != 0).all(), "without the mask the test would see a violation"


def test_fourier_is_refused_where_causality_is_needed(sonnet_file, tmp_path, capsys):
    with pytest.raises(ValueError, match=FOURIER_REFUSAL):
        FourierMixing(SEQ, causal=True)
    with pytest.raises(ValueError, match=FOURIER_REFUSAL):
        EncoderConfig(token_mixer="fourier", causal=True)
    with pytest.raises(ValueError, match=FOURIER_REFUSAL):
        LMConfig(vocab_size=10, token_mixer="fourier")
    code = main(["train", "lm", "--text-file", str(sonnet_file), *TRAIN_ARGS, "--token-mixer", "fourier",
                 "--out", str(tmp_path / "run")])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mlpmixer: error:") and FOURIER_REFUSAL in err[0], err
    assert "--token-mixer mlp, gmlp or attention" in err[0]
    assert not (tmp_path / "run" / "config.json").exists()


@pytest.mark.parametrize("kind", MIXERS)
def test_bf16_autocast_is_close_to_fp32(kind):
    m = make(kind, torch.float32)
    with torch.no_grad():  # O(1) weights would make bf16 rounding of large sums the whole story
        for p in m.parameters():
            p.mul_(0.3)
    x = torch.randn(BATCH, SEQ, DIM)
    reference = m(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = m(x)
    assert torch.isfinite(low).all()
    scale = reference.abs().max()
    assert (low.float() - reference).abs().max() <= 0.05 * scale


@pytest.mark.parametrize("kind", MIXERS)
def test_batch_first_and_sequence_first_memory_agree(kind):
    """The encoder hands mixers a (B, N, D) view of sequence-first memory; the result must not depend on it."""
    m = make(kind)
    xs = torch.randn(SEQ, BATCH, DIM, dtype=torch.float64)
    mask = torch.arange(SEQ)[None] >= torch.tensor([SEQ, 4, 6])[:, None]
    torch.testing.assert_close(m(xs.transpose(0, 1), mask), m(xs.transpose(0, 1).contiguous(), mask))


# --- in the package's models ----------------------------------------------------------------------------------

@pytest.mark.parametrize("mixer", TOKEN_MIXERS)
def test_every_mixer_trains_in_the_mlm(tiny_mlm_config, mixer):
    model = MaskedLanguageModel(tiny_mlm_config(token_mixer=mixer, dropout=0.1)).train()
    ids = torch.randint(2, 20, (3, 12))
    mask = torch.arange(12)[None] >= torch.tensor([12, 7, 3])[:, None]
    logits = model(ids, mask)
    assert logits.shape == (3, 12, 20) and torch.isfinite(logits).all()
    logits.float().square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    mixers = [b.mlp_tokens for b in model.encoder.blocks]
    assert len({id(m) for m in mixers}) == len(mixers), "each block owns its mixer"


@pytest.mark.parametrize("mixer", ["fourier", "gmlp"])
def test_encoder_padding_invariance(mixer):
    enc = Encoder(EncoderConfig(seq_len=SEQ, d_model=16, n_layers=2, d_ff=24, token_mixer=mixer,
                                dropout=0.0)).double().eval()
    x = torch.randn(2, SEQ, 16, dtype=torch.float64)
    mask = torch.arange(SEQ)[None] >= torch.tensor([SEQ, 5])[:, None]
    noisy = x.clone()
    noisy[mask] = 50.0
    torch.testing.assert_close(enc(x, mask)[~mask], enc(noisy, mask)[~mask])
    torch.testing.assert_close(enc(x[1:, :5])[0], enc(x, mask)[1, :5])


def test_gmlp_needs_an_even_d_ff():
    with pytest.raises(ValueError, match="d_ff must be even; got 25"):
        EncoderConfig(token_mixer="gmlp", d_ff=25)


# --- swap_attention on PyTorch's own transformer ---------------------------------------------------------------

@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("mixer", ["fourier", "gmlp"])
def test_swap_attention_with_each_mixer(mixer, batch_first):
    layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=batch_first)
    enc = swap_attention(nn.TransformerEncoder(layer, num_layers=2), SEQ, mixer=mixer, d_ffn=20)
    wrappers = [m for m in enc.modules() if isinstance(m, MixingAsAttention)]
    kind = FourierMixing if mixer == "fourier" else GatedMlpMixer
    assert len(wrappers) == 2 and all(isinstance(w.mixer, kind) for w in wrappers)
    x = torch.randn(BATCH, SEQ, 16) if batch_first else torch.randn(SEQ, BATCH, 16)
    mask = torch.arange(SEQ)[None] >= torch.tensor([SEQ, 5, 2])[:, None]
    y = enc(x, src_key_padding_mask=mask)
    assert y.shape == x.shape and torch.isfinite(y).all()
    y.square().mean().backward()
    if mixer == "gmlp":
        assert all(w.mixer.gate.proj.weight.grad.abs().sum() > 0 for w in wrappers)
        assert wrappers[0].mixer.fc1.weight.shape == (20, 16)


def test_swap_attention_causal_gmlp_and_refusals():
    layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True)
    enc = swap_attention(nn.TransformerEncoder(layer, num_layers=1), SEQ, mixer="gmlp", causal=True)
    causal_mask = nn.Transformer.generate_square_subsequent_mask(SEQ)
    x = torch.randn(2, SEQ, 16)
    y = enc(x, mask=causal_mask, is_causal=True)
    x2 = x.clone()
    x2[:, 5:] = 9.0
    torch.testing.assert_close(enc(x2, mask=causal_mask, is_causal=True)[:, :5], y[:, :5])
    stock = lambda: nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 4, 32), num_layers=1)
    with pytest.raises(ValueError, match=FOURIER_REFUSAL):
        swap_attention(stock(), SEQ, mixer="fourier", causal=True)
    with pytest.raises(ValueError, match="unknown mixer 'conv'"):
        swap_attention(stock(), SEQ, mixer="conv")
    with pytest.raises(ValueError, match="needs tokens_mlp_dim"):
        swap_attention(stock(), SEQ)


# --- end to end: CLI, fill, lm, resume ------------------------------------------------------------------------

@pytest.mark.parametrize("mixer", ["fourier", "gmlp"])
def test_cli_train_mlm_and_fill(sonnet_file, tmp_path, capsys, mixer):
    run = tmp_path / "run"
    assert main(["train", "mlm", "--text-file", str(sonnet_file), *TRAIN_ARGS, "--steps", "6",
                 "--token-mixer", mixer, "--out", str(run)]) == 0
    assert json.loads((run / "config.json").read_text())["model"]["token_mixer"] == mixer
    model, _ = load(run)
    assert model.config.token_mixer == mixer
    capsys.readouterr()
    text = "Shall I compare th_e to a s_mmer's day?"  # 39 characters: windows of 16, 16 and 7
    assert main(["fill", str(run), text]) == 0
    filled = capsys.readouterr().out.splitlines()[0]
    assert len(filled) == len(text) and "_" not in filled
    assert all(a == b for a, b in zip(filled, text) if b != "_")


def test_cli_train_lm_with_causal_gmlp_and_generate(sonnet_file, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "lm", "--text-file", str(sonnet_file), *TRAIN_ARGS, "--steps", "6",
                 "--token-mixer", "gmlp", "--out", str(run)]) == 0
    model, _ = load(run, task="lm")
    assert model.config.token_mixer == "gmlp" and all(b.mlp_tokens.causal for b in model.encoder.blocks)
    capsys.readouterr()
    assert main(["generate", str(run), "--prompt", "Shall I", "--max-new-chars", "20", "--seed", "1"]) == 0
    assert capsys.readouterr().out.startswith("Shall I")


def test_resume_with_gmlp_repeats_an_uninterrupted_run(sonnet_file, tmp_path):
    fields = dict(seq_len=16, d_model=32, n_layers=1, d_ff=32, token_mixer="gmlp", dropout=0.2)
    source = TextSource(text_file=str(sonnet_file))
    config = lambda steps: TrainConfig(steps=steps, batch_size=8, eval_every=4, log_every=2, warmup=4,
                                       ckpt_every=4, device="cpu")
    train_text("mlm", fields, config(8), source, tmp_path / "straight", quiet=True)
    train_text("mlm", fields, config(4), source, tmp_path / "part", quiet=True)
    resume_text("mlm", tmp_path / "part", changes={"steps": 8}, quiet=True)
    a, _ = load(tmp_path / "straight")
    b, _ = load(tmp_path / "part")
    for (k, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(x, y, rtol=0, atol=0, msg=k)
