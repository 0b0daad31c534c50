"""Reliability (issue 5): every bad input is one clear line with exit status 2, a failed run is exit
status 1, Ctrl-C 130; nothing half-made is left, nothing finished is lost, nothing is unpickled.

Each test tries the case for real through `mlpmixer.cli.main`; docs/reliability.md lists them.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from safetensors.torch import save_file

import mlpmixer
from mlpmixer import checkpoints, text, text_train
from mlpmixer.cli import main
from mlpmixer.errors import DataWarning
from mlpmixer.layers import TokenMixingMlp
from mlpmixer.vision import MlpMixer, VisionConfig

from conftest import TRAIN_ARGS
from test_images import write_folder
from test_official import flax_arrays

SRC = Path(mlpmixer.__file__).resolve().parent
VISION = ["--steps", "2", "--batch-size", "4", "--img-size", "8", "--eval-every", "2", "--log-every", "1", "--quiet"]


def one_line(capsys, needle: str, stream: str = "err") -> str:
    """The single ``mlpmixer: error:`` line on stderr, which must contain ``needle``."""
    err = getattr(capsys.readouterr(), stream)
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("mlpmixer: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert needle in lines[0], lines[0]
    return lines[0]


def train_mlm(text_file, out, *extra) -> int:
    return main(["train", "mlm", "--text-file", str(text_file), *TRAIN_ARGS, *extra, "--out", str(out)])


def copy_run(run: Path, to: Path) -> Path:
    shutil.copytree(run, to)
    return to


# --- text input ------------------------------------------------------------------------------------------

def _text(tmp_path: Path, kind: str) -> Path:
    path = tmp_path / f"{kind}.txt"
    if kind == "directory":
        path.mkdir()
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "short":
        path.write_text("To be, or not to be.\n", encoding="utf-8")
    elif kind == "invalid_utf8":
        path.write_bytes("To be, or not to b".encode() + b"\xe9 that is the question\n" * 50)
    elif kind == "binary":
        path.write_bytes(bytes(range(256)) * 8)
    return path


@pytest.mark.parametrize("kind, needle", [
    ("missing", "does not exist"), ("directory", "is a directory"), ("empty", "is empty"),
    ("short", "shorter than one batch of 8 windows of 16"), ("invalid_utf8", "not valid UTF-8 (byte offset 18)"),
    ("binary", "binary file (NUL byte at offset 0)"),
])
def test_bad_text_file(tmp_path, capsys, kind, needle):
    out = tmp_path / "run"
    assert train_mlm(_text(tmp_path, kind), out) == 2
    one_line(capsys, needle)
    assert not out.exists(), "no half-made run is left behind"


def test_unreadable_text_file(tmp_path, monkeypatch, capsys):
    path = _text(tmp_path, "short")

    def denied(self):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))

    monkeypatch.setattr(Path, "read_bytes", denied)  # chmod 000 does not stop root, who runs CI containers
    assert train_mlm(path, tmp_path / "run") == 2
    one_line(capsys, f"cannot read text file '{path}' (Permission denied); check its permissions")


# --- configuration ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("flags, needle", [
    (["--d-model", "0"], "d_model must be a positive integer, got 0"),
    (["--n-layers", "-2"], "n_layers must be a positive integer, got -2"),
    (["--tokens-mlp-dim", "0"], "tokens_mlp_dim must be a positive integer, got 0"),
    (["--batch-size", "-3"], "batch_size must be positive, got -3"),
    (["--seq-len", "5000", "--tokens-mlp-dim", "4"], "shorter than one batch of 8 windows of 5000"),
    (["--token-mixer", "mpl"], "unknown token mixer 'mpl' (did you mean 'mlp'?); choose one of mlp, attention"),
    (["--optimizer", "adam"], "unknown optimizer 'adam' (did you mean 'adamw'?)"),
    (["--steps", "many"], "argument --steps: invalid int value: 'many'"),
])
def test_bad_config_value(sonnet_file, tmp_path, capsys, flags, needle):
    out = tmp_path / "run"
    assert train_mlm(sonnet_file, out, *flags) == 2
    one_line(capsys, needle)
    assert not out.exists()


def test_unknown_preset_suggests_the_closest(tmp_path, capsys):
    assert main(["train", "vision", "--model", "mixer_b16", *VISION, "--out", str(tmp_path / "r")]) == 2
    one_line(capsys, "unknown model 'mixer_b16' (did you mean 'mixer_b16_224'?)")


def test_img_size_not_divisible_by_the_patch(tmp_path, capsys):
    assert main(["train", "vision", *VISION[:-3], "--img-size", "9", "--out", str(tmp_path / "r")]) == 2
    one_line(capsys, "image size 9x9 is not divisible by the patch size 2; use a multiple of 2")
    assert not (tmp_path / "r").exists()


# --- image folders ---------------------------------------------------------------------------------------

def test_missing_or_empty_data_dir(tmp_path, capsys):
    assert main(["train", "vision", "--data-dir", str(tmp_path / "absent"), *VISION, "--out", str(tmp_path / "r")]) == 2
    one_line(capsys, "--data-dir")
    (tmp_path / "empty").mkdir()
    assert main(["train", "vision", "--data-dir", str(tmp_path / "empty"), *VISION, "--out", str(tmp_path / "r")]) == 2
    one_line(capsys, "has no train/ folder")
    assert not (tmp_path / "r").exists()


def test_no_val_folder(tmp_path, capsys):
    root = write_folder(tmp_path / "data")
    shutil.rmtree(root / "val")
    assert main(["train", "vision", "--data-dir", str(root), *VISION, "--out", str(tmp_path / "r")]) == 2
    one_line(capsys, "has no val/ folder")


def test_class_folder_without_images(tmp_path, capsys):
    root = write_folder(tmp_path / "data")
    (root / "train" / "dog").mkdir()
    (root / "train" / "dog" / "notes.txt").write_text("not an image")
    assert main(["train", "vision", "--data-dir", str(root), *VISION, "--out", str(tmp_path / "r")]) == 2
    one_line(capsys, f"class folder {root / 'train' / 'dog'} has no readable images")


def test_corrupt_and_truncated_images_are_skipped_and_counted(tmp_path, capsys):
    root = write_folder(tmp_path / "data", per_class=3, size=(12, 9))
    (root / "train" / "cat" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    jpeg = (root / "train" / "ant" / "0.jpg").read_bytes()
    (root / "train" / "ant" / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    out = tmp_path / "run"
    assert main(["train", "vision", "--data-dir", str(root), *VISION, "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert re.search(r"mlpmixer: warning: skipped 2 unreadable images of 8 in \S+train", err), err
    assert json.loads((out / "config.json").read_text())["data"]["skipped_images"] == 2


def test_images_of_mixed_modes_and_sizes_are_converted(tmp_path):
    root = write_folder(tmp_path / "data", per_class=2, size=(12, 9))
    rng = np.random.default_rng(0)
    odd = {"grey.png": Image.fromarray(rng.integers(0, 256, (20, 7), dtype=np.uint8)),
           "rgba.png": Image.fromarray(rng.integers(0, 256, (5, 30, 4), dtype=np.uint8), "RGBA"),
           "deep.png": Image.fromarray((rng.integers(0, 65536, (16, 16))).astype(np.uint16)),
           "cmyk.jpg": Image.new("CMYK", (9, 13), (0, 255, 0, 0))}
    palette = Image.new("P", (10, 10))
    palette.info["transparency"] = 0
    odd["palette.png"] = palette
    for name, image in odd.items():
        image.save(root / "train" / "cat" / name)
    assert main(["train", "vision", "--data-dir", str(root), *VISION, "--out", str(tmp_path / "run")]) == 0


def test_sixteen_bit_images_are_scaled_not_clipped(tmp_path):
    from mlpmixer.data.images import Preprocess

    Image.fromarray(np.full((8, 8), 32768, dtype=np.uint16)).save(tmp_path / "half.png")
    x = Preprocess((8, 8), 1, crop_pct=1.0).load(tmp_path / "half.png")
    assert torch.allclose(x, torch.full_like(x, 128 / 255), atol=1 / 255)


# --- checkpoints -----------------------------------------------------------------------------------------

def test_run_dir_with_no_model(trained_run, tmp_path, capsys):
    run = copy_run(trained_run, tmp_path / "run")
    (run / "model.safetensors").unlink()
    assert main(["fill", str(run), "Shall I compare th_e"]) == 2
    one_line(capsys, "the run has no saved model yet")
    assert main(["train", "mlm", "--resume", str(run), "--quiet"]) == 0, "the trainer state holds the weights"
    assert main(["fill", str(run), "Shall I compare th_e"]) == 0, "and resume writes the model file back"
    (run / "model.safetensors").unlink()
    (run / "trainer_state.pt").unlink()
    assert main(["train", "mlm", "--resume", str(run), "--quiet"]) == 2
    one_line(capsys, "the run has no checkpoint to resume from")


def test_checkpoint_of_the_other_task(trained_run, tmp_path, capsys):
    assert main(["generate", str(trained_run)]) == 2
    one_line(capsys, "holds a 'mlm' run; this needs an lm run")
    assert main(["predict", str(trained_run), str(tmp_path / "x.png")]) == 2
    one_line(capsys, "not a vision model")
    assert main(["train", "vision", "--init", str(trained_run), *VISION, "--out", str(tmp_path / "r")]) == 2
    one_line(capsys, "not a vision model")


def test_config_and_weights_mismatch(trained_run, tmp_path, capsys):
    run = copy_run(trained_run, tmp_path / "run")
    config = json.loads((run / "config.json").read_text())
    config["model"]["d_model"] = 48
    (run / "config.json").write_text(json.dumps(config))
    assert main(["fill", str(run), "Shall I compare th_e"]) == 2
    one_line(capsys, "model.safetensors does not match this model (mis-shaped: ")


def test_truncated_model_file(trained_run, tmp_path, capsys):
    run = copy_run(trained_run, tmp_path / "run")
    data = (run / "model.safetensors").read_bytes()
    (run / "model.safetensors").write_bytes(data[: len(data) // 3])
    assert main(["fill", str(run), "Shall I compare th_e"]) == 2
    one_line(capsys, "is not a readable safetensors file")


def _tiny_digits_npz(path: Path, edit) -> Path:
    model = MlpMixer(VisionConfig.from_name("mixer_tiny_digits"))
    arrays = flax_arrays(model)
    edit(arrays)
    np.savez(path, **arrays)
    return path


def test_npz_with_missing_or_misshaped_keys(tmp_path, capsys):
    missing = _tiny_digits_npz(tmp_path / "missing.npz", lambda a: a.pop("MixerBlock_1/LayerNorm_0/scale"))
    assert main(["train", "vision", "--init", str(missing), *VISION, "--out", str(tmp_path / "r")]) == 2
    one_line(capsys, "does not match this model (missing: MixerBlock_1/LayerNorm_0/scale)")

    def shrink(arrays):
        arrays["MixerBlock_0/channel_mixing/Dense_0/kernel"] = np.zeros((64, 100), np.float32)

    misshaped = _tiny_digits_npz(tmp_path / "misshaped.npz", shrink)
    assert main(["train", "vision", "--init", str(misshaped), *VISION, "--out", str(tmp_path / "r")]) == 2
    one_line(capsys, "mis-shaped: MixerBlock_0/channel_mixing/Dense_0/kernel (64, 100) (model needs (64, 256))")
    (tmp_path / "text.npz").write_text("weights, honestly")
    assert main(["train", "vision", "--init", str(tmp_path / "text.npz"), *VISION, "--out", str(tmp_path / "r")]) == 2
    one_line(capsys, "not a readable .npz checkpoint (not a zip archive, or truncated)")
    assert not (tmp_path / "r").exists()


# --- fill ------------------------------------------------------------------------------------------------

def test_fill_bad_text(trained_run, capsys):
    assert main(["fill", str(trained_run), "Shall I compare th_e to a summer\u2019s day"]) == 2
    one_line(capsys, "characters not in the model's vocabulary: '\u2019'")
    assert main(["fill", str(trained_run), "Shall I compare thee"]) == 2
    one_line(capsys, "the text has no mask character '_'")


def test_fill_text_longer_than_seq_len_goes_window_by_window(trained_run, capsys):
    text = "Shall I compare thee to a summer's d_y? Thou art more lovely and more temperat_"  # 79 > seq_len 16
    assert main(["fill", str(trained_run), text]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out[0]) == len(text) and "_" not in out[0] and len(out) == 3


# --- the output directory --------------------------------------------------------------------------------

def test_out_holding_a_vision_run_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    MlpMixer(VisionConfig.from_name("mixer_tiny_digits")).save_pretrained(out)
    before = (out / "model.safetensors").read_bytes()
    assert main(["train", "vision", *VISION, "--out", str(out)]) == 2
    one_line(capsys, "already holds a run; pass --overwrite to replace it")
    assert (out / "model.safetensors").read_bytes() == before


def test_overwrite_keeps_the_old_run_until_the_new_one_saves(trained_run, sonnet_file, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("fp16 is valid where CUDA is available")
    run = copy_run(trained_run, tmp_path / "run")
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    assert train_mlm(sonnet_file, run, "--overwrite", "--device", "cpu", "--precision", "fp16") == 2
    one_line(capsys, "fp16 needs a CUDA device")
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before, "the old run is back"
    assert [p.name for p in tmp_path.iterdir()] == ["run"], "no backup is left behind"


def test_a_run_that_fails_before_its_first_checkpoint_leaves_nothing(sonnet_file, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(text_train, "mlm_loss_of", lambda model, inputs, labels: (model(inputs).sum() * float("nan"), 0, 1))
    out = tmp_path / "run"
    assert train_mlm(sonnet_file, out) == 1
    one_line(capsys, "the loss became nan at step 1")
    assert not out.exists(), "a run without a saved model must not be left looking like one"


# --- safety ----------------------------------------------------------------------------------------------

class _Planted:
    """Unpickling this runs ``os.system``: the marker file appears if anything unpickles it."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_malicious_trainer_state_is_refused(trained_run, tmp_path, capsys):
    run = copy_run(trained_run, tmp_path / "run")
    marker = tmp_path / "PWNED"
    torch.save({"step": 20, "optimizer": _Planted(marker), "scheduler": {}, "rng": {}}, run / "trainer_state.pt")
    assert main(["train", "mlm", "--resume", str(run), "--steps", "30", "--quiet"]) == 2
    one_line(capsys, "holds Python objects other than tensors, which mlpmixer never unpickles")
    assert not marker.exists(), "the planted pickle ran"


def test_no_code_path_unpickles_arbitrary_objects():
    """Every ``torch.load`` in the package passes ``weights_only=True``; no pickle or np.load with pickles."""
    for path in SRC.rglob("*.py"):
        source = path.read_text(encoding="utf-8")
        for call in re.findall(r"torch\.load\([^)]*\)", source):
            assert "weights_only=True" in call, f"{path.name}: {call}"
        assert not re.search(r"\bpickle\.loads?\(|allow_pickle=True|weights_only=False|\bdill\b|joblib\.load",
                             source), path.name
        for call in re.findall(r"np\.load\([^)]*\)", source):
            assert "allow_pickle=False" in call, f"{path.name}: {call}"


# --- faults ----------------------------------------------------------------------------------------------

def _fail_on_call(n: int, real, only: str = ""):
    """``real`` that fails with a full disk on its ``n``-th call whose file name holds ``only``."""
    calls = []

    def write(*args, **kwargs):
        calls.extend([1] if only in str(args[1]) else [])
        if len(calls) == n and only in str(args[1]):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(*args, **kwargs)

    return write


@pytest.mark.parametrize("target", ["weights", "trainer_state"])
def test_disk_full_at_a_checkpoint_keeps_the_previous_one(sonnet_file, tmp_path, monkeypatch, capsys, target):
    if target == "weights":
        monkeypatch.setattr(checkpoints, "save_file", _fail_on_call(2, save_file, only=".model.safetensors."))
    else:
        monkeypatch.setattr(checkpoints.torch, "save", _fail_on_call(2, torch.save))
    out = tmp_path / "run"
    assert train_mlm(sonnet_file, out, "--ckpt-every", "10") == 1
    line = one_line(capsys, "could not write the checkpoint of step 20")
    assert "No space left on device" in line and "the previous checkpoint (step 10) is kept" in line
    monkeypatch.undo()
    assert torch.load(out / "trainer_state.pt", weights_only=True)["step"] == 10
    assert checkpoints.checkpoint_step(out) == 10
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")], "no temporary files are left"
    model, tok = mlpmixer.load(out)  # the previous checkpoint still loads, and resumes
    assert main(["train", "mlm", "--resume", str(out), "--quiet"]) == 0
    assert checkpoints.checkpoint_step(out) == 20


def test_a_checkpoint_cut_between_its_two_files_resumes_from_the_trainer_state(trained_run, tmp_path, capsys):
    """A crash between the two renames leaves new weights beside the old state: the state carries its own
    weights, so the run resumes exactly from the state's step, and the newer weights still load."""
    run = copy_run(trained_run, tmp_path / "run")
    weights, _ = checkpoints.read_weights(run / "model.safetensors")
    save_file({k: v + 1.0 for k, v in weights.items()}, str(run / "model.safetensors"), metadata={"step": "25"})
    mlpmixer.load(run)  # the newer weights load for inference
    state = torch.load(run / "trainer_state.pt", weights_only=True)
    model, _ = mlpmixer.load(trained_run)
    resumed_model = copy_run(trained_run, tmp_path / "ref")
    assert main(["train", "mlm", "--resume", str(run), "--steps", "22", "--quiet"]) == 0
    assert main(["train", "mlm", "--resume", str(resumed_model), "--steps", "22", "--quiet"]) == 0
    a, b = checkpoints.read_weights(run / "model.safetensors")[0], checkpoints.read_weights(resumed_model / "model.safetensors")[0]
    assert state["step"] == 20 and all(torch.equal(a[k], b[k]) for k in a), "resumed from the state's weights"


def test_a_legacy_checkpoint_cut_between_its_two_files_is_refused_on_resume(trained_run, tmp_path, capsys):
    run = copy_run(trained_run, tmp_path / "run")
    state = torch.load(run / "trainer_state.pt", weights_only=True)
    del state["model"]  # as written before the state held the weights
    torch.save(state, run / "trainer_state.pt")
    weights, _ = checkpoints.read_weights(run / "model.safetensors")
    save_file(weights, str(run / "model.safetensors"), metadata={"step": "15"})
    assert main(["train", "mlm", "--resume", str(run), "--steps", "30", "--quiet"]) == 2
    one_line(capsys, "model.safetensors is from step 15 but trainer_state.pt from step 20")
    mlpmixer.load(run)  # the weights themselves still load


class _SignalsWhileCollected:
    """Sends ``signum`` to this process from its ``__del__`` and stays there while Python runs the handler:
    a signal that arrives while garbage collection runs a ``__del__``, as it can anywhere."""

    def __init__(self, signum: int):
        self.signum = signum

    def __del__(self):
        os.kill(os.getpid(), self.signum)
        for _ in range(10_000):  # the handler runs between these bytecodes, inside __del__
            pass


def test_a_stop_signal_inside_a_del_is_kept_and_raised_later(capsys):
    """An exception raised inside __del__ is printed ("Exception ignored", with a traceback) and dropped,
    so a handler that raised there lost the signal; it is kept and raised at the next safe point."""
    from mlpmixer.cli import _terminate
    from mlpmixer.train import Stopped, raise_deferred_stop

    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        _SignalsWhileCollected(signal.SIGTERM)  # collected at once
        assert "Exception ignored" not in capsys.readouterr().err
        with pytest.raises(Stopped) as stopped:
            raise_deferred_stop()
        raise_deferred_stop()  # raised once only
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert stopped.value.signum == signal.SIGTERM


def test_sigterm_inside_a_del_during_set_up_stops_the_run_cleanly(sonnet_file, tmp_path, monkeypatch, capsys):
    """Seen in CI: SIGTERM landed in subprocess.Popen.__del__ while a run was starting; the run printed a
    traceback and went on training. Now it stops before training, exit status 143, nothing left behind."""
    from mlpmixer import train

    real = train.choose_threads

    def set_up_with_a_collection(*args, **kwargs):
        _SignalsWhileCollected(signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(train, "choose_threads", set_up_with_a_collection)
    out = tmp_path / "run"
    assert train_mlm(sonnet_file, out) == 143
    err = capsys.readouterr().err
    assert "mlpmixer: terminated" in err and "Traceback" not in err and "Exception ignored" not in err, err
    assert not out.exists()


def test_ctrl_c_checkpoints_and_exits_130(sonnet_file, tmp_path, monkeypatch, capsys):
    real, calls = text_train.mlm_loss_of, []

    def interrupted_at_step_3(model, inputs, labels):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGINT)  # as if the user pressed Ctrl-C during step 3
        return real(model, inputs, labels)

    monkeypatch.setattr(text_train, "mlm_loss_of", interrupted_at_step_3)
    out = tmp_path / "run"
    assert train_mlm(sonnet_file, out) == 130
    err = capsys.readouterr().err
    assert f"stopped by SIGINT at step 3; checkpoint saved. Resume with: mlpmixer train mlm --resume {out}" in err
    assert "Traceback" not in err
    assert checkpoints.checkpoint_step(out) == 3


# --- the exit-status policy ------------------------------------------------------------------------------

def test_unexpected_errors_are_status_1_and_debug_shows_the_traceback(trained_run, monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise TypeError("something internal")

    monkeypatch.setattr(text, "fill_mask", broken)
    assert main(["fill", str(trained_run), "a_"]) == 1
    one_line(capsys, "unexpected TypeError: something internal (rerun with --debug for the traceback)")
    assert main(["--debug", "fill", str(trained_run), "a_"]) == 1
    assert "Traceback" in capsys.readouterr().err


# --- properties ------------------------------------------------------------------------------------------

@settings(max_examples=60, deadline=None)
@given(seq_len=st.integers(1, 12), hidden=st.integers(1, 9), channels=st.integers(1, 5),
       lengths=st.lists(st.integers(1, 12), min_size=1, max_size=4), causal=st.booleans(),
       fill=st.sampled_from([0.0, 1.0, -1e4, 1e4, float("nan"), float("inf")]), seed=st.integers(0, 2 ** 16))
def test_token_mixing_padding_invariance(seq_len, hidden, channels, lengths, causal, fill, seed):
    """Outputs at real positions equal those of the unpadded sequence, whatever the padding holds."""
    torch.manual_seed(seed)
    mixer = TokenMixingMlp(seq_len, seq_len if causal else hidden, causal=causal).eval()
    lengths = [min(n, seq_len) for n in lengths]
    x = torch.randn(len(lengths), seq_len, channels)
    mask = torch.arange(seq_len)[None] >= torch.tensor(lengths)[:, None]  # (B, N): True at padding
    y = mixer(x.masked_fill(mask[..., None], fill), mask)
    assert torch.isfinite(y).all()
    for b, n in enumerate(lengths):
        torch.testing.assert_close(y[b, :n], mixer(x[b:b + 1, :n])[0], rtol=1e-5, atol=1e-5)


def test_a_vision_run_that_fails_before_its_first_checkpoint_does_not_look_finished(tmp_path, monkeypatch, capsys):
    from mlpmixer import vision_train

    monkeypatch.setattr(vision_train, "smoothed_targets", lambda y, n, s: torch.full((len(y), n), float("nan")))
    out = tmp_path / "run"
    assert main(["train", "vision", *VISION, "--out", str(out)]) == 1
    one_line(capsys, "the loss became nan at step 1")
    assert not (out / "model.safetensors").exists()
    assert main(["predict", str(out), str(tmp_path / "x.png")]) == 2
    one_line(capsys, "does not exist" if not out.exists() else "the run has no saved model yet")


def test_every_row_of_the_reliability_table_names_a_real_test():
    """docs/reliability.md cites tests as ``R::name`` (this file) or ``test_x.py::name``; each must exist."""
    tests = Path(__file__).resolve().parent
    doc = (tests.parent / "docs" / "reliability.md").read_text(encoding="utf-8")
    cited = {(tests / ("test_reliability.py" if f == "R" else f), name)
             for f, name in re.findall(r"`(R|test_\w+\.py)::(\w+)", doc)}
    assert len(cited) > 30
    missing = [f"{path.name}::{name}" for path, name in sorted(cited) if f"def {name}(" not in path.read_text()]
    assert not missing, missing
