"""Appendix C: after `resize_tokens`, each token-mixing MLP processes the KxK tiles independently."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mlpmixer import MlpMixer, VisionConfig, resize_tokens


def randomized(config: VisionConfig, seed: int = 0) -> MlpMixer:
    model = MlpMixer(config).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model


def tiles(x: torch.Tensor, h: int, w: int, k: int) -> list[torch.Tensor]:
    """Tokens (B, K·h·K·w, C), row-major over the big grid -> the K² tiles (B, h·w, C), row-major each."""
    b, _, c = x.shape
    grid = x.reshape(b, k, h, k, w, c)  # (B, tile row, row in tile, tile column, column in tile, C)
    return [grid[:, a, :, t, :, :].reshape(b, h * w, c) for a in range(k) for t in range(k)]


@settings(max_examples=25, deadline=None)
@given(h=st.integers(1, 3), w=st.integers(1, 3), k=st.integers(2, 3), d_s=st.integers(1, 4),
       seed=st.integers(0, 2**16))
def test_resized_token_mlp_processes_each_tile_with_the_original(h, w, k, d_s, seed):
    config = VisionConfig(patch_size=1, hidden_dim=3, tokens_mlp_dim=d_s, channels_mlp_dim=4, num_blocks=2,
                          num_classes=2, img_size=(h, w), in_chans=1)
    model = randomized(config, seed)
    originals = [block.mlp_tokens for block in model.blocks]
    resize_tokens(model, (k * h, k * w))
    x = torch.randn(2, k * h * k * w, 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)
    with torch.no_grad():
        for block, original in zip(model.blocks, originals):
            resized = block.mlp_tokens
            assert resized.fc1.weight.shape == (k * k * d_s, k * k * h * w)
            got = tiles(resized(x), h, w, k)
            want = [original(tile) for tile in tiles(x, h, w, k)]
            for g, e in zip(got, want):
                torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)


def test_tiled_image_gives_the_original_logits():
    """Stem, channel MLPs and norms act per token, so a KxK tiling of an image keeps its logits."""
    config = VisionConfig(patch_size=2, hidden_dim=6, tokens_mlp_dim=4, channels_mlp_dim=8, num_blocks=2,
                          num_classes=5, img_size=(6, 4))
    model = randomized(config)
    image = torch.randn(2, 3, 6, 4)
    with torch.no_grad():
        before = model(image)
        resize_tokens(model, (12, 8))
        after = model(image.repeat(1, 1, 2, 2))  # 2x2 copies of the image
    assert model.config.img_size == (12, 8) and model.config.tokens_mlp_dim == 16
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # a different image in each tile no longer gives the same logits: the test can fail
        assert not torch.allclose(model(torch.randn(2, 3, 12, 8)), before, atol=1e-3)


def test_resize_by_one_and_bad_factors():
    model = randomized(VisionConfig(patch_size=2, hidden_dim=4, tokens_mlp_dim=3, channels_mlp_dim=4, num_blocks=1,
                                    num_classes=2, img_size=8))
    assert resize_tokens(model, 8).config.tokens_mlp_dim == 3
    with pytest.raises(ValueError, match="not an integer multiple"):
        resize_tokens(model, 12)  # grid 4x4 -> 6x6: K = 1.5
    with pytest.raises(ValueError, match=r"factors differ along height \(2\) and width \(3\)"):
        resize_tokens(model, (16, 24))
    with pytest.raises(ValueError, match="not divisible by the patch size 2"):
        resize_tokens(model, 17)
    resize_tokens(model, 16)
    assert model.config.img_size == 16 and model(torch.randn(1, 3, 16, 16)).shape == (1, 2)
