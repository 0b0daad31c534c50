"""Image datasets without torchvision: scikit-learn's digits, an ImageFolder tree read with Pillow.

Images are float tensors (C, H, W) in [0, 1] until `Preprocess.normalize`. Training augmentation
(random resized crop, horizontal flip) runs batched on tensors as one affine resampling per image.
"""

from __future__ import annotations

import dataclasses
import math
import hashlib
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import DataWarning
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
    background: str | None = None
    """"dark" or "light": the training images' border; a file of the other polarity is inverted on predict."""

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

    def match_polarity(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Images (B, C, H, W) in [0, 1] with the training images' polarity: those whose border is light
        where the training images' was dark (black-on-white digits for a white-on-black model), or the
        reverse, are inverted. Returns the images and which ones were inverted (B,)."""
        if self.background is None:
            return x, torch.zeros(len(x), dtype=torch.bool)
        light = border_brightness(x) > 0.5
        flip = light if self.background == "dark" else ~light
        return torch.where(flip[:, None, None, None], 1.0 - x, x), flip

    def normalize(self, x: Tensor) -> Tensor:
        """(B, C, H, W) in [0, 1] -> the model's input scale."""
        mean = torch.tensor(self.mean, device=x.device, dtype=x.dtype).view(-1, 1, 1)
        std = torch.tensor(self.std, device=x.device, dtype=x.dtype).view(-1, 1, 1)
        return (x - mean) / std

    def load(self, path: str | os.PathLike, size: tuple[int, int] | None = None, crop_pct: float | None = None) -> Tensor:
        """An image file -> (C, H, W) in [0, 1]: shorter side resized, then centre-cropped."""
        h, w = size or self.img_size
        crop_pct = self.crop_pct if crop_pct is None else crop_pct
        image = to_mode(open_image(path), "L" if self.in_chans == 1 else "RGB")
        scale = max(h, w) / crop_pct / min(image.size)
        resized = (max(w, round(image.width * scale)), max(h, round(image.height * scale)))
        image = image.resize(resized, resample=_bilinear())
        left, top = (resized[0] - w) // 2, (resized[1] - h) // 2
        array = np.asarray(image.crop((left, top, left + w, top + h)), dtype=np.float32) / 255.0
        return torch.from_numpy(array).reshape(h, w, self.in_chans).permute(2, 0, 1)  # (H, W, C) -> (C, H, W)


def border_brightness(x: Tensor) -> Tensor:
    """Mean of each image's outermost ring of pixels: (B, C, H, W) in [0, 1] -> (B,)."""
    ring = torch.ones(x.shape[-2:], dtype=torch.bool)
    ring[1:-1, 1:-1] = False
    return x[..., ring].mean(dim=(-1, -2))


def background_of(images: Tensor) -> str:
    """"dark" or "light": the majority border of a sample of training images (B, C, H, W) in [0, 1]."""
    return "light" if border_brightness(images).median() > 0.5 else "dark"


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


def to_mode(image, mode: str):
    """Any Pillow image in ``mode`` ("L" or "RGB"): 16-bit and float images are scaled to 8 bits, not
    clipped; palette images with transparency go through RGBA."""
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        array = np.asarray(image, dtype=np.float32)
        peak = float(array.max()) if array.size else 0.0
        if image.mode.startswith("I;16") or peak > 255:
            array = array / 257.0  # 0..65535 -> 0..255
        elif image.mode == "F" and peak <= 1.0:
            array = array * 255.0  # a float image in [0, 1]
        image = _pil_image().fromarray(np.clip(array, 0, 255).round().astype(np.uint8), mode="L")
    elif image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    return image if image.mode == mode else image.convert(mode)


def _pil_image():
    from PIL import Image

    return Image


def _bilinear():
    from PIL import Image

    return Image.Resampling.BILINEAR


@dataclass(frozen=True)
class Augment:
    """Training augmentation: a random resized crop (Inception-style), an optional flip, and for small
    images a small rotation and shift -- all one affine resampling per image."""

    scale: tuple[float, float] = (0.08, 1.0)
    """Range of the crop's area as a fraction of the image."""
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    """Range of the crop's aspect ratio (width / height) relative to the image's."""
    hflip: bool = True
    """Flip left-right with probability 1/2 (off for digits)."""
    rotate: float = 0.0
    """Largest rotation, in degrees (uniform in ±rotate)."""
    translate: float = 0.0
    """Largest shift, as a fraction of the image side (uniform in ±translate, each axis)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "scale", tuple(self.scale))
        object.__setattr__(self, "ratio", tuple(self.ratio))
        if not 0.0 < self.scale[0] <= self.scale[1] <= 1.0:
            raise ValueError(f"crop scale must satisfy 0 < min <= max <= 1, got {self.scale}")
        if not 0.0 <= self.rotate <= 180.0 or not 0.0 <= self.translate < 1.0:
            raise ValueError(f"rotate must be in [0, 180] degrees and translate in [0, 1), got "
                             f"{self.rotate} and {self.translate}")


def augment(x: Tensor, out_hw: tuple[int, int], aug: Augment, generator: torch.Generator) -> Tensor:
    """Random resized crops of a batch: (B, C, H, W) -> (B, C, out_h, out_w)."""
    b = x.shape[0]
    u = torch.rand(5, b, generator=generator, device=generator.device).to(x.device, x.dtype)
    if aug.rotate or aug.translate:  # drawn only when used, so that runs without them keep their random stream
        v = torch.rand(3, b, generator=generator, device=generator.device).to(x.device, x.dtype) * 2 - 1
    else:
        v = torch.zeros(3, b, device=x.device, dtype=x.dtype)
    area = aug.scale[0] + (aug.scale[1] - aug.scale[0]) * u[0]
    log_r = math.log(aug.ratio[0]) + (math.log(aug.ratio[1]) - math.log(aug.ratio[0])) * u[1]
    w = (area * log_r.exp()).sqrt().clamp(max=1.0)  # crop width and height as fractions of the image
    h = (area / log_r.exp()).sqrt().clamp(max=1.0)
    cx = (1 - w) * (2 * u[2] - 1) + 2 * aug.translate * v[1]  # crop centre in [-1, 1] coordinates
    cy = (1 - h) * (2 * u[3] - 1) + 2 * aug.translate * v[2]
    flip = torch.where((u[4] < 0.5) & aug.hflip, -1.0, 1.0).to(x.dtype)
    angle = v[0] * math.radians(aug.rotate)
    cos, sin = angle.cos(), angle.sin()
    theta = torch.zeros(b, 2, 3, device=x.device, dtype=x.dtype)  # output grid -> input coordinates
    theta[:, 0, 0], theta[:, 0, 1], theta[:, 0, 2] = w * flip * cos, -h * sin, cx  # rotate ∘ scale ∘ flip
    theta[:, 1, 0], theta[:, 1, 1], theta[:, 1, 2] = w * flip * sin, h * cos, cy
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
            x = x.float() / 255 if x.dtype == torch.uint8 else x
            return x if tuple(x.shape[-2:]) == size else F.interpolate(x, size=size, mode="bilinear",
                                                                       align_corners=False, antialias=True)
        return torch.stack([preprocess.load(self.paths[i], size, crop_pct) for i in indices.tolist()])

    def decoded(self, preprocess: Preprocess, size: tuple[int, int], crop_pct: float) -> "ImageSet":
        """This set with every image decoded once at ``size`` and kept in memory (as uint8): a small
        folder then costs no file reads after the first epoch's start."""
        if self.images is not None:
            return self
        with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
            loaded = list(pool.map(lambda p: preprocess.load(p, size, crop_pct), self.paths))
        images = (torch.stack(loaded) * 255).round().to(torch.uint8)  # (N, C, H, W): 4x less memory than float
        return ImageSet(self.labels, self.class_names, images=images)

    def decoded_bytes(self, channels: int, size: tuple[int, int]) -> int:
        """Memory `decoded` would take."""
        return len(self) * channels * size[0] * size[1]


@dataclass
class ImageData:
    """A train/val split and how it should be treated."""

    train: ImageSet
    val: ImageSet
    in_chans: int
    augment: Augment
    crop_pct: float
    source: dict

    def fingerprint(self) -> dict:
        """Image count and a sha256 over every image (file path, size and label; or the pixels of a
        built-in set): what ``--resume`` checks before continuing on the data."""
        digest = hashlib.sha256()
        for split in (self.train, self.val):
            digest.update(split.labels.numpy().tobytes())
            if split.images is not None:
                digest.update(split.images.numpy().tobytes())
            for path in split.paths or []:
                digest.update(f"{path.relative_to(path.parents[2])}:{path.stat().st_size}\n".encode())
        return {"images": len(self.train) + len(self.val), "sha256": digest.hexdigest()}


def image_survey(paths: list[Path], sample: int = 64) -> tuple[int, bool]:
    """The median shorter side of up to ``sample`` evenly spaced images, and whether all of them are
    grey (a one-channel mode, or RGB with equal channels)."""
    from PIL import Image

    picked = paths[:: max(1, len(paths) // sample)][:sample]
    sides, grey = [], True
    for path in picked:
        with Image.open(path) as image:
            sides.append(min(image.size))
            if grey and image.mode not in ("1", "L", "LA", "I", "I;16", "F"):
                rgb = np.asarray(image.convert("RGB"), dtype=np.int16)
                grey = bool((rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all())
    return int(np.median(sides)), grey


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
    """``root/train/<class>/*`` and ``root/val/<class>/*``; classes are the sorted train folder names.

    Every image is decoded once here, so that a corrupt or truncated file never stops training
    mid-epoch: unreadable files are skipped with one `DataWarning` that counts them (the count is
    kept in the run's config.json). A class folder in train/ without a readable image is an error.
    """
    root = Path(root)
    layout = f"expected {root}/train/<class>/*.png and {root}/val/<class>/*.png"
    if not root.is_dir():
        raise DataError(f"--data-dir {str(root)!r} does not exist or is not a directory; {layout}")
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise DataError(f"{str(root)!r} has no {split}/ folder; {layout}")
    names = sorted(d.name for d in _listdir(root / "train") if d.is_dir())
    if not names:
        raise DataError(f"{str(root)!r} has no class folders in train/; {layout}")
    train, skipped_train = _folder_split(root / "train", names, every_class=True)
    val, skipped_val = _folder_split(root / "val", names, every_class=False)
    return ImageData(train, val, in_chans=in_chans, augment=Augment(), crop_pct=0.875,
                     source={"dataset": "folder", "data_dir": str(root.resolve()),
                             "skipped_images": skipped_train + skipped_val})


def load_split(directory: str | os.PathLike, class_names: list[str], in_chans: int = 3,
               crop_pct: float = 0.875) -> ImageData:
    """Labelled images to evaluate on: ``DIR/val/<class>/*`` if there is a val/ folder, else ``DIR/<class>/*``,
    with the classes of a trained model (``class_names``); folders of other classes are an error."""
    root = Path(directory)
    if not root.is_dir():
        raise DataError(f"--data-dir {str(root)!r} does not exist or is not a directory; expected "
                        f"{root}/val/<class>/*.png or {root}/<class>/*.png")
    split, _ = _folder_split(root / "val" if (root / "val").is_dir() else root, class_names, every_class=False)
    return ImageData(split, split, in_chans=in_chans, augment=Augment(), crop_pct=crop_pct,
                     source={"dataset": "folder", "data_dir": str(root.resolve())})


def _listdir(directory: Path) -> list[Path]:
    try:
        return sorted(directory.iterdir())
    except OSError as e:
        raise DataError(f"cannot list {str(directory)!r} ({e.strerror or e}); check its permissions") from None


def _folder_split(directory: Path, names: list[str], every_class: bool) -> tuple[ImageSet, int]:
    """The readable images of one split, and how many unreadable ones were skipped."""
    extra = sorted(d.name for d in _listdir(directory) if d.is_dir() and d.name not in names)
    if extra:
        raise DataError(f"{directory} has classes that train/ lacks: {', '.join(extra[:5])}")
    found = [(path, label) for label, name in enumerate(names) if (directory / name).is_dir()
             for path in _listdir(directory / name) if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file()]
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        problems = list(pool.map(unreadable, [path for path, _ in found]))
    kept = [(path, label) for (path, label), problem in zip(found, problems) if problem is None]
    bad = [(path, problem) for (path, _), problem in zip(found, problems) if problem is not None]
    if bad:
        warnings.warn(DataWarning(f"skipped {len(bad)} unreadable image{'s' if len(bad) > 1 else ''} of "
                                  f"{len(found)} in {directory} (e.g. {bad[0][0]}: {bad[0][1]})"), stacklevel=3)
    if not kept:
        raise DataError(f"no readable images ({', '.join(IMAGE_SUFFIXES)}) under {directory}/<class>/")
    if every_class:
        empty = [name for label, name in enumerate(names) if all(lb != label for _, lb in kept)]
        if empty:
            raise DataError(f"class folder {directory / empty[0]} has no readable images "
                            f"({', '.join(IMAGE_SUFFIXES)}); add some or remove the folder")
    return ImageSet(torch.tensor([label for _, label in kept]), names, paths=[path for path, _ in kept]), len(bad)


def unreadable(path: Path) -> str | None:
    """Why ``path`` cannot be decoded as an image, or None when it can."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.draft(image.mode, (64, 64))  # JPEG: decode at a reduced scale; truncation still shows
            image.load()
    except Exception as e:  # noqa: BLE001 -- Pillow raises many types for broken files; each is "unreadable"
        return f"{type(e).__name__}: {e}"
    return None
