"""Joint image/label transforms used by the segmentation KD papers (mmseg-style pipeline).

Training: random scale -> pad to crop -> random crop -> random horizontal flip -> normalise.
Validation: single scale, no resize, just normalise. The transforms are picklable classes
(DataLoader workers under spawn) and draw randomness only from Python's ``random``, which the
trainer and the DataLoader worker start-up seed, so seeded runs are reproducible.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
IGNORE_INDEX = 255

LabelLike = Union[np.ndarray, Image.Image]


def to_tensors(image: Image.Image, label: LabelLike, mean: tuple[float, ...],
               std: tuple[float, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """PIL RGB image + label -> (normalised float 3xHxW, int64 HxW)."""
    arr = np.asarray(image.convert("RGB") if image.mode != "RGB" else image, dtype=np.uint8)
    img = torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)
    m = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    img = img.sub_(m).div_(s)
    lab = torch.from_numpy(np.array(label, dtype=np.int64, copy=True))
    return img, lab


@dataclass(frozen=True)
class ValTransform:
    """Single-scale evaluation: the network sees the full image at its native resolution."""

    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD

    def __call__(self, image: Image.Image, label: LabelLike) -> tuple[torch.Tensor, torch.Tensor]:
        return to_tensors(image, label, self.mean, self.std)


@dataclass(frozen=True)
class TrainTransform:
    """Random scale, pad, crop and flip applied identically to image and label."""

    crop_size: tuple[int, int]
    scale_range: tuple[float, float] = (0.5, 2.0)
    flip: bool = True
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD

    def __call__(self, image: Image.Image, label: LabelLike) -> tuple[torch.Tensor, torch.Tensor]:
        lab_img = label if isinstance(label, Image.Image) else Image.fromarray(np.asarray(label, dtype=np.uint8))
        lo, hi = self.scale_range
        scale = random.uniform(lo, hi)
        w, h = image.size
        nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
        if (nw, nh) != (w, h):
            image = image.resize((nw, nh), Image.BILINEAR)
            lab_img = lab_img.resize((nw, nh), Image.NEAREST)
        img, lab = to_tensors(image, lab_img, self.mean, self.std)

        ch, cw = self.crop_size
        pad_h, pad_w = max(ch - nh, 0), max(cw - nw, 0)
        if pad_h or pad_w:
            # Padding the normalised image with 0 equals padding the raw image with the mean.
            img = F.pad(img, (0, pad_w, 0, pad_h), value=0.0)
            lab = F.pad(lab, (0, pad_w, 0, pad_h), value=IGNORE_INDEX)
        H, W = lab.shape
        top = random.randint(0, H - ch)
        left = random.randint(0, W - cw)
        img = img[:, top:top + ch, left:left + cw]
        lab = lab[top:top + ch, left:left + cw]
        if self.flip and random.random() < 0.5:
            img = img.flip(-1)
            lab = lab.flip(-1)
        return img.contiguous(), lab.contiguous()


def train_transform(crop_size: tuple[int, int], scale_range: tuple[float, float] = (0.5, 2.0),
                    flip: bool = True, mean: tuple[float, ...] = IMAGENET_MEAN,
                    std: tuple[float, ...] = IMAGENET_STD) -> TrainTransform:
    """Training pipeline of the papers; ``crop_size`` is (height, width)."""
    if len(crop_size) != 2 or min(crop_size) < 1:
        raise ValueError(f"crop_size must be (height, width) with positive sides, got {crop_size}")
    if not 0 < scale_range[0] <= scale_range[1]:
        raise ValueError(f"scale_range must be (low, high) with 0 < low <= high, got {scale_range}")
    return TrainTransform((int(crop_size[0]), int(crop_size[1])), (float(scale_range[0]), float(scale_range[1])),
                          bool(flip), tuple(mean), tuple(std))


def val_transform(mean: tuple[float, ...] = IMAGENET_MEAN,
                  std: tuple[float, ...] = IMAGENET_STD) -> ValTransform:
    """Evaluation pipeline: no resize, just tensor conversion and normalisation."""
    return ValTransform(tuple(mean), tuple(std))
