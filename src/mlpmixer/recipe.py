"""The default recipe for a user's image folder: a configuration chosen from what the folder holds.

The paper (Section 3 and its appendix) trains Mixers with strong augmentation and regularisation and
chooses the patch size to trade tokens against resolution. For a small folder trained on a CPU the
same ideas become a few rules, each measured in docs/vision.md:

    images of side <= 64  ->  the whole frame (no centre crop), a grid of 7-8 patches a side,
                              zoom crops of 80-100 % of the area; no flips (a flipped digit is another symbol)
    larger images         ->  a 7-8 patch grid too (Mixer-S/32's 7x7 at 224), random resized crops,
                              flips for colour images
    training images       ->  the width (C, D_S = C/2, D_C = 4C: the paper's ratios) and the batch
    epochs                ->  from the number of images (about 1,600 optimiser steps), or from --budget

The recipe chooses among configurations; it never changes what a named preset means.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

SMALL_SIDE = 64
"""Images up to this side count as small: full frame, mild zoom crops, no flips."""
MAX_TOKENS = 64
"""The patch size is the smallest power of two that leaves at most this many tokens (a 7x7 or 8x8 grid)."""
TARGET_IMAGES = 640_000
"""Training images the default epoch count aims to show (bounded to 10-100 epochs): 80 epochs of 8,000."""


@dataclass(frozen=True)
class FolderShape:
    """What the recipe looks at: the training images' count, classes, side and colour."""

    train_images: int
    classes: int
    side: int
    """Median shorter side of a sample of the training images, in pixels."""
    grey: bool
    """Every sampled image is grey (one channel, or RGB with equal channels)."""


@dataclass(frozen=True)
class Recipe:
    """A chosen configuration: model fields, training fields, epochs, the evaluation crop, and why."""

    model: dict
    """`VisionConfig` fields (patch_size, hidden_dim, ..., img_size, in_chans)."""
    train: dict
    """`VisionTrainConfig` fields (batch_size, lr, regularisers, augmentation)."""
    epochs: float
    crop_pct: float
    """Evaluation crop: 1.0 keeps the whole frame."""
    reasons: tuple[str, ...]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def choose(shape: FolderShape) -> Recipe:
    """The recipe for a folder of ``shape``."""
    small = shape.side <= SMALL_SIDE
    patch = next(p for p in (1, 2, 4, 8, 16, 32, 64) if (shape.side // p) ** 2 <= MAX_TOKENS or p == 64)
    img = max(patch, shape.side // patch * patch)
    grid = img // patch
    width, blocks = _width(shape.train_images)
    model = dict(patch_size=patch, hidden_dim=width, tokens_mlp_dim=width // 2, channels_mlp_dim=4 * width,
                 num_blocks=blocks, dropout=0.0, drop_path=0.1, img_size=img, in_chans=1 if shape.grey else 3)
    batch = 128 if shape.train_images >= 4000 else 64
    per_epoch = max(1, shape.train_images // batch)
    epochs = float(min(100, max(10, round(TARGET_IMAGES / shape.train_images))))
    hflip = not (small or shape.grey)
    if small:
        augment = dict(crop_scale=0.8, rotate=0.0, translate=0.0, hflip=False)  # shifts, rotations: measured, dropped
    else:
        augment = dict(crop_scale=0.25, rotate=0.0, translate=0.0, hflip=hflip)
    train = dict(batch_size=batch, lr=2e-3, weight_decay=0.05, label_smoothing=0.1, mixup_alpha=0.0, **augment)
    reasons = (
        f"{shape.side}-pixel {'grey' if shape.grey else 'colour'} images -> input {img}x{img}x{model['in_chans']}, "
        f"patch {patch}: {grid}x{grid} = {grid * grid} tokens",
        f"{shape.train_images:,} training images -> C {width}, D_S {width // 2}, D_C {4 * width}, {blocks} blocks, "
        f"stochastic depth 0.1, batch {batch}",
        ("small images: whole frame, zoom crops of 80-100 % area, no flips"
         if small else f"random resized crops of 25-100 % area{', flips' if hflip else ', no flips (grey images)'}"),
        f"{epochs:g} epochs ({int(epochs) * per_epoch:,} steps), AdamW 2e-3, 5 % warm-up, cosine, label smoothing 0.1, "
        f"no mixup",
    )
    return Recipe(model, train, epochs, 1.0 if small else 0.875, reasons)


def _width(train_images: int) -> tuple[int, int]:
    """Channels C and blocks for a folder of ``train_images``. Up to 20,000 images a small Mixer trained
    for more epochs beat wider ones in the same time (docs/vision.md); above that, wider with more
    data (not measured here: our largest folder has 8,000 training images)."""
    if train_images < 20000:
        return 64, 4
    if train_images < 100000:
        return 128, 6
    return 256, 8


def epochs_for_budget(budget_s: float, step_s: float, eval_s: float, steps_per_epoch: int) -> float:
    """Whole epochs (at least 1) whose training steps and per-epoch validation fit in ``budget_s``."""
    per_epoch = steps_per_epoch * step_s + eval_s
    return float(max(1, math.floor(budget_s / per_epoch)))
