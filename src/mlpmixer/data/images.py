"""Image datasets without torchvision: scikit-learn's digits, an ImageFolder tree read with Pillow.

Images are float tensors (C, H, W) in [0, 1] until `Preprocess.normalize`. Training augmentation
(random resized crop, horizontal flip) runs batched on tensors as one affine resampling per image.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .text import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
DIGITS_VAL_FRACTION, DIGITS_SPLIT_SEED = 0.2, 0


@dataclass(frozen=True)
class Preprocess:
    """How a file becomes a model input; saved with a run so that prediction repeats it."""

    img_size: tuple[int, int]
    """Model input (H, W)."""
    in_chans: int = 3
    """1: greyscale, 3: RGB."""
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    """Per-channel mean subtracted after scaling to [0, 1] (the official Mixer's 0.5)."""
    std: tuple[float, ...] = (0.5, 0.5, 0.5)
    """Per-channel divisor (the official Mixer's 0.5)."""
    crop_pct: float = 0.875
    """Evaluation: resize the shorter side to img_size / crop_pct, then take the centre crop."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "img_size", tuple(self.img_size))
        object.__setattr__(self, "mean", tuple(self.mean)[: self.in_chans])
        object.__setattr__(self, "std", tuple(self.std)[: self.in_chans])
        if self.in_chans not in (1, 3):
            raise ValueError(f"images have 1 (greyscale) or 3 (RGB) channels, not {self.in_chans}")
        if not 0.0 < self.crop_pct <= 1.0:
            raise ValueError(f"crop_pct must be in (0, 1], got {self.crop_pct}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def normalize(self, x: Tensor) -> Tensor:
        """(B, C, H, W) in [0, 1] -> the model's input scale."""
        mean = torch.tensor(self.mean, device=x.device, dtype=x.dtype).view(-1, 1, 1)
        std = torch.tensor(self.std, device=x.device, dtype=x.dtype).view(-1, 1, 1)
        return (x - mean) / std

    def load(self, path: str | os.PathLike, size: tuple[int, int] | None = None, crop_pct: float | None = None) -> Tensor:
        """An image file -> (C, H, W) in [0, 1]: shorter side resized, then centre-cropped."""
        h, w = size or self.img_size
        crop_pct = self.crop_pct if crop_pct is None else crop_pct
        image = open_image(path).convert("L" if self.in_chans == 1 else "RGB")
        scale = max(h, w) / crop_pct / min(image.size)
        resized = (max(w, round(image.width * scale)), max(h, round(image.height * scale)))
        image = image.resize(resized, resample=_bilinear())
        left, top = (resized[0] - w) // 2, (resized[1] - h) // 2
        array = np.asarray(image.crop((left, top, left + w, top + h)), dtype=np.float32) / 255.0
        return torch.from_numpy(array).reshape(h, w, self.in_chans).permute(2, 0, 1)  # (H, W, C) -> (C, H, W)


def open_image(path: str | os.PathLike):
    """A Pillow image, fully decoded; a file that is not an image is one clear `DataError`."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.load()
            return image.copy()
    except FileNotFoundError:
        raise DataError(f"no image file {str(path)!r}") from None
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise DataError(f"{str(path)!r} is not a readable image ({type(e).__name__}); give a PNG or JPEG file") from None


def _bilinear():
    from PIL import Image

    return Image.Resampling.BILINEAR


@dataclass(frozen=True)
class Augment:
    """Training augmentation: a random resized crop (Inception-style) and an optional flip."""

    scale: tuple[float, float] = (0.08, 1.0)
    """Range of the crop's area as a fraction of the image."""
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    """Range of the crop's aspect ratio (width / height) relative to the image's."""
    hflip: bool = True
    """Flip left-right with probability 1/2 (off for digits)."""


def augment(x: Tensor, out_hw: tuple[int, int], aug: Augment, generator: torch.Generator) -> Tensor:
    """Random resized crops of a batch: (B, C, H, W) -> (B, C, out_h, out_w)."""
    b = x.shape[0]
    u = torch.rand(5, b, generator=generator, device=generator.device).to(x.device, x.dtype)
    area = aug.scale[0] + (aug.scale[1] - aug.scale[0]) * u[0]
    log_r = math.log(aug.ratio[0]) + (math.log(aug.ratio[1]) - math.log(aug.ratio[0])) * u[1]
    w = (area * log_r.exp()).sqrt().clamp(max=1.0)  # crop width and height as fractions of the image
    h = (area / log_r.exp()).sqrt().clamp(max=1.0)
    cx, cy = (1 - w) * (2 * u[2] - 1), (1 - h) * (2 * u[3] - 1)  # crop centre in [-1, 1] coordinates
    flip = torch.where((u[4] < 0.5) & aug.hflip, -1.0, 1.0).to(x.dtype)
    theta = torch.zeros(b, 2, 3, device=x.device, dtype=x.dtype)  # output grid -> input coordinates
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = w * flip, cx, h, cy
    grid = F.affine_grid(theta, [b, x.shape[1], *out_hw], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


@dataclass
class ImageSet:
    """Labelled images: decoded in memory (``images``) or read from ``paths`` batch by batch."""

    labels: Tensor
    class_names: list[str]
    images: Tensor | None = None
    paths: list[Path] | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def load(self, indices: Tensor, preprocess: Preprocess, size: tuple[int, int], crop_pct: float) -> Tensor:
        """Images ``indices`` as (n, C, H, W) in [0, 1] at ``size``."""
        if self.images is not None:
            x = self.images[indices]
            return x if tuple(x.shape[-2:]) == size else F.interpolate(x, size=size, mode="bilinear",
                                                                       align_corners=False, antialias=True)
        return torch.stack([preprocess.load(self.paths[i], size, crop_pct) for i in indices.tolist()])


@dataclass
class ImageData:
    """A train/val split and how it should be treated."""

    train: ImageSet
    val: ImageSet
    in_chans: int
    augment: Augment
    crop_pct: float
    source: dict


def load_digits() -> ImageData:
    """scikit-learn's 8x8 handwritten digits (1,797 images, offline), split 80/20 stratified, seed 0."""
    from sklearn.datasets import load_digits as sk_digits
    from sklearn.model_selection import train_test_split

    digits = sk_digits()
    images = torch.from_numpy(digits.images.astype(np.float32) / 16.0).unsqueeze(1)  # (N, 8, 8) -> (N, 1, 8, 8)
    labels = torch.from_numpy(digits.target.astype(np.int64))
    train, val = train_test_split(np.arange(len(labels)), test_size=DIGITS_VAL_FRACTION,
                                  random_state=DIGITS_SPLIT_SEED, stratify=digits.target)
    names = [str(i) for i in range(10)]
    train, val = torch.from_numpy(train), torch.from_numpy(val)
    return ImageData(ImageSet(labels[train], names, images=images[train]), ImageSet(labels[val], names, images=images[val]),
                     in_chans=1, augment=Augment(scale=(0.85, 1.0), ratio=(0.95, 1.05), hflip=False), crop_pct=1.0,
                     source={"dataset": "digits"})


def load_image_folder(root: str | os.PathLike, in_chans: int = 3) -> ImageData:
    """``root/train/<class>/*`` and ``root/val/<class>/*``; classes are the sorted train folder names."""
    root = Path(root)
    names = sorted(d.name for d in (root / "train").iterdir() if d.is_dir()) if (root / "train").is_dir() else []
    if not names:
        raise DataError(f"{str(root)!r} has no class folders in train/; expected {root}/train/<class>/*.png and "
                        f"{root}/val/<class>/*.png")
    sets = [_folder_split(root / split, names) for split in ("train", "val")]
    return ImageData(*sets, in_chans=in_chans, augment=Augment(), crop_pct=0.875,
                     source={"dataset": "folder", "data_dir": str(root)})


def _folder_split(directory: Path, names: list[str]) -> ImageSet:
    if not directory.is_dir():
        raise DataError(f"no {directory.name}/ folder in {str(directory.parent)!r}")
    extra = sorted(d.name for d in directory.iterdir() if d.is_dir() and d.name not in names)
    if extra:
        raise DataError(f"{directory} has classes that train/ lacks: {', '.join(extra[:5])}")
    paths, labels = [], []
    for label, name in enumerate(names):
        for path in sorted((directory / name).glob("*")) if (directory / name).is_dir() else []:
            if path.suffix.lower() in IMAGE_SUFFIXES:
                paths.append(path)
                labels.append(label)
    if not paths:
        raise DataError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {directory}/<class>/")
    return ImageSet(torch.tensor(labels), names, paths=paths)
