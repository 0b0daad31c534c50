"""MlpMixer: presets and exact parameter counts, initialisation, a NumPy re-derivation of the paper's
equations, save/load, timm parity (where timm is importable) and bad inputs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mlpmixer import MlpMixer, VisionConfig, create_model, list_models
from mlpmixer.checkpoints import CheckpointError, write_json
from mlpmixer.vision import PRESETS

TABLE1 = [name for name in list_models() if name.endswith("_224")]


def tiny_config(**overrides) -> VisionConfig:
    """Non-square image and grid (3 x 2 patches), three input channels: catches transposed layouts."""
    fields = dict(patch_size=2, hidden_dim=8, tokens_mlp_dim=5, channels_mlp_dim=12, num_blocks=2, num_classes=7,
                  img_size=(6, 4), in_chans=3)
    return VisionConfig(**{**fields, **overrides})


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter random (LayerNorms and the zero head too), so each one shows in the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5)
    return model


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --- presets and parameter counts ------------------------------------------------------------------

@pytest.mark.parametrize("name, count", [("mixer_b16_224", 59_880_472), ("mixer_b32_224", 60_293_428),
                                         ("mixer_l16_224", 208_196_168)])
def test_parameter_counts_are_the_papers(name, count):
    with torch.device("meta"):  # no memory, no initialisation cost
        model = create_model(name)
    assert n_params(model) == count


def test_table1_presets_match_the_paper():
    table1 = {"s": (512, 256, 2048, 8), "b": (768, 384, 3072, 12), "l": (1024, 512, 4096, 24),
              "h": (1280, 640, 5120, 32)}
    assert TABLE1 == ["mixer_s32_224", "mixer_s16_224", "mixer_b32_224", "mixer_b16_224", "mixer_l32_224",
                      "mixer_l16_224", "mixer_h14_224"]
    for name in TABLE1:
        c = VisionConfig.from_name(name)
        size, patch = name.split("_")[1][0], int(name.split("_")[1][1:])
        assert (c.hidden_dim, c.tokens_mlp_dim, c.channels_mlp_dim, c.num_blocks) == table1[size]
        assert (c.patch_size, c.img_size, c.num_classes, c.in_chans) == (patch, 224, 1000, 3)


@pytest.mark.parametrize("name", list_models())
def test_every_preset_full_size_shapes(name):
    with torch.device("meta"):
        model = create_model(name)
        c = model.config
        x = torch.empty(2, c.in_chans, *c.image_hw)
        assert model.forward_features(x).shape == (2, c.num_patches, c.hidden_dim)
        assert model(x).shape == (2, c.num_classes)


@pytest.mark.parametrize("name", list_models())
def test_every_preset_forward_backward(name):
    """Full width; the Table-1 models with one block on a 2x2-patch image to stay fast on a CPU."""
    small = dict(num_blocks=1, img_size=2 * PRESETS[name]["patch_size"]) if name in TABLE1 else {}
    model = randomize_(create_model(name, **small)).train()
    c = model.config
    logits = model(torch.randn(2, c.in_chans, *c.image_hw))
    assert logits.shape == (2, c.num_classes) and torch.isfinite(logits).all()
    logits.square().mean().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.stem.proj.weight.grad.abs().sum() > 0


def test_official_initialisation():
    model = create_model("mixer_s32_224", num_blocks=1)
    fc1 = model.blocks[0].mlp_channels.fc1.weight  # (2048, 512): fan-in 512
    std = 1 / math.sqrt(512)
    assert fc1.std().item() == pytest.approx(std, rel=0.02)
    assert fc1.abs().max().item() <= 2 * std / 0.87962566103423978 + 1e-6  # truncated at two sigma
    stem = model.stem.proj.weight  # (512, 3, 32, 32): fan-in 3072
    assert stem.std().item() == pytest.approx(1 / math.sqrt(3 * 32 * 32), rel=0.02)
    assert model.head.weight.abs().sum() == 0 and model.head.bias.abs().sum() == 0
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            assert p.abs().sum() == 0, name
    assert torch.all(model.norm.weight == 1)


def test_state_dict_keys_are_timms():
    keys = set(MlpMixer(tiny_config(num_blocks=1)).state_dict())
    assert keys == {"stem.proj.weight", "stem.proj.bias", "norm.weight", "norm.bias", "head.weight", "head.bias",
                    *(f"blocks.0.{m}.{p}" for m in ("norm1", "norm2") for p in ("weight", "bias")),
                    *(f"blocks.0.{m}.{fc}.{p}" for m in ("mlp_tokens", "mlp_channels") for fc in ("fc1", "fc2")
                      for p in ("weight", "bias"))}
    model = MlpMixer(tiny_config())
    assert model.blocks[0].mlp_tokens.fc1.weight.shape == (5, 6)  # (D_S, S) whatever the forward does


# --- the paper's equations, re-derived in NumPy -----------------------------------------------------

def numpy_mixer(model: MlpMixer, images: np.ndarray, gelu) -> np.ndarray:
    """Fig. 1 and Eqs. 1-2, written from the paper with float64 arrays; X is (S, C) per image."""
    w = {k: v.detach().double().numpy() for k, v in model.state_dict().items()}
    c, p = model.config, model.config.patch_size
    h, wd = c.grid_size

    def layer_norm(x, g, b):
        mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + 1e-6) * g + b

    out = []
    for img in images:  # (in_chans, H, W)
        patches = np.stack([img[:, i * p:(i + 1) * p, j * p:(j + 1) * p].reshape(-1)  # row-major over the grid
                            for i in range(h) for j in range(wd)])  # (S, in_chans·P·P)
        x = patches @ w["stem.proj.weight"].reshape(c.hidden_dim, -1).T + w["stem.proj.bias"]  # (S, C)
        for i in range(c.num_blocks):
            b = f"blocks.{i}."
            ln = layer_norm(x, w[b + "norm1.weight"], w[b + "norm1.bias"])
            # Eq. 1: U_{*,i} = X_{*,i} + W2 σ(W1 LayerNorm(X)_{*,i}), one column per channel i
            hidden = gelu(w[b + "mlp_tokens.fc1.weight"] @ ln + w[b + "mlp_tokens.fc1.bias"][:, None])  # (D_S, C)
            x = x + w[b + "mlp_tokens.fc2.weight"] @ hidden + w[b + "mlp_tokens.fc2.bias"][:, None]  # (S, C)
            # Eq. 2: Y_{j,*} = U_{j,*} + W4 σ(W3 LayerNorm(U)_{j,*}), one row per token j
            ln = layer_norm(x, w[b + "norm2.weight"], w[b + "norm2.bias"])
            hidden = gelu(ln @ w[b + "mlp_channels.fc1.weight"].T + w[b + "mlp_channels.fc1.bias"])  # (S, D_C)
            x = x + hidden @ w[b + "mlp_channels.fc2.weight"].T + w[b + "mlp_channels.fc2.bias"]
        pooled = layer_norm(x, w["norm.weight"], w["norm.bias"]).mean(0)  # global average pooling
        out.append(pooled @ w["head.weight"].T + w["head.bias"])
    return np.stack(out)


def gelu_exact(x):
    return 0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))


def gelu_tanh(x):
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


@pytest.mark.parametrize("approximate, gelu", [("none", gelu_exact), ("tanh", gelu_tanh)])
def test_forward_matches_numpy_equations(approximate, gelu):
    model = randomize_(MlpMixer(tiny_config(gelu_approximate=approximate))).eval()
    images = torch.randn(3, 3, 6, 4, generator=torch.Generator().manual_seed(1))
    expected = numpy_mixer(model, images.double().numpy(), gelu)
    for dtype in (torch.float32, torch.float64):
        with torch.no_grad():
            got = model.to(dtype)(images.to(dtype)).double().numpy()
        rel = np.abs(got - expected).max() / np.abs(expected).max()
        assert rel <= 1e-5, (dtype, rel)
    other = gelu_tanh if gelu is gelu_exact else gelu_exact  # the check can tell the two GELUs apart
    assert np.abs(numpy_mixer(model, images.double().numpy(), other) - expected).max() / np.abs(expected).max() > 1e-5


# --- head, pooling, save/load ----------------------------------------------------------------------

def test_forward_head_and_reset_classifier():
    model = randomize_(MlpMixer(tiny_config())).eval()
    x = torch.randn(2, 3, 6, 4)
    features = model.forward_features(x)
    assert features.shape == (2, 6, 8)
    pooled = model.forward_head(features, pre_logits=True)
    assert torch.allclose(pooled, features.mean(1)) and pooled.shape == (2, 8)
    model.reset_classifier(4)
    assert model.config.num_classes == 4 and model(x).shape == (2, 4) and model(x).abs().sum() == 0
    model.reset_classifier(0)
    assert torch.allclose(model(x), pooled)


def test_save_and_load_pretrained(tmp_path):
    model = randomize_(MlpMixer(tiny_config(gelu_approximate="tanh"))).eval()
    model.save_pretrained(tmp_path / "m", extra={"class_names": list("abcdefg")})
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "model.safetensors"]
    loaded = MlpMixer.from_pretrained(tmp_path / "m")
    assert loaded.config == model.config and not loaded.training
    x = torch.randn(2, 3, 6, 4)
    assert torch.equal(loaded(x), model(x))


def test_from_pretrained_refuses_other_directories(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        MlpMixer.from_pretrained(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="no config.json"):
        MlpMixer.from_pretrained(tmp_path)
    write_json(tmp_path / "config.json", {"task": "mlm", "model": {}})
    with pytest.raises(CheckpointError, match="'mlm' run, not a vision model"):
        MlpMixer.from_pretrained(tmp_path)


# --- bad inputs ------------------------------------------------------------------------------------

def test_config_errors_are_clear():
    with pytest.raises(ValueError, match="not divisible by the patch size 16"):
        VisionConfig.from_name("mixer_b16_224", img_size=100)
    with pytest.raises(ValueError, match="unknown model 'mixer_x'.*; choose one of mixer_s32_224"):
        create_model("mixer_x")
    with pytest.raises(ValueError, match="gelu_approximate 'erf'"):
        tiny_config(gelu_approximate="erf")
    with pytest.raises(ValueError, match="hidden_dim must be a positive integer"):
        tiny_config(hidden_dim=0)
    assert tiny_config(img_size=[6, 4]).img_size == (6, 4)  # as read back from JSON


def test_wrong_image_size_is_a_clear_error():
    model = MlpMixer(tiny_config())
    with pytest.raises(ValueError, match=r"expected images of shape \(B, 3, 6, 4\).*resize_tokens"):
        model(torch.randn(1, 3, 4, 4))


# --- timm ------------------------------------------------------------------------------------------

def test_timm_state_dict_loads_and_logits_match():
    timm = pytest.importorskip("timm", reason="timm is not importable here (it needs torchvision)")
    reference = timm.create_model("mixer_b16_224", pretrained=False).eval()
    torch.nn.init.normal_(reference.head.weight, std=0.02)  # timm's head starts at zero: logits would all be 0
    ours = create_model("mixer_b16_224").eval()
    ours.load_state_dict(reference.state_dict())  # strict: same names and shapes, no renaming
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        expected, got = reference(x), ours(x)
    assert expected.abs().max() > 0
    assert ((got - expected).abs().max() / expected.abs().max()).item() <= 1e-5
