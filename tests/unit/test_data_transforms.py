"""Joint transforms: crop size, 255 label padding, image/label flip consistency, seeded determinism."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image

from kdcompress.data import IMAGENET_MEAN, IMAGENET_STD, train_transform, val_transform


def _pair(h: int = 20, w: int = 30, block: int = 5) -> tuple[Image.Image, np.ndarray]:
    """Image whose red channel encodes the label, so image and label must move together."""
    rng = np.random.default_rng(0)
    lab = rng.integers(0, 5, (h, w)).astype(np.uint8)
    lab = np.kron(lab[::block, ::block], np.ones((block, block), np.uint8))[:h, :w]
    img = np.stack([lab * 50, rng.integers(0, 256, (h, w)), np.full((h, w), 7)], -1).astype(np.uint8)
    return Image.fromarray(img), lab


def _red_to_label(img: torch.Tensor) -> torch.Tensor:
    red = img[0] * IMAGENET_STD[0] + IMAGENET_MEAN[0]
    return torch.round(red * 255 / 50).long()


def test_val_transform_normalises_without_resize():
    img, lab = _pair()
    x, y = val_transform()(img, lab)
    assert x.shape == (3, 20, 30) and x.dtype == torch.float32
    assert y.shape == (20, 30) and y.dtype == torch.int64 and torch.equal(y, torch.from_numpy(lab).long())
    expected = (7 / 255 - IMAGENET_MEAN[2]) / IMAGENET_STD[2]
    assert torch.allclose(x[2], torch.full((20, 30), expected))


def test_train_transform_crop_pad_and_flip_consistency():
    img, lab = _pair(40, 60, block=10)
    t = train_transform((64, 72), scale_range=(0.5, 2.0))
    random.seed(0)
    torch.manual_seed(0)
    saw_pad = False
    for _ in range(30):
        x, y = t(img, Image.fromarray(lab))
        assert x.shape == (3, 64, 72) and y.shape == (64, 72) and y.dtype == torch.int64
        pad = y == 255
        if pad.any():
            saw_pad = True
            assert torch.allclose(x[:, pad], torch.zeros(1))  # padded with the mean
        valid = ~pad
        # nearest-resized label and bilinear image agree away from block edges; check majority
        agree = (_red_to_label(x)[valid] == y[valid]).float().mean()
        assert agree > 0.85
    assert saw_pad


def test_flip_mirrors_image_and_label_together():
    img, lab = _pair()
    t = train_transform((20, 30), scale_range=(1.0, 1.0), flip=True)
    flipped = 0
    for seed in range(12):
        random.seed(seed)
        x, y = t(img, lab)
        is_flipped = not torch.equal(y, torch.from_numpy(lab).long())
        flipped += is_flipped
        ref = torch.from_numpy(lab).long()
        assert torch.equal(y, ref.flip(-1) if is_flipped else ref)
        assert torch.equal(_red_to_label(x), y)
    assert 0 < flipped < 12


def test_train_transform_seeded_determinism():
    img, lab = _pair(50, 60)
    t = train_transform((24, 24))
    random.seed(123)
    a = [t(img, lab) for _ in range(3)]
    random.seed(123)
    b = [t(img, lab) for _ in range(3)]
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not torch.equal(a[0][1], a[1][1]) or not torch.equal(a[0][0], a[1][0])


def test_train_transform_rejects_bad_args():
    with pytest.raises(ValueError):
        train_transform((0, 10))
    with pytest.raises(ValueError):
        train_transform((10, 10), scale_range=(2.0, 1.0))
