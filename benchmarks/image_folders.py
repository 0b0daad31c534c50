"""Image folders made offline, for measuring the vision recipe (docs/vision.md) on data we can share.

    python -m benchmarks.image_folders digits28 data/digits28     # 10 classes, 28x28 grey, 8,000 / 2,000 / 2,000
    python -m benchmarks.image_folders shapes32 data/shapes32     # 10 classes, 32x32 RGB,  6,000 / 1,500 / 1,500

Each writes ``DIR/train/<class>/*.png``, ``DIR/val/<class>/*.png`` (what a recipe is chosen on) and
``DIR/test/<class>/*.png`` (looked at once, for the final table; never for a choice).

* ``digits28``: scikit-learn's 1,797 8x8 handwritten digits, split by *sample* before anything else
  (train / val / test bases are disjoint: 60 / 20 / 20 %), each drawn many times: upscaled
  bicubically into an 18-20 pixel box, rotated ±10°, sheared, a third with a thicker pen, centred
  by its centre of mass (±2 pixels) on a 28x28 black canvas as MNIST's digits are, with sensor
  noise. An RBF SVM on its pixels reaches 95.7 % on val (docs/vision.md).
* ``shapes32``: ten geometric shapes (disc, ring, square, frame, triangle, cross, plus, star,
  diamond, crescent) of random size, place, colour and a rotation within ±20° on random backgrounds with noise.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np

SPLITS = {"digits28": (8000, 2000, 2000), "shapes32": (6000, 1500, 1500)}
SHAPES = ("disc", "ring", "square", "frame", "triangle", "cross", "plus", "star", "diamond", "crescent")


def make(kind: str, root: str | Path, seed: int = 0, sizes: tuple[int, int, int] | None = None) -> Path:
    """Write the folder ``kind`` under ``root`` (sizes: train, val, test image counts); returns root."""
    root = Path(root)
    sizes = sizes or SPLITS[kind]
    rng = np.random.default_rng(seed)
    if kind == "digits28":
        bases = _digit_bases(rng)
        for split, count in zip(("train", "val", "test"), sizes):
            images, labels = bases[split]
            for i in range(count):
                k = int(rng.integers(len(labels)))
                _save(root / split / str(labels[k]) / f"{i:05d}.png", _digit(images[k], rng))
    elif kind == "shapes32":
        for split, count in zip(("train", "val", "test"), sizes):
            for i in range(count):
                label = int(rng.integers(len(SHAPES)))
                _save(root / split / SHAPES[label] / f"{i:05d}.png", _shape(SHAPES[label], rng))
    else:
        raise SystemExit(f"unknown folder kind {kind!r}; choose one of {', '.join(SPLITS)}")
    return root


def _digit_bases(rng: np.random.Generator) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    order = rng.permutation(len(digits.target))
    cut = [int(0.6 * len(order)), int(0.8 * len(order))]
    parts = np.split(order, cut)
    return {name: (digits.images[p] / 16.0, digits.target[p]) for name, p in zip(("train", "val", "test"), parts)}


def _digit(base: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """An 8x8 digit in [0, 1] -> a 28x28 uint8 image, white on black, laid out as MNIST's are: the
    glyph in a box of about 20 pixels, centred by its centre of mass (here within ±2 pixels)."""
    from PIL import Image, ImageFilter

    side = int(rng.integers(18, 21))
    glyph = Image.fromarray((base * 255).astype(np.uint8)).resize((side, side), Image.Resampling.BICUBIC)
    angle, shear = rng.uniform(-10, 10), rng.uniform(-0.2, 0.2)
    glyph = glyph.transform(glyph.size, Image.Transform.AFFINE, (1, shear, -shear * side / 2, 0, 1, 0),
                            resample=Image.Resampling.BILINEAR).rotate(angle, resample=Image.Resampling.BILINEAR)
    if rng.integers(3) == 0:
        glyph = glyph.filter(ImageFilter.MaxFilter(3))  # a thicker pen
    array = np.asarray(glyph, dtype=np.float32)
    ys, xs = np.indices(array.shape)
    mass = max(float(array.sum()), 1.0)
    cy, cx = float((ys * array).sum()) / mass, float((xs * array).sum()) / mass
    x = int(round(14 - cx + rng.uniform(-2, 2)))
    y = int(round(14 - cy + rng.uniform(-2, 2)))
    canvas = np.zeros((28 + 2 * side, 28 + 2 * side), dtype=np.float32)  # margins: a glyph may overhang
    canvas[side + y:side + y + side, side + x:side + x + side] = array
    array = canvas[side:side + 28, side:side + 28]
    array = np.clip(array * rng.uniform(0.85, 1.15) + rng.normal(0, 6, array.shape), 0, 255)
    return array.astype(np.uint8)


def _shape(name: str, rng: np.random.Generator) -> np.ndarray:
    """A 32x32x3 uint8 image of the shape ``name``."""
    from PIL import Image, ImageDraw

    scale = 4  # drawn at 128x128, then reduced: smooth edges
    size = 32 * scale
    background = rng.integers(0, 256, 3)
    colour = (background + rng.integers(80, 176, 3)) % 256  # never the background's colour
    image = Image.new("RGB", (size, size), tuple(int(c) for c in background))
    draw = ImageDraw.Draw(image)
    r = rng.uniform(0.22, 0.42) * size
    cx, cy = (rng.uniform(r * 0.8, size - r * 0.8) for _ in range(2))
    turn = rng.uniform(-0.35, 0.35)  # ±20°: a plus turned 45° would be a cross
    fill = tuple(int(c) for c in colour)
    width = max(2, int(r * rng.uniform(0.18, 0.3)))

    def polygon(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
        c, s = math.cos(turn), math.sin(turn)
        return [(cx + r * (x * c - y * s), cy + r * (x * s + y * c)) for x, y in points]

    def star(n: int, inner: float) -> list[tuple[float, float]]:
        return [((1 if i % 2 == 0 else inner) * math.cos(math.pi * i / n),
                 (1 if i % 2 == 0 else inner) * math.sin(math.pi * i / n)) for i in range(2 * n)]

    box = [cx - r, cy - r, cx + r, cy + r]
    if name == "disc":
        draw.ellipse(box, fill=fill)
    elif name == "ring":
        draw.ellipse(box, outline=fill, width=width)
    elif name == "square":
        draw.polygon(polygon([(-0.75, -0.75), (0.75, -0.75), (0.75, 0.75), (-0.75, 0.75)]), fill=fill)
    elif name == "frame":
        corners = polygon([(-0.75, -0.75), (0.75, -0.75), (0.75, 0.75), (-0.75, 0.75)])
        draw.line(corners + corners[:1], fill=fill, width=width, joint="curve")
    elif name == "triangle":
        draw.polygon(polygon([(math.cos(a), math.sin(a)) for a in (0, 2 * math.pi / 3, 4 * math.pi / 3)]), fill=fill)
    elif name == "cross":
        for a, b in (((-0.8, -0.8), (0.8, 0.8)), ((-0.8, 0.8), (0.8, -0.8))):
            draw.line(polygon([a, b]), fill=fill, width=width)
    elif name == "plus":
        for a, b in (((-0.9, 0), (0.9, 0)), ((0, -0.9), (0, 0.9))):
            draw.line(polygon([a, b]), fill=fill, width=width)
    elif name == "star":
        draw.polygon(polygon(star(5, 0.42)), fill=fill)
    elif name == "diamond":
        draw.polygon(polygon([(1, 0), (0, 0.6), (-1, 0), (0, -0.6)]), fill=fill)
    elif name == "crescent":
        draw.ellipse(box, fill=fill)
        dx, dy = 0.45 * r * math.cos(turn), 0.45 * r * math.sin(turn)
        draw.ellipse([box[0] + dx, box[1] + dy, box[2] + dx, box[3] + dy], fill=tuple(int(c) for c in background))
    image = image.resize((32, 32), Image.Resampling.LANCZOS)
    array = np.asarray(image, dtype=np.float32) + rng.normal(0, 10, (32, 32, 3))
    return np.clip(array, 0, 255).astype(np.uint8)


def _save(path: Path, array: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("kind", choices=list(SPLITS))
    parser.add_argument("root")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(make(args.kind, args.root, args.seed))


if __name__ == "__main__":
    main()
