"""The official JAX checkpoint layout: a round trip through an .npz written here, and clear errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mlpmixer import MlpMixer, VisionConfig, load_official_npz
from mlpmixer.checkpoints import CheckpointError
from mlpmixer.official import checkpoint_grid
from mlpmixer.vision_train import initial_model

CONFIG = VisionConfig(patch_size=2, hidden_dim=8, tokens_mlp_dim=5, channels_mlp_dim=12, num_blocks=2,
                      num_classes=7, img_size=(6, 4), gelu_approximate="tanh")


def random_model(config: VisionConfig = CONFIG, seed: int = 0) -> MlpMixer:
    model = MlpMixer(config).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return model


def flax_arrays(model: MlpMixer) -> dict[str, np.ndarray]:
    """The model's weights in the official layout, written out by hand: kernels (in, out), HWIO conv."""
    w = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    arrays = {"stem/kernel": w["stem.proj.weight"].transpose(2, 3, 1, 0), "stem/bias": w["stem.proj.bias"],
              "pre_head_layer_norm/scale": w["norm.weight"], "pre_head_layer_norm/bias": w["norm.bias"],
              "head/kernel": w["head.weight"].T, "head/bias": w["head.bias"]}
    for i in range(model.config.num_blocks):
        b, f = f"blocks.{i}.", f"MixerBlock_{i}/"
        arrays |= {f + "LayerNorm_0/scale": w[b + "norm1.weight"], f + "LayerNorm_0/bias": w[b + "norm1.bias"],
                   f + "LayerNorm_1/scale": w[b + "norm2.weight"], f + "LayerNorm_1/bias": w[b + "norm2.bias"]}
        for flax, ours in (("token_mixing", "mlp_tokens"), ("channel_mixing", "mlp_channels")):
            for dense, fc in (("Dense_0", "fc1"), ("Dense_1", "fc2")):
                arrays[f"{f}{flax}/{dense}/kernel"] = w[f"{b}{ours}.{fc}.weight"].T
                arrays[f"{f}{flax}/{dense}/bias"] = w[f"{b}{ours}.{fc}.bias"]
    return arrays


def write_npz(path, arrays) -> str:
    np.savez(path, **arrays)
    return str(path)


def test_npz_round_trip(tmp_path):
    source = random_model()
    arrays = flax_arrays(source)
    assert arrays["MixerBlock_0/token_mixing/Dense_0/kernel"].shape == (6, 5)  # (S, D_S), as the issue says
    assert arrays["stem/kernel"].shape == (2, 2, 3, 8)  # (P, P, 3, C)
    path = write_npz(tmp_path / "mixer.npz", arrays)
    target = random_model(seed=1)
    assert load_official_npz(target, path) is target
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value), key
    x = torch.randn(2, 3, 6, 4)
    assert torch.equal(target(x), source(x))
    assert checkpoint_grid(path) == (2, 6, 7)


def test_mismatches_are_one_error_listing_them(tmp_path):
    arrays = flax_arrays(random_model())
    del arrays["MixerBlock_1/LayerNorm_1/scale"]
    arrays["MixerBlock_2/LayerNorm_0/scale"] = np.ones(8, np.float32)
    arrays["MixerBlock_0/token_mixing/Dense_0/kernel"] = np.zeros((12, 5), np.float32)  # a bigger image's S
    path = write_npz(tmp_path / "bad.npz", arrays)
    with pytest.raises(CheckpointError) as e:
        load_official_npz(random_model(), path)
    message = str(e.value)
    assert "missing: MixerBlock_1/LayerNorm_1/scale" in message
    assert "unexpected: MixerBlock_2/LayerNorm_0/scale" in message
    assert "mis-shaped: MixerBlock_0/token_mixing/Dense_0/kernel (12, 5) (model needs (6, 5))" in message


def test_other_number_of_classes_drops_the_head(tmp_path):
    source = random_model()
    path = write_npz(tmp_path / "mixer.npz", flax_arrays(source))
    model = MlpMixer(VisionConfig(**{**CONFIG.to_dict(), "num_classes": 3}))
    with pytest.raises(CheckpointError, match="head/kernel.*pass load_head=False"):
        load_official_npz(model, path)
    load_official_npz(model, path, load_head=False)
    assert torch.equal(model.blocks[1].mlp_channels.fc2.weight, source.blocks[1].mlp_channels.fc2.weight)
    assert model.head.weight.abs().sum() == 0  # the fresh zero head is kept


def test_not_an_npz_and_pickles_are_refused(tmp_path):
    (tmp_path / "junk.npz").write_text("not a zip file")
    with pytest.raises(CheckpointError, match="not a readable .npz"):
        load_official_npz(random_model(), tmp_path / "junk.npz")
    np.savez(tmp_path / "pickled.npz", stem=np.array([{"a": 1}], dtype=object))
    with pytest.raises(CheckpointError, match="not a readable .npz"):
        load_official_npz(random_model(), tmp_path / "pickled.npz")
    with pytest.raises(CheckpointError, match="no checkpoint file"):
        load_official_npz(random_model(), tmp_path / "absent.npz")


def test_init_from_npz_fine_tunes_at_twice_the_resolution(tmp_path):
    """--init: the checkpoint's 7 classes become 3 (new zero head); 6x4 images become 12x8 (Appendix C)."""
    source = random_model(VisionConfig(**{**CONFIG.to_dict(), "img_size": 4}))
    path = write_npz(tmp_path / "mixer.npz", flax_arrays(source))
    target = VisionConfig(**{**CONFIG.to_dict(), "num_classes": 3, "img_size": 8})
    model = initial_model(target, path)
    assert model.config.image_hw == (8, 8) and model.config.num_classes == 3
    assert model.blocks[0].mlp_tokens.fc1.weight.shape == (4 * 5, 16)
    assert model.head.weight.abs().sum() == 0
    assert torch.equal(model.blocks[0].mlp_channels.fc1.weight, source.blocks[0].mlp_channels.fc1.weight)
