"""Image data without torchvision: the digits split, ImageFolder trees, preprocessing, augmentation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from mlpmixer.data.images import Augment, Preprocess, augment, load_digits, load_image_folder
from mlpmixer.data.text import DataError


def write_folder(root, classes=("cat", "ant"), per_class=2, size=(10, 6)):
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for name in classes:
            (root / split / name).mkdir(parents=True)
            for i in range(per_class):
                array = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
                Image.fromarray(array).save(root / split / name / f"{i}.{'png' if i % 2 else 'jpg'}")
    return root


def test_digits_split_is_fixed_and_stratified():
    a, b = load_digits(), load_digits()
    assert (len(a.train), len(a.val)) == (1437, 360)
    assert torch.equal(a.val.labels, b.val.labels) and torch.equal(a.val.images, b.val.images)
    assert a.train.images.shape[1:] == (1, 8, 8) and 0 <= a.train.images.min() and a.train.images.max() <= 1
    assert torch.bincount(a.val.labels, minlength=10).min() >= 35  # every digit is in the validation set
    assert a.in_chans == 1 and not a.augment.hflip  # a flipped 2 is not a 2


def test_image_folder(tmp_path):
    data = load_image_folder(write_folder(tmp_path))
    assert data.train.class_names == ["ant", "cat"]  # sorted
    assert data.train.labels.tolist() == [0, 0, 1, 1] and len(data.val) == 4
    pre = Preprocess((4, 4), 3, crop_pct=1.0)
    x = data.train.load(torch.tensor([0, 3]), pre, (4, 4), 1.0)
    assert x.shape == (2, 3, 4, 4) and 0 <= x.min() and x.max() <= 1


def test_image_folder_errors(tmp_path):
    with pytest.raises(DataError, match="no train/ folder"):
        load_image_folder(tmp_path)
    root = write_folder(tmp_path / "a")
    (root / "val" / "dog").mkdir()
    with pytest.raises(DataError, match="classes that train/ lacks: dog"):
        load_image_folder(root)


def test_preprocess_resize_and_centre_crop(tmp_path):
    array = np.zeros((20, 40), dtype=np.uint8)
    array[:, 10:30] = 255  # a white square in the middle of a wide image
    Image.fromarray(array).save(tmp_path / "wide.png")
    x = Preprocess((10, 10), 1, mean=(0.0,), std=(1.0,), crop_pct=1.0).load(tmp_path / "wide.png")
    assert x.shape == (1, 10, 10) and x[..., 1:-1].min() > 0.99 and x.min() > 0.5  # the centre crop: the square
    rgb = Preprocess((10, 10), 3).load(tmp_path / "wide.png")
    assert rgb.shape == (3, 10, 10)
    assert torch.allclose(Preprocess((2, 2), 1, mean=(0.5,), std=(0.5,)).normalize(torch.ones(1, 1, 2, 2)),
                          torch.ones(1, 1, 2, 2))


def test_not_an_image_is_a_clear_error(tmp_path):
    (tmp_path / "notes.png").write_text("hello")
    with pytest.raises(DataError, match="is not a readable image"):
        Preprocess((8, 8), 1).load(tmp_path / "notes.png")
    with pytest.raises(DataError, match="no image file"):
        Preprocess((8, 8), 1).load(tmp_path / "absent.png")


def test_augment_identity_and_flip():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(6, 2, 5, 7, generator=g)
    same = augment(x, (5, 7), Augment(scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=False), g)
    torch.testing.assert_close(same, x)
    flipped = augment(x, (5, 7), Augment(scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=True), g)
    is_flip = [torch.allclose(f, s.flip(-1), atol=1e-6) for f, s in zip(flipped, x)]
    assert all(torch.allclose(f, s, atol=1e-6) or fl for f, s, fl in zip(flipped, x, is_flip))
    assert any(is_flip) and not all(is_flip)
    crops = augment(x, (3, 3), Augment(), g)
    assert crops.shape == (6, 2, 3, 3) and torch.isfinite(crops).all()
