"""Weights of the official JAX/Flax MLP-Mixer checkpoints (``.npz``, google-research/vision_transformer).

Flax keeps dense kernels as (input, output) and convolution kernels as (H, W, in, out); PyTorch's
``nn.Linear`` is (output, input) and ``nn.Conv2d`` is (out, in, H, W). The npz keys are:

    stem/kernel (P, P, 3, C), stem/bias (C,)
    MixerBlock_{i}/LayerNorm_0/{scale,bias}                                   -> blocks.i.norm1
    MixerBlock_{i}/token_mixing/Dense_0/{kernel (S, D_S), bias (D_S,)}        -> blocks.i.mlp_tokens.fc1
    MixerBlock_{i}/token_mixing/Dense_1/{kernel (D_S, S), bias (S,)}          -> blocks.i.mlp_tokens.fc2
    MixerBlock_{i}/LayerNorm_1/{scale,bias}                                   -> blocks.i.norm2
    MixerBlock_{i}/channel_mixing/Dense_{0,1}/{kernel,bias}                   -> blocks.i.mlp_channels.fc{1,2}
    pre_head_layer_norm/{scale,bias} -> norm;   head/kernel (C, classes), head/bias -> head

Flax's ``nn.gelu`` is the tanh approximation by default, so a model meant to reproduce an official
checkpoint exactly is built with ``gelu_approximate="tanh"`` (docs/vision.md measures the difference).
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .checkpoints import CheckpointError, mismatch_summary
from .vision import MlpMixer

HEAD_KEYS = ("head/kernel", "head/bias")


def official_names(num_blocks: int, head: bool = True) -> dict[str, tuple[str, str]]:
    """npz key -> (our state-dict key, how to convert: "dense" | "conv" | "copy")."""
    names = {"stem/kernel": ("stem.proj.weight", "conv"), "stem/bias": ("stem.proj.bias", "copy")}
    for i in range(num_blocks):
        ours, theirs = f"blocks.{i}", f"MixerBlock_{i}"
        for norm, ln in (("norm1", "LayerNorm_0"), ("norm2", "LayerNorm_1")):
            names[f"{theirs}/{ln}/scale"] = (f"{ours}.{norm}.weight", "copy")
            names[f"{theirs}/{ln}/bias"] = (f"{ours}.{norm}.bias", "copy")
        for mlp, flax_mlp in (("mlp_tokens", "token_mixing"), ("mlp_channels", "channel_mixing")):
            for fc, dense in (("fc1", "Dense_0"), ("fc2", "Dense_1")):
                names[f"{theirs}/{flax_mlp}/{dense}/kernel"] = (f"{ours}.{mlp}.{fc}.weight", "dense")
                names[f"{theirs}/{flax_mlp}/{dense}/bias"] = (f"{ours}.{mlp}.{fc}.bias", "copy")
    names["pre_head_layer_norm/scale"] = ("norm.weight", "copy")
    names["pre_head_layer_norm/bias"] = ("norm.bias", "copy")
    if head:
        names["head/kernel"] = ("head.weight", "dense")
        names["head/bias"] = ("head.bias", "copy")
    return names


def to_torch(array: np.ndarray, how: str) -> Tensor:
    """A Flax array in PyTorch's layout."""
    t = torch.from_numpy(np.asarray(array, dtype=np.float32))
    if how == "dense":
        return t.T  # (in, out) -> (out, in)
    if how == "conv":
        return t.permute(3, 2, 0, 1)  # (H, W, in, out) -> (out, in, H, W)
    return t


def read_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The arrays of an ``.npz`` file, never unpickling anything."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint file {str(path)!r}")
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"{path} is not a readable .npz checkpoint (not a zip archive, or truncated); give an "
                              f"official MLP-Mixer .npz file")
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {key: npz[key] for key in npz.files}
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as e:
        why = "it holds pickled Python objects, which mlpmixer never loads" if "pickle" in str(e) else str(e)
        raise CheckpointError(f"{path} is not a readable .npz checkpoint ({why})") from None


def load_official_npz(model: MlpMixer, path: str | os.PathLike, *, load_head: bool = True) -> MlpMixer:
    """Copy an official checkpoint into ``model`` (in place; returned for chaining).

    Missing, unexpected or mis-shaped arrays are one `CheckpointError` listing them. With
    ``load_head=False`` the checkpoint's head is ignored and the model's own (e.g. a zero head for a
    different number of classes, for fine-tuning) is kept.
    """
    arrays = read_npz(path)
    has_head = load_head and model.config.num_classes > 0
    names = official_names(model.config.num_blocks, head=has_head)
    ignored = set(HEAD_KEYS) if not has_head else set()
    expected = model.state_dict()
    state, misshaped = {}, []
    for key, (ours, how) in names.items():
        if key in arrays:
            value = to_torch(arrays[key], how)
            if value.shape != expected[ours].shape:
                misshaped.append(f"{key} {tuple(arrays[key].shape)} (model needs {_flax_shape(expected[ours], how)})")
            state[ours] = value
    missing = sorted(names.keys() - arrays.keys())
    unexpected = sorted(arrays.keys() - names.keys() - ignored)
    if missing or unexpected or misshaped:
        hint = ("; to fine-tune with another number of classes, pass load_head=False"
                if any(m.startswith("head/") for m in misshaped) else "; is it a checkpoint of another preset?")
        raise CheckpointError(f"{path} does not match this model "
                              f"({mismatch_summary(missing, unexpected, misshaped)}){hint}")
    with torch.no_grad():
        for ours, value in state.items():
            expected[ours].copy_(value)
    return model


def _flax_shape(tensor: Tensor, how: str) -> tuple[int, ...]:
    shape = tuple(tensor.shape)
    if how == "dense":
        return shape[::-1]
    if how == "conv":
        return shape[2], shape[3], shape[1], shape[0]
    return shape


def checkpoint_grid(path: str | os.PathLike) -> tuple[int, int, int]:
    """(patch size, sequence length S, num_classes or 0) read from an official checkpoint's shapes."""
    arrays = read_npz(path)
    try:
        patch = arrays["stem/kernel"].shape[0]
        seq_len = arrays["MixerBlock_0/token_mixing/Dense_0/kernel"].shape[0]
    except KeyError as e:
        raise CheckpointError(f"{path} is not an official MLP-Mixer checkpoint (no {e.args[0]})") from None
    classes = arrays["head/kernel"].shape[1] if "head/kernel" in arrays else 0
    return int(patch), int(seq_len), int(classes)
