"""Masked language modelling: the config, the model, BERT's masking procedure, the loss, fill-mask."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from mlpmixer import CharTokenizer, MaskedLanguageModel, MLMConfig, fill_mask, mask_tokens
from mlpmixer.mlm import IGNORE_INDEX, MLMTask, mlm_loss
from mlpmixer.text import chosen_positions, mlm_loss_of

# --- MLMConfig -----------------------------------------------------------------------------------------

BAD_VALUES = [
    ("vocab_size", 2), ("vocab_size", 0), ("vocab_size", 7.5),
    ("seq_len", 0), ("seq_len", -4), ("seq_len", 1.5),
    ("d_model", 0), ("n_layers", 0), ("n_heads", 0), ("d_ff", -1), ("tokens_mlp_dim", 0),
    ("dropout", 1.0), ("dropout", -0.1),
    ("token_mixer", "convolution"), ("activation", "tanh"), ("pos_embedding", "rope"),
]


@pytest.mark.parametrize("field, value", BAD_VALUES)
def test_mlm_config_rejects_bad_values_naming_the_field(field, value):
    with pytest.raises(ValueError) as err:
        MLMConfig(**{"vocab_size": 10, field: value})
    assert field in str(err.value)


def test_mlm_config_cross_field_checks():
    with pytest.raises(ValueError, match="n_heads"):
        MLMConfig(vocab_size=10, token_mixer="attention", d_model=30, n_heads=8)
    with pytest.raises(ValueError, match="tokens_mlp_dim"):
        MLMConfig(vocab_size=10, causal=True, seq_len=16, tokens_mlp_dim=8)


def test_mlm_config_is_frozen_and_needs_the_vocabulary():
    config = MLMConfig(vocab_size=10)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.vocab_size = 11
    with pytest.raises(TypeError):
        MLMConfig()
    assert config.encoder.d_model == config.d_model and not hasattr(config.encoder, "vocab_size")


# --- the model -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("mixer", ["mlp", "attention"])
def test_model_forward_backward(tiny_mlm_config, mixer):
    config = tiny_mlm_config(token_mixer=mixer, dropout=0.1)
    model = MaskedLanguageModel(config)
    for n in (config.seq_len, 5):
        ids = torch.randint(config.vocab_size, (3, n))
        logits = model(ids)
        assert logits.shape == (3, n, config.vocab_size) and torch.isfinite(logits).all()
    model(torch.randint(config.vocab_size, (3, config.seq_len))).logsumexp(-1).mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


@pytest.mark.parametrize("mixer", ["mlp", "attention"])
def test_model_padding_invariance(tiny_mlm_config, mixer):
    config = tiny_mlm_config(token_mixer=mixer)
    model = MaskedLanguageModel(config).eval()
    real = torch.randint(2, config.vocab_size, (1, 7))
    reference = model(real)
    for total in (8, config.seq_len):
        ids = torch.cat([real, torch.randint(config.vocab_size, (1, total - 7))], dim=1)
        mask = torch.arange(total)[None] >= 7
        torch.testing.assert_close(model(ids, mask)[:, :7], reference, rtol=1e-5, atol=1e-5)


def test_model_too_long_input_is_a_clear_error(tiny_mlm_config):
    model = MaskedLanguageModel(tiny_mlm_config(pos_embedding="none"))
    with pytest.raises(ValueError, match="13"):
        model(torch.zeros(1, 13, dtype=torch.long))


# --- mask_tokens: statistics -----------------------------------------------------------------------------

PAD, MASK, OTHER = 0, 1, 2
SPECIALS = (PAD, MASK, OTHER)


def masked_stats(vocab_size: int = 203, shape=(1000, 2000), seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(len(SPECIALS), vocab_size, shape, generator=g)
    ids[torch.rand(shape, generator=g) < 0.1] = PAD  # some padding and other specials in the stream
    ids[torch.rand(shape, generator=g) < 0.02] = OTHER
    ids[torch.rand(shape, generator=g) < 0.01] = MASK
    inputs, labels = mask_tokens(ids, mask_id=MASK, vocab_size=vocab_size, special_ids=SPECIALS,
                                 generator=torch.Generator().manual_seed(seed + 1))
    return ids, inputs, labels


def test_mask_tokens_proportions_on_millions_of_tokens():
    ids, inputs, labels = masked_stats()
    assert ids.numel() >= 10 ** 6
    ordinary = ~torch.isin(ids, torch.tensor(SPECIALS))
    chosen = labels != IGNORE_INDEX
    rate = chosen.sum().item() / ordinary.sum().item()
    assert abs(rate - 0.15) < 0.005, f"chose {rate:.4%} of ordinary tokens"
    n = chosen.sum().item()
    to_mask = (chosen & (inputs == MASK)).sum().item() / n
    replaced = (chosen & (inputs != MASK) & (inputs != ids)).sum().item() / n
    kept = (chosen & (inputs == ids)).sum().item() / n
    # a random replacement equals the original with probability 1/200; that moves 0.05 pp from
    # "replaced" to "kept", well inside the tolerance
    assert abs(to_mask - 0.80) < 0.005, f"[MASK] {to_mask:.4%}"
    assert abs(replaced - 0.10) < 0.005, f"random {replaced:.4%}"
    assert abs(kept - 0.10) < 0.005, f"unchanged {kept:.4%}"


def test_mask_tokens_labels_specials_and_replacements():
    ids, inputs, labels = masked_stats(shape=(500, 400))
    special = torch.isin(ids, torch.tensor(SPECIALS))
    chosen = labels != IGNORE_INDEX
    assert (labels[chosen] == ids[chosen]).all(), "labels hold the original ids where chosen"
    assert (inputs[~chosen] == ids[~chosen]).all(), "unchosen tokens are untouched"
    assert not (chosen & special).any(), "a special token was chosen"
    replaced = chosen & (inputs != MASK) & (inputs != ids)
    assert replaced.sum() > 1000
    assert not torch.isin(inputs[replaced], torch.tensor(SPECIALS)).any(), "a random replacement is special"
    assert not torch.isin(inputs[chosen & (inputs != MASK)], torch.tensor(SPECIALS)).any()
    # every ordinary token can be a replacement
    assert set(inputs[replaced].unique().tolist()) == set(range(3, 203))


@pytest.mark.parametrize("shape", [(), (0,), (37,), (4, 9), (2, 3, 5), (2, 1, 3, 4)])
def test_mask_tokens_any_shape(shape):
    ids = torch.randint(2, 10, shape)
    inputs, labels = mask_tokens(ids, mask_id=1, vocab_size=10, special_ids=(0, 1), mlm_probability=0.5)
    assert inputs.shape == labels.shape == ids.shape
    assert labels.dtype == torch.long and inputs.dtype == ids.dtype


def test_mask_tokens_deterministic_with_a_generator():
    ids = torch.randint(2, 50, (64, 32))
    run = lambda seed: mask_tokens(ids, mask_id=1, vocab_size=50, special_ids=(0, 1),
                                   generator=torch.Generator().manual_seed(seed))
    a, b, c = run(7), run(7), run(8)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])


def test_mask_tokens_does_not_modify_its_input():
    ids = torch.randint(2, 50, (64, 32))
    before = ids.clone()
    mask_tokens(ids, mask_id=1, vocab_size=50, special_ids=(0, 1), mlm_probability=0.9)
    assert torch.equal(ids, before)


def test_mask_tokens_argument_errors():
    ids = torch.randint(2, 10, (4, 4))
    with pytest.raises(ValueError, match="mask_id"):
        mask_tokens(ids, mask_id=5, vocab_size=10, special_ids=(0, 1))
    with pytest.raises(ValueError, match="mlm_probability"):
        mask_tokens(ids, mask_id=1, vocab_size=10, special_ids=(0, 1), mlm_probability=1.5)
    with pytest.raises(ValueError, match="ordinary"):
        mask_tokens(torch.zeros(3, dtype=torch.long), mask_id=1, vocab_size=2, special_ids=(0, 1))


# --- mask_tokens: properties ---------------------------------------------------------------------------

@st.composite
def masking_cases(draw):
    vocab_size = draw(st.integers(3, 40))
    specials = draw(st.sets(st.integers(0, vocab_size - 1), min_size=1, max_size=vocab_size - 1))
    mask_id = draw(st.sampled_from(sorted(specials)))
    shape = draw(st.lists(st.integers(0, 7), min_size=0, max_size=3))
    seed = draw(st.integers(0, 2 ** 31))
    ids = torch.randint(vocab_size, tuple(shape), generator=torch.Generator().manual_seed(seed))
    p = draw(st.sampled_from([0.05, 0.15, 0.5, 0.95]))
    return ids, vocab_size, sorted(specials), mask_id, p, seed


@settings(max_examples=150, deadline=None)
@given(masking_cases())
def test_mask_tokens_properties(case):
    ids, vocab_size, specials, mask_id, p, seed = case
    inputs, labels = mask_tokens(ids, mask_id=mask_id, vocab_size=vocab_size, special_ids=specials,
                                 mlm_probability=p, generator=torch.Generator().manual_seed(seed))
    special = torch.isin(ids, torch.tensor(specials))
    chosen = labels != IGNORE_INDEX
    assert inputs.shape == labels.shape == ids.shape
    assert not (chosen & special).any(), "specials are never chosen"
    assert torch.equal(labels[chosen], ids[chosen])
    assert torch.equal(inputs[~chosen], ids[~chosen]), "labels are -100 exactly where nothing was chosen"
    new = inputs[chosen & (inputs != mask_id)]
    assert not torch.isin(new, torch.tensor(specials)).any(), "random replacements are never special"
    assert ((new >= 0) & (new < vocab_size)).all()


# --- the loss ------------------------------------------------------------------------------------------

def test_mlm_loss_is_cross_entropy_over_chosen_positions():
    logits = torch.randn(3, 5, 11)
    labels = torch.full((3, 5), IGNORE_INDEX)
    where = torch.tensor([[0, 1], [1, 4], [2, 2], [2, 3]])
    labels[where[:, 0], where[:, 1]] = torch.tensor([3, 7, 0, 10])
    logits[0, 1, 3] = 100.0  # make two of four right
    logits[2, 3, 10] = 100.0
    loss, correct, count = mlm_loss(logits, labels)
    chosen_logits = logits[where[:, 0], where[:, 1]]
    expected = F.cross_entropy(chosen_logits, torch.tensor([3, 7, 0, 10]))
    torch.testing.assert_close(loss, expected)
    assert int(count) == 4
    assert int(correct) == int((chosen_logits.argmax(-1) == torch.tensor([3, 7, 0, 10])).sum())
    assert int(correct) >= 2


def test_mlm_loss_with_nothing_chosen_is_zero_with_zero_gradient():
    logits = torch.randn(2, 4, 7, requires_grad=True)
    loss, correct, count = mlm_loss(logits, torch.full((2, 4), IGNORE_INDEX))
    loss.backward()
    assert loss.item() == 0.0 and int(correct) == 0 and int(count) == 0
    assert torch.equal(logits.grad, torch.zeros_like(logits))


@pytest.mark.parametrize("mixer", ["mlp", "attention"])
def test_logits_at_chosen_positions_equal_the_full_logits_there(tiny_mlm_config, mixer):
    model = MaskedLanguageModel(tiny_mlm_config(token_mixer=mixer)).eval()
    ids = torch.randint(2, 20, (4, 12), generator=torch.Generator().manual_seed(0))
    inputs, labels = mask_tokens(ids, mask_id=1, vocab_size=20, special_ids=(0, 1),
                                 generator=torch.Generator().manual_seed(1))
    chosen = chosen_positions(labels)
    assert 0 < len(chosen) < labels.numel()
    b, n = torch.nonzero(labels != IGNORE_INDEX, as_tuple=True)  # the same positions, row-major
    full = model(inputs)
    torch.testing.assert_close(model(inputs, positions=chosen), full[b, n], rtol=1e-5, atol=1e-6)


def test_mlm_loss_of_the_model_equals_the_loss_of_its_full_logits(tiny_mlm_config):
    """The head applied at the chosen positions only: the same loss, counts and gradients."""
    ids = torch.randint(2, 20, (6, 12), generator=torch.Generator().manual_seed(0))
    inputs, labels = mask_tokens(ids, mask_id=1, vocab_size=20, special_ids=(0, 1),
                                 generator=torch.Generator().manual_seed(2))
    results = []
    for picked in (False, True):
        torch.manual_seed(0)
        model = MaskedLanguageModel(tiny_mlm_config())
        loss, correct, count = (mlm_loss_of(model, inputs, labels) if picked else mlm_loss(model(inputs), labels))
        loss.backward()
        results.append((loss.detach(), int(correct), int(count), {k: p.grad for k, p in model.named_parameters()}))
    (la, ca, na, ga), (lb, cb, nb, gb) = results
    torch.testing.assert_close(lb, la, rtol=1e-6, atol=1e-6)
    assert (cb, nb) == (ca, na) and na > 0
    for k in ga:
        torch.testing.assert_close(gb[k], ga[k], rtol=1e-5, atol=1e-7, msg=k)


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_mlm_loss_of_with_nothing_chosen_is_zero_with_zero_gradient(tiny_mlm_config, dtype):
    model = MaskedLanguageModel(tiny_mlm_config())
    inputs = torch.randint(2, 20, (3, 12))
    with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
        loss, correct, count = mlm_loss_of(model, inputs, torch.full((3, 12), IGNORE_INDEX))
    loss.backward()
    assert loss.item() == 0.0 and int(correct) == 0 and int(count) == 0
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())


# --- validation -----------------------------------------------------------------------------------------

def test_validation_is_deterministic(tiny_mlm_config):
    text = "the quick brown fox jumps over the lazy dog. " * 40
    tok = CharTokenizer.from_text(text)
    ids = tok.encode(text)
    task = MLMTask(ids[:1500], ids[1500:], tok, seq_len=12, batch_size=8, seed=0, device=torch.device("cpu"))
    model = MaskedLanguageModel(tiny_mlm_config(vocab_size=tok.vocab_size, dropout=0.3)).eval()
    first, second = task.summarise(task.evaluate_sums(model)), task.summarise(task.evaluate_sums(model))
    assert first == second
    assert set(first) == {"val_loss", "val_accuracy"} and 0.0 <= first["val_accuracy"] <= 1.0


# --- fill-mask -----------------------------------------------------------------------------------------

@pytest.fixture
def tiny_model_and_tokenizer(tiny_mlm_config):
    tok = CharTokenizer.from_text("abcdefghijklmnopqrstuvwxyz ,.")
    model = MaskedLanguageModel(tiny_mlm_config(vocab_size=tok.vocab_size))
    return model, tok


def test_fill_mask_completes_the_text(tiny_model_and_tokenizer):
    model, tok = tiny_model_and_tokenizer
    text = "to be, or b_"  # seq_len (12) characters
    result = fill_mask(model, tok, text, top_k=3)
    assert len(result.text) == len(text)
    assert all(a == b for a, b in zip(result.text, text) if b != "_")
    assert [i for i, _ in result.candidates] == [11]
    (position, cands), = result.candidates
    assert len(cands) == 3 and result.text[11] == cands[0][0]
    assert all(c in tok.stoi and tok.stoi[c] >= 2 for c, _ in cands)
    probs = [p for _, p in cands]
    assert probs == sorted(probs, reverse=True) and 0.0 < sum(probs) <= 1.0 + 1e-6
    # the fill is the model's most likely ordinary character
    ids = torch.tensor([[tok.mask_id if c == "_" else tok.stoi[c] for c in text]])
    logits = model.eval()(ids)[0, 11]
    logits[list(tok.special_ids)] = float("-inf")
    assert result.text[11] == tok.itos[int(logits.argmax())]


def test_fill_mask_long_text_and_many_masks(tiny_model_and_tokenizer):
    model, tok = tiny_model_and_tokenizer
    text = "a_c d_f, " * 6  # 54 characters, longer than seq_len 12
    result = fill_mask(model, tok, text, top_k=100)
    assert "_" not in result.text and len(result.text) == len(text)
    assert len(result.candidates) == 12
    assert all(len(c) == tok.vocab_size - 2 for _, c in result.candidates)


def test_fill_mask_errors(tiny_model_and_tokenizer):
    model, tok = tiny_model_and_tokenizer
    with pytest.raises(ValueError, match="mask character"):
        fill_mask(model, tok, "no masks here")
    with pytest.raises(ValueError) as err:
        fill_mask(model, tok, "caf\u00e9 _ Zed")
    assert "\u00e9" in str(err.value) and "Z" in str(err.value)
    with pytest.raises(ValueError, match="top-k"):
        fill_mask(model, tok, "a_c", top_k=0)
    with pytest.raises(ValueError, match="one character"):
        fill_mask(model, tok, "a__c", mask_char="__")
    assert fill_mask(model, tok, "a#c", mask_char="#").text[1] != "#"


def test_fill_mask_windows_see_only_their_own_window(tiny_model_and_tokenizer):
    """Texts longer than seq_len are filled window by window (consecutive windows of seq_len)."""
    model, tok = tiny_model_and_tokenizer
    first, second = "abcdefghijkl", "mnop_rst"  # seq_len 12, then a shorter last window
    result = fill_mask(model, tok, first + second, top_k=1)
    alone = fill_mask(model, tok, second, top_k=1)
    assert result.text[12:] == alone.text
    assert result.candidates[0][0] == 16
    assert result.candidates[0][1][0][1] == pytest.approx(alone.candidates[0][1][0][1], rel=1e-5)
