"""Fine-tuning at a higher resolution (the paper's Appendix C).

Scaling the input side by an integer K multiplies the number of tokens by K²: S' = K²S. The
appendix widens every token-mixing MLP by K² (D_S' = K²D_S) and initialises it block-diagonally, so
that right after resizing it processes each of the K×K spatial tiles independently with the
pre-trained weights:

    W1' = diag(W1, ..., W1)   (K²D_S, K²S)      b1' = [b1; ...; b1]
    W2' = diag(W2, ..., W2)   (K²S, K²D_S)      b2' = [b2; ...; b2]

That holds with the tokens ordered tile by tile. Ours are row-major over the full (K·h) × (K·w)
grid, so the columns of W1' (and the rows of W2', b2') are permuted: token n at grid cell (r, c)
lies in tile t = (r // h)·K + c // w at position l = (r mod h)·w + c mod w of that tile, and takes
the weights of position l in block t.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from .layers import TokenMixingMlp
from .vision import MlpMixer, to_hw


def resize_tokens(model: MlpMixer, new_img_size: int | tuple[int, int]) -> MlpMixer:
    """Resize ``model`` in place for inputs of ``new_img_size`` = K × its current size; returns it.

    Only the token-mixing MLPs change; the stem, channel MLPs, norms and head are reused as they are.
    """
    config = model.config
    (h, w), (new_h, new_w) = config.grid_size, config.grid_size_of(new_img_size)
    k = tiling_factor((h, w), (new_h, new_w), config.image_hw, to_hw(new_img_size))
    if k == 1:
        return model
    for block in model.blocks:
        old: TokenMixingMlp = block.mlp_tokens
        device, dtype = old.fc1.weight.device, old.fc1.weight.dtype
        tile, local = (t.to(device) for t in tile_positions(h, w, k))
        new = TokenMixingMlp(k * k * h * w, k * k * config.tokens_mlp_dim, dropout=config.dropout,
                             activation=config.activation).to(device, dtype)
        w1, b1, w2, b2 = block_diagonal(old.fc1.weight, old.fc1.bias, old.fc2.weight, old.fc2.bias, tile, local)
        with torch.no_grad():
            new.fc1.weight.copy_(w1)
            new.fc1.bias.copy_(b1)
            new.fc2.weight.copy_(w2)
            new.fc2.bias.copy_(b2)
        new.train(old.training)
        block.mlp_tokens = new
    img_size = new_img_size if isinstance(new_img_size, int) else to_hw(new_img_size)
    model.config = dataclasses.replace(config, img_size=img_size, tokens_mlp_dim=k * k * config.tokens_mlp_dim)
    return model


def tiling_factor(grid: tuple[int, int], new_grid: tuple[int, int], size: tuple[int, int],
                  new_size: tuple[int, int]) -> int:
    """The integer K with new_grid = K · grid along both axes; a clear error otherwise."""
    (h, w), (new_h, new_w) = grid, new_grid
    if new_h % h or new_w % w:
        raise ValueError(f"cannot resize from {size[0]}x{size[1]} to {new_size[0]}x{new_size[1]}: the token grid "
                         f"{new_h}x{new_w} is not an integer multiple of {h}x{w} (Appendix C tiles the image into "
                         f"KxK copies of the original grid)")
    if new_h // h != new_w // w:
        raise ValueError(f"cannot resize from {size[0]}x{size[1]} to {new_size[0]}x{new_size[1]}: the factors "
                         f"differ along height ({new_h // h}) and width ({new_w // w}); Appendix C needs KxK tiles")
    return new_h // h


def tile_positions(h: int, w: int, k: int) -> tuple[Tensor, Tensor]:
    """For each token of the row-major (k·h) × (k·w) grid: its tile t and its position l in that tile."""
    r = torch.arange(k * h).repeat_interleave(k * w)  # row of token n
    c = torch.arange(k * w).repeat(k * h)  # column of token n
    return (r // h) * k + c // w, (r % h) * w + c % w


def block_diagonal(w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, tile: Tensor,
                   local: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """W1 (D_S, S), b1, W2 (S, D_S), b2 -> the K²-times wider MLP, block-diagonal in tile order."""
    k2, d_s = int(tile.max()) + 1, w1.shape[0]
    in_tile = torch.nn.functional.one_hot(tile, k2).to(w1.dtype).T  # (K², S'): token n belongs to tile t
    w1_new = w1[:, local].unsqueeze(0) * in_tile.unsqueeze(1)  # (D_S, S') -> (K², D_S, S'), zero off its tile
    w2_new = w2[local].unsqueeze(1) * in_tile.T.unsqueeze(2)  # (S', D_S) -> (S', K², D_S)
    return w1_new.reshape(k2 * d_s, -1), b1.repeat(k2), w2_new.reshape(len(tile), k2 * d_s), b2[local]
