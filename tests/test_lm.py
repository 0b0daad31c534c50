"""Causal token mixing (exactly causal, before and after optimiser steps), the causal LM and generation."""

from __future__ import annotations

import math

import pytest
import torch

from mlpmixer import SelfAttention, TokenMixingMlp
from mlpmixer.cli import main
from mlpmixer.lm import CausalLanguageModel, LMConfig

TINY = ["--seq-len", "16", "--d-model", "32", "--n-layers", "1", "--d-ff", "32", "--batch-size", "8", "--quiet"]


def jacobian_upper(mixer: torch.nn.Module, n: int, d: int) -> torch.Tensor:
    """max |∂y_i/∂x_j| over j > i, for a random input (B=2, N=n, D=d)."""
    x = torch.randn(2, n, d)
    jac = torch.autograd.functional.jacobian(lambda t: mixer(t), x)  # (2, n, d, 2, n, d)
    per_position = jac.abs().sum(dim=(0, 2, 3, 5))  # (n_out, n_in)
    return per_position.triu(diagonal=1).max(), per_position.tril().max()


def _train_some_steps(mixer: torch.nn.Module, n: int, d: int, steps: int = 5) -> None:
    opt = torch.optim.Adam(mixer.parameters(), lr=0.1)
    for _ in range(steps):
        opt.zero_grad()
        mixer(torch.randn(4, n, d)).pow(2).sum().backward()
        opt.step()


@pytest.mark.parametrize("make", [lambda: TokenMixingMlp(8, 8, causal=True),
                                  lambda: SelfAttention(12, 3, causal=True)], ids=["mlp", "attention"])
def test_causal_mixers_have_exactly_zero_jacobian_above_the_diagonal(make):
    torch.manual_seed(0)
    mixer = make()
    d = 5 if isinstance(mixer, TokenMixingMlp) else 12
    upper, lower = jacobian_upper(mixer, 8, d)
    assert upper == 0.0 and lower > 0.0
    _train_some_steps(mixer, 8, d)  # the optimiser fills the upper triangle of the stored weights...
    if isinstance(mixer, TokenMixingMlp):
        assert mixer.fc1.weight.triu(1).abs().max() > 0, "the stored weights do get upper-triangle updates"
    upper, lower = jacobian_upper(mixer, 8, d)
    assert upper == 0.0 and lower > 0.0  # ...but the forward pass masks it every time


def test_causal_mlp_on_a_shorter_sequence_is_still_causal():
    mixer = TokenMixingMlp(8, 8, causal=True)
    upper, _ = jacobian_upper(mixer, 5, 3)
    assert upper == 0.0


def test_causal_mlp_needs_a_square_hidden_layer():
    with pytest.raises(ValueError, match="tokens_mlp_dim=12.*seq_len=8"):
        TokenMixingMlp(8, 12, causal=True)


@pytest.mark.parametrize("mixer", ["mlp", "attention"])
def test_causal_lm_logits_depend_only_on_the_past(mixer):
    torch.manual_seed(0)
    model = CausalLanguageModel(LMConfig(vocab_size=12, seq_len=10, tokens_mlp_dim=10, d_model=16, n_layers=2,
                                         n_heads=4, d_ff=16, dropout=0.0, token_mixer=mixer)).eval()
    ids = torch.randint(2, 12, (3, 10))
    changed = ids.clone()
    changed[:, 6:] = torch.randint(2, 12, (3, 4))
    a, b = model(ids), model(changed)
    torch.testing.assert_close(a[:, :6], b[:, :6], rtol=0, atol=0)
    assert not torch.allclose(a[:, 6:], b[:, 6:])


def test_lm_config_must_be_causal():
    with pytest.raises(ValueError, match="causal"):
        LMConfig(vocab_size=10, causal=False)


def test_train_lm_and_generate(sonnet_file, tmp_path, capsys):
    run = tmp_path / "lm"
    assert main(["train", "lm", "--text-file", str(sonnet_file), "--steps", "120", "--lr", "3",
                 "--warmup", "30", "--eval-every", "60", "--log-every", "20", "--out", str(run), *TINY]) == 0
    rows = [r for r in map(__import__("json").loads, (run / "metrics.jsonl").read_text().splitlines())
            if "val_loss" in r]
    assert rows[-1]["val_bpc"] == pytest.approx(rows[-1]["val_loss"] / math.log(2))
    assert rows[-1]["val_loss"] < rows[0]["val_loss"] < math.log(40)  # learns, and beats a uniform guess
    capsys.readouterr()
    assert main(["generate", str(run), "--prompt", "Shall I", "--max-new-chars", "30", "--seed", "3",
                 "--temperature", "0.7", "--top-k", "5"]) == 0
    first = capsys.readouterr().out
    assert first.startswith("Shall I") and len(first.rstrip("\n")) == len("Shall I") + 30
    assert main(["generate", str(run), "--prompt", "Shall I", "--max-new-chars", "30", "--seed", "3",
                 "--temperature", "0.7", "--top-k", "5"]) == 0
    assert capsys.readouterr().out == first, "a seed makes the sample repeatable"
    assert main(["generate", str(run), "--prompt", "Shall I \u00e9", "--max-new-chars", "3"]) == 2
    assert "not in the vocabulary" in capsys.readouterr().err


def test_generate_refuses_an_mlm_run(sonnet_file, tmp_path, capsys):
    run = tmp_path / "mlm"
    assert main(["train", "mlm", "--text-file", str(sonnet_file), "--steps", "2", "--out", str(run), *TINY]) == 0
    capsys.readouterr()
    assert main(["generate", str(run)]) == 2
    assert "needs an lm run" in capsys.readouterr().err


def test_study_writes_a_table_and_a_plot(sonnet_file, tmp_path, capsys):
    out = tmp_path / "study"
    code = main(["study", "lm", "--steps", "4", "--seeds", "2", "--batch-size", "8", "--text-file", str(sonnet_file),
                 "--mixers", "mlp,attention", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    table = (out / "study.md").read_text(encoding="utf-8").splitlines()
    rows = [line for line in table if line.startswith("| seed") or line.startswith("| adamw")]
    assert len(rows) == 4 and {r.split("|")[2].strip() for r in rows} == {"mlp", "attention"}
    assert all("±" in r for r in rows)
    assert (out / "study.png").read_bytes()[:4] == b"\x89PNG"
    assert len(list(out.glob("*-seed1-*"))) == 4
