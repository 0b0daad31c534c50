"""Attention in masked language modelling: the embedding and position options, and that attention learns.

The seed's setting (token embeddings scaled by √d_model, fixed sinusoidal positions added) leaves
attention with almost no signal of where a character is, so on tiny Shakespeare it stays at the
bag-of-characters level (~24 %); docs/study-attention.md has the ablation. These tests check each
option's meaning and that the recommended setting learns a task that cannot be solved without positions.
"""

from __future__ import annotations

import functools
import json
import math
import shutil

import pytest
import torch

from mlpmixer import EncoderConfig, Encoder, MaskedLanguageModel, MLMConfig, SelfAttention, load, mask_tokens
from mlpmixer.attention import RotaryEmbedding
from mlpmixer.encoder import TokenEmbedding
from mlpmixer.mlm import IGNORE_INDEX, mlm_loss

from conftest import TRAIN_ARGS

# --- rotary positions ------------------------------------------------------------------------------------


def test_rotary_scores_depend_only_on_the_relative_position():
    rot = RotaryEmbedding(8, 20)
    q, k = torch.randn(8), torch.randn(8)
    rq = rot(q.expand(1, 1, 20, 8))[0, 0]  # q placed at every position 0..19
    rk = rot(k.expand(1, 1, 20, 8))[0, 0]
    scores = rq @ rk.T  # (20, 20): scores[i, j] = <R_i q, R_j k>
    for offset in range(-19, 20):
        diagonal = torch.diagonal(scores, offset)
        torch.testing.assert_close(diagonal, diagonal[:1].expand_as(diagonal), rtol=1e-4, atol=1e-4)
    # ... and it does depend on that relative position (an identity "rotation" would pass the above)
    by_offset = torch.stack([torch.diagonal(scores, o)[0] for o in range(-5, 6)])
    assert by_offset.std() > 0.1 * scores.abs().mean()


def test_rotary_matches_a_complex_number_derivation():
    """Pairs (x_c, x_{c+D/2}) as z = x_c + i·x_{c+D/2}, multiplied by exp(i·m·θ_c), θ_c = 10000^(-2c/D)."""
    d, n = 16, 12
    x = torch.randn(2, 3, n, d, dtype=torch.float64)
    z = torch.complex(x[..., : d // 2], x[..., d // 2:])
    theta = 10000.0 ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    angle = torch.arange(n, dtype=torch.float64)[:, None] * theta
    rotated = z * torch.polar(torch.ones_like(angle), angle)
    expected = torch.cat([rotated.real, rotated.imag], dim=-1)
    torch.testing.assert_close(RotaryEmbedding(d, 32)(x.float()).double(), expected, rtol=1e-5, atol=1e-5)


def test_rotary_keeps_norms_and_leaves_position_zero_alone():
    x = torch.randn(2, 4, 10, 8)
    y = RotaryEmbedding(8, 10)(x)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1))
    torch.testing.assert_close(y[:, :, 0], x[:, :, 0])
    assert not torch.allclose(y[:, :, 1:], x[:, :, 1:])


def test_rotary_makes_attention_see_order():
    """Plain self-attention is permutation-equivariant; with rotary q and k it is not."""
    torch.manual_seed(0)
    plain = SelfAttention(16, 4).eval()
    rotary = SelfAttention(16, 4, rotary=RotaryEmbedding(4, 10)).eval()
    rotary.load_state_dict(plain.state_dict())  # the same weights: rotary adds no parameters
    x, perm = torch.randn(2, 10, 16), torch.randperm(10)
    torch.testing.assert_close(plain(x[:, perm]), plain(x)[:, perm])
    assert not torch.allclose(rotary(x[:, perm]), rotary(x)[:, perm], atol=1e-3)


def test_rotary_causal_attention_still_sees_only_the_past():
    attn = SelfAttention(16, 4, causal=True, rotary=RotaryEmbedding(4, 10)).eval()
    x = torch.randn(2, 10, 16)
    changed = x.clone()
    changed[:, 6:] = torch.randn(2, 4, 16)
    torch.testing.assert_close(attn(changed)[:, :6], attn(x)[:, :6])
    assert not torch.allclose(attn(changed)[:, 6:], attn(x)[:, 6:])


def test_rotary_encoder_rotates_in_every_block_and_adds_no_state():
    config = dict(vocab_size=20, seq_len=12, d_model=16, n_layers=2, n_heads=4, d_ff=24, token_mixer="attention")
    enc = Encoder(MLMConfig(**config, pos_embedding="rotary").encoder)
    assert all(isinstance(block.mlp_tokens.rotary, RotaryEmbedding) for block in enc.blocks)
    assert all(block.mlp_tokens.rotary is None for block in Encoder(MLMConfig(**config).encoder).blocks)
    rotary = MaskedLanguageModel(MLMConfig(**config, pos_embedding="rotary"))
    none = MaskedLanguageModel(MLMConfig(**config, pos_embedding="none"))
    assert rotary.state_dict().keys() == none.state_dict().keys()  # the checkpoint format is unchanged
    ids = torch.randint(2, 20, (3, 12))
    rotary.embed.load_state_dict(none.embed.state_dict())
    torch.testing.assert_close(rotary.embed(ids), none.embed(ids))  # no additive positions
    logits = rotary(ids)
    assert logits.shape == (3, 12, 20) and torch.isfinite(logits).all()


def test_rotary_needs_attention_and_an_even_head_width():
    with pytest.raises(ValueError, match="token_mixer 'attention'"):
        EncoderConfig(pos_embedding="rotary")  # the default mixer is the token-mixing MLP
    with pytest.raises(ValueError, match="even head width"):
        EncoderConfig(token_mixer="attention", pos_embedding="rotary", d_model=12, n_heads=4)
    EncoderConfig(token_mixer="attention", pos_embedding="rotary", causal=True)  # fine for causal LM too


# --- token embedding options -------------------------------------------------------------------------


def embedding(**overrides) -> TokenEmbedding:
    return TokenEmbedding(20, EncoderConfig(**{"seq_len": 12, "d_model": 16, **overrides}))


def test_embed_scale_multiplies_token_embeddings_by_sqrt_d_model_unless_off():
    ids = torch.randint(0, 20, (3, 12))
    scaled, plain = embedding(pos_embedding="none"), embedding(pos_embedding="none", embed_scale=False)
    plain.load_state_dict(scaled.state_dict())
    table = scaled.tokens.weight[ids.t()]  # (N, B, D)
    torch.testing.assert_close(scaled(ids), table * math.sqrt(16))
    torch.testing.assert_close(plain(ids), table)
    sinusoidal = embedding(embed_scale=False)
    sinusoidal.tokens.load_state_dict(scaled.tokens.state_dict())
    torch.testing.assert_close(sinusoidal(ids), table + sinusoidal.positions[:, None])


def test_learned_positions_start_small_and_random():
    emb = embedding(pos_embedding="learned")
    assert isinstance(emb.positions, torch.nn.Parameter) and emb.positions.shape == (12, 16)
    assert 0.01 < emb.positions.std().item() < 0.03
    assert len({tuple(row.tolist()) for row in emb.positions}) == 12  # every position distinct


def test_embed_norm_normalises_each_embedding_and_is_off_by_default():
    emb = embedding(embed_norm=True)
    out = emb(torch.randint(0, 20, (3, 12)))
    assert out.shape == (12, 3, 16)
    torch.testing.assert_close(out.mean(-1), torch.zeros(12, 3), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.std(-1, unbiased=False), torch.ones(12, 3), atol=1e-3, rtol=0)
    assert {"norm.weight", "norm.bias"} <= emb.state_dict().keys()
    assert embedding().norm is None


def test_defaults_stay_the_seed_experiments():
    c = EncoderConfig()
    assert (c.pos_embedding, c.embed_scale, c.embed_norm) == ("sinusoidal", True, False)


@pytest.mark.parametrize("field", ["embed_scale", "embed_norm"])
def test_switches_must_be_booleans(field):
    with pytest.raises(ValueError, match=field):
        EncoderConfig(**{field: "yes"})


def test_the_options_are_flags_of_train_mlm_and_recorded_in_the_run(tmp_path, sonnet_file):
    from mlpmixer.cli import main

    out = tmp_path / "run"
    assert main(["train", "mlm", "--text-file", str(sonnet_file), *TRAIN_ARGS, "--out", str(out),
                 "--token-mixer", "attention", "--n-heads", "4", "--pos-embedding", "rotary",
                 "--no-embed-scale", "--embed-norm"]) == 0
    model = json.loads((out / "config.json").read_text())["model"]
    assert (model["pos_embedding"], model["embed_scale"], model["embed_norm"]) == ("rotary", False, True)
    loaded, _ = load(out)
    assert loaded.config.pos_embedding == "rotary" and loaded.embed.norm is not None


def test_runs_saved_before_the_options_existed_still_load(tmp_path, trained_run):
    old = tmp_path / "old"
    shutil.copytree(trained_run, old)
    config = json.loads((old / "config.json").read_text())
    for field in ("embed_scale", "embed_norm"):
        del config["model"][field]
    (old / "config.json").write_text(json.dumps(config))
    before, tok = load(trained_run)
    after, _ = load(old)
    assert (after.config.embed_scale, after.config.embed_norm) == (True, False)
    ids = tok.encode("Shall I compare")[None]
    torch.testing.assert_close(after(ids), before(ids))


# --- attention learns where the characters are -----------------------------------------------------------

LETTERS = "abcdefghij"


def doubled_letters(n_pairs: int, seed: int) -> torch.Tensor:
    """Ids of a text of random letters, each written twice ("ccaajjbb..."), as ids 2.. (0, 1 are special).

    A masked letter equals one of its neighbours, so it is predictable from positions, but every letter is
    equally frequent, so a model that sees only the bag of characters in a window has little to go on.
    """
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(len(LETTERS), (n_pairs,), generator=g) + 2).repeat_interleave(2)


@functools.cache  # the seed setting's run is shared by the parametrised tests
def masked_accuracy_after_training(steps: int, **options) -> tuple[float, float]:
    """(validation masked-char accuracy, most-frequent-label accuracy) of a tiny attention MLM."""
    torch.manual_seed(0)
    vocab, n, batch = len(LETTERS) + 2, 16, 32
    config = MLMConfig(vocab_size=vocab, seq_len=n, d_model=32, n_layers=2, n_heads=4, d_ff=64,
                       dropout=0.0, token_mixer="attention", **options)
    model = MaskedLanguageModel(config)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    train, g = doubled_letters(4000, seed=1), torch.Generator().manual_seed(0)
    for _ in range(steps):
        starts = torch.randint(len(train) - n, (batch,), generator=g)
        ids = torch.stack([train[s: s + n] for s in starts.tolist()])  # (B, N) at random offsets
        inputs, labels = mask_tokens(ids, mask_id=1, vocab_size=vocab, special_ids=(0, 1), generator=g)
        loss, _, _ = mlm_loss(model(inputs), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    val = doubled_letters(1001, seed=2)[1:-1].view(-1, n)  # odd offset: windows do not start on a pair
    inputs, labels = mask_tokens(val, mask_id=1, vocab_size=vocab, special_ids=(0, 1),
                                 generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        _, correct, count = mlm_loss(model.eval()(inputs), labels)
    chosen = labels[labels != IGNORE_INDEX]
    return correct.item() / count.item(), chosen.bincount().max().item() / len(chosen)


def test_without_positions_attention_stays_at_the_bag_of_characters_level():
    """The control that makes the next test mean something: this task needs positions."""
    accuracy, majority = masked_accuracy_after_training(400, pos_embedding="none")
    assert accuracy < 0.35 and majority < 0.2


@pytest.mark.parametrize("options", [dict(pos_embedding="rotary"), dict(embed_scale=False)],
                         ids=["rotary", "no-embed-scale"])
def test_the_fixed_settings_learn_positions_where_the_seed_setting_does_not(options):
    """Rotary positions (recommended), or sinusoidal positions at the token embeddings' scale, learn the
    doubled-letter task; the seed's √d_model-scaled embeddings drown the positions and stay near the level
    of no positions at all (docs/study-attention.md shows the same on tiny Shakespeare)."""
    fixed, majority = masked_accuracy_after_training(400, **options)
    seed, _ = masked_accuracy_after_training(400)
    assert fixed > 0.45 and fixed > 3 * majority
    assert fixed > seed + 0.15
