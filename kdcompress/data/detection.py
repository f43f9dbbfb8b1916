"""Detection datasets in COCO format: a loader, a resize/flip transform and a padding collate.

Every loader returns ``(image FloatTensor 3xHxW normalised, target dict)`` with ``boxes`` (float32
[N, 4] xyxy in the returned image's pixels), ``labels`` (int64 [N], contiguous 1..K; 0 is the
background of the models), ``image_id``, ``orig_size`` (H, W) and ``scale`` (sy, sx), so predictions
map back to the original pixels (and via ``info.category_ids`` to the dataset's category ids) for
COCOeval. Annotations are validated and converted once at construction, so a wrong file fails with
one DataError line before training starts, not as a shape error deep in the loss.
"""

from __future__ import annotations

import os
import random
import warnings
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from kdcompress.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    DatasetInfo,
    PathLike,
    _open_image,
    register_dataset,
    require_root,
)
from kdcompress.data.coco import load_coco
from kdcompress.data.digits import DIGITS_INFO, build_digits, digits_info
from kdcompress.data.voc import voc_colormap
from kdcompress.errors import DataError

__all__ = [
    "COCO_LAYOUT", "CocoDetection", "DIGITS_DET_INFO", "DetTarget", "DetTransform", "SIZE_DIVISIBLE",
    "build_coco", "build_digits_det", "coco_info", "det_collate", "digits_det_info",
]

DetTarget = dict[str, Any]
DetTransformFn = Callable[[Image.Image, DetTarget], tuple[torch.Tensor, DetTarget]]
SIZE_DIVISIBLE = 32  # largest FPN stride: padded batches keep every pyramid level aligned
COCO_LAYOUT = "train2017/, val2017/ and annotations/instances_{train,val}2017.json"


# ----------------------------------------------------------------------------------------------
# Transform and collate


def _to_tensor(image: Image.Image, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """PIL image -> normalised float 3xHxW."""
    arr = np.asarray(image.convert("RGB") if image.mode != "RGB" else image, dtype=np.uint8)
    img = torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)
    m = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return img.sub_(m).div_(s)


def _target_tensors(target: DetTarget) -> tuple[torch.Tensor, torch.Tensor]:
    """Boxes as float32 [N, 4] (also for N = 0) and labels as int64 [N]."""
    boxes = torch.as_tensor(np.asarray(target["boxes"], dtype=np.float32)).reshape(-1, 4)
    labels = torch.as_tensor(np.asarray(target["labels"], dtype=np.int64)).reshape(-1)
    return boxes, labels


@dataclass(frozen=True)
class DetTransform:
    """Aspect-preserving resize (shorter side ``min_size*s``, longer at most ``max_size*s``), optional
    horizontal flip, normalisation; boxes follow the image.

    ``s`` is drawn from ``scale_range`` with Python's ``random`` (seeded by the trainer and the
    DataLoader workers, so runs reproduce); a (1, 1) range draws nothing. Picklable for workers.
    """

    min_size: int
    max_size: int
    scale_range: tuple[float, float] = (1.0, 1.0)
    flip: bool = False
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD

    def __post_init__(self) -> None:
        if not 0 < self.min_size <= self.max_size:
            raise ValueError(f"DetTransform needs 0 < min_size <= max_size, got {self.min_size}, {self.max_size}")
        if len(self.scale_range) != 2 or not 0 < self.scale_range[0] <= self.scale_range[1]:
            raise ValueError(f"scale_range must be (low, high) with 0 < low <= high, got {self.scale_range}")

    def __call__(self, image: Image.Image, target: DetTarget) -> tuple[torch.Tensor, DetTarget]:
        lo, hi = self.scale_range
        s = random.uniform(lo, hi) if lo != hi else float(lo)
        w, h = image.size
        r = min(self.min_size * s / min(w, h), self.max_size * s / max(w, h))
        nw, nh = max(1, round(w * r)), max(1, round(h * r))
        if (nw, nh) != (w, h):
            image = image.resize((nw, nh), Image.BILINEAR)
        sx, sy = nw / w, nh / h
        boxes, labels = _target_tensors(target)
        boxes = boxes * torch.tensor([sx, sy, sx, sy], dtype=torch.float32)
        img = _to_tensor(image, self.mean, self.std)
        if self.flip and random.random() < 0.5:
            img = img.flip(-1)
            boxes = torch.stack([nw - boxes[:, 2], boxes[:, 1], nw - boxes[:, 0], boxes[:, 3]], dim=1)
        out = dict(target)
        out.update(boxes=boxes, labels=labels, scale=(sy, sx))
        out.setdefault("orig_size", (h, w))
        return img.contiguous(), out


def _no_resize(image: Image.Image, target: DetTarget) -> tuple[torch.Tensor, DetTarget]:
    """Default when a dataset has no transform: native resolution, ImageNet normalisation."""
    boxes, labels = _target_tensors(target)
    out = dict(target)
    out.update(boxes=boxes, labels=labels, scale=(1.0, 1.0))
    out.setdefault("orig_size", (image.height, image.width))
    return _to_tensor(image, IMAGENET_MEAN, IMAGENET_STD), out


def det_collate(batch: Sequence[tuple[torch.Tensor, DetTarget]],
                size_divisible: int = SIZE_DIVISIBLE) -> tuple[torch.Tensor, list[DetTarget]]:
    """Stack images padded bottom/right with 0 (= the mean after normalisation) to the batch's max
    size rounded up to ``size_divisible``; boxes need no change. Returns (images [B,3,H,W], targets)."""
    if not batch:
        raise ValueError("det_collate got an empty batch")
    images = [b[0] for b in batch]
    H = -(-max(im.shape[-2] for im in images) // size_divisible) * size_divisible
    W = -(-max(im.shape[-1] for im in images) // size_divisible) * size_divisible
    out = images[0].new_zeros((len(images), images[0].shape[0], H, W))
    for k, im in enumerate(images):
        out[k, :, : im.shape[-2], : im.shape[-1]] = im
    return out, [b[1] for b in batch]


# ----------------------------------------------------------------------------------------------
# Loader


def _id_ranges(ids: Sequence[int]) -> str:
    """'1-11, 13-25, 27' -- keeps the 80 COCO ids on one readable line."""
    ids = sorted(set(ids))
    parts, start = [], 0
    for k in range(1, len(ids) + 1):
        if k == len(ids) or ids[k] != ids[k - 1] + 1:
            a, b = ids[start], ids[k - 1]
            parts.append(str(a) if a == b else f"{a}-{b}")
            start = k
    return ", ".join(parts)


class CocoDetection(Dataset):
    """COCO-format reader: images of one folder, boxes of one annotation file.

    Category ids map to contiguous labels ``1..K`` by their position in ``info.category_ids``.
    Crowd annotations are left out of the targets (COCOeval handles them itself); boxes are clipped
    to the image and zero-area boxes dropped, counted once in a warning. Images without boxes stay
    (they count for evaluation).
    """

    def __init__(self, info: DatasetInfo, image_dir: Path, ann_file: Path,
                 transform: DetTransformFn | None = None, split_name: str = "") -> None:
        if info.category_ids is None:
            raise ValueError(f"{info.name}: detection datasets need info.category_ids")
        self.info = info
        self.image_dir = Path(image_dir)
        self.ann_file = Path(ann_file)
        self.transform = transform
        self.split = split_name
        if not self.image_dir.is_dir():
            raise DataError(f"Image folder '{self.image_dir}' is missing; restore it or fix the dataset root")
        self.coco = load_coco(self.ann_file)
        self.cat_to_label: dict[int, int] = {int(c): k for k, c in enumerate(info.category_ids, start=1)}
        self.ids: list[int] = sorted(self.coco.imgs)
        self._sizes = self._image_sizes()
        self._check_files()
        self._boxes, self._labels = self._build_targets()

    # -- construction-time validation ------------------------------------------------------------

    def _image_sizes(self) -> np.ndarray:
        sizes = np.zeros((len(self.ids), 2), dtype=np.int64)
        for k, iid in enumerate(self.ids):
            meta = self.coco.imgs[iid]
            h, w = meta.get("height"), meta.get("width")
            if not all(isinstance(v, (int, float)) and v > 0 and float(v).is_integer() for v in (h, w)) \
                    or "file_name" not in meta:
                raise DataError(f"Image entry {iid} in '{self.ann_file}' lacks file_name or a positive integer "
                                f"width/height; expected COCO detection format, regenerate the file")
            sizes[k] = (h, w)
        return sizes

    def _check_files(self) -> None:
        present = set(os.listdir(self.image_dir))
        missing = []
        for iid in self.ids:
            name = self.coco.imgs[iid]["file_name"]
            if not (name in present if Path(name).name == name else (self.image_dir / name).is_file()):
                missing.append(name)
        if missing:
            raise DataError(f"{len(missing)} of {len(self.ids)} images listed in '{self.ann_file}' are missing from "
                            f"'{self.image_dir}' (first: '{missing[0]}'); restore them or use the annotation file "
                            f"that matches this folder")

    def _build_targets(self) -> tuple[list[np.ndarray], list[np.ndarray]]:
        anns = self.coco.dataset["annotations"]
        bad = sorted({a["category_id"] for a in anns} - set(self.cat_to_label))
        if bad:
            raise DataError(f"'{self.ann_file}' has annotations of category id {bad[0]}"
                            f"{f' (and {len(bad) - 1} more ids)' if len(bad) > 1 else ''}, which dataset "
                            f"'{self.info.name}' does not know (valid ids: {_id_ranges(self.info.category_ids)}); "
                            f"choose the matching dataset or fix the file")
        anns = [a for a in anns if not a.get("iscrowd", 0)]
        index = {iid: k for k, iid in enumerate(self.ids)}
        try:
            xywh = np.array([a["bbox"] for a in anns], dtype=np.float64).reshape(-1, 4)
        except (TypeError, ValueError):
            raise DataError(f"'{self.ann_file}' has a non-numeric bbox; expected [x, y, width, height] numbers, "
                            f"regenerate the file") from None
        img_idx = np.array([index[a["image_id"]] for a in anns], dtype=np.int64)
        labels = np.array([self.cat_to_label[a["category_id"]] for a in anns], dtype=np.int64)
        xyxy = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
        hw = self._sizes[img_idx].astype(np.float64)
        upper = np.stack([hw[:, 1], hw[:, 0], hw[:, 1], hw[:, 0]], axis=1)
        clipped = np.clip(xyxy, 0.0, upper)
        keep = (clipped[:, 2] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 1])
        moved = (clipped != xyxy).any(axis=1) & keep
        n_drop, n_clip = int((~keep).sum()), int(moved.sum())
        if n_drop or n_clip:
            warnings.warn(f"{n_clip} boxes clipped to the image, {n_drop} of zero area dropped in '{self.ann_file}'",
                          stacklevel=3)
        img_idx, boxes, labels = img_idx[keep], clipped[keep].astype(np.float32), labels[keep]
        order = np.argsort(img_idx, kind="stable")  # keeps the file's annotation order within an image
        cuts = np.searchsorted(img_idx[order], np.arange(1, len(self.ids)))
        return np.split(boxes[order], cuts), np.split(labels[order], cuts)

    # -- access ---------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.ids)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.info.name!r}, split {self.split!r}, {len(self)} images, "
                f"{self.info.num_classes - 1} classes)")

    def image_id(self, i: int) -> int:
        """The annotation file's id of item ``i`` (what COCOeval results refer to)."""
        return self.ids[i]

    def load_raw(self, i: int) -> tuple[Image.Image, DetTarget]:
        """(PIL RGB image, target in original pixels) before any transform, e.g. for calibration/visuals."""
        iid = self.ids[i]
        path = self.image_dir / self.coco.imgs[iid]["file_name"]
        img = _open_image(path)
        if img.mode != "RGB":
            img = img.convert("RGB")
        h, w = (int(v) for v in self._sizes[i])
        if img.size != (w, h):
            raise DataError(f"Image '{path}' is {img.width}x{img.height} but '{self.ann_file}' says {w}x{h}; "
                            f"the boxes would be wrong, use the annotation file that matches the images")
        target = {"boxes": torch.from_numpy(self._boxes[i].copy()), "labels": torch.from_numpy(self._labels[i].copy()),
                  "image_id": iid, "orig_size": (h, w)}
        return img, target

    def __getitem__(self, i: int) -> tuple[torch.Tensor, DetTarget]:
        img, target = self.load_raw(i)
        transform = self.transform if self.transform is not None else _no_resize
        return transform(img, target)


# ----------------------------------------------------------------------------------------------
# Registered datasets


@lru_cache(maxsize=1)
def _coco_info() -> DatasetInfo:
    from torchvision.models._meta import _COCO_CATEGORIES  # torchvision is slow to import; only here

    cats = [(i, name) for i, name in enumerate(_COCO_CATEGORIES) if name not in ("__background__", "N/A")]
    return DatasetInfo("coco", len(cats) + 1, ("__background__",) + tuple(n for _, n in cats),
                       palette=tuple(tuple(int(v) for v in rgb) for rgb in voc_colormap(len(cats) + 1)),
                       task="detection", category_ids=tuple(i for i, _ in cats))


def coco_info(**_: Any) -> DatasetInfo:
    """COCO 2017 detection: 80 classes + background, with the real (non-contiguous) category ids."""
    return _coco_info()


@register_dataset("coco", coco_info)
def build_coco(root: PathLike | None, split: str, transform: DetTransformFn | None = None) -> CocoDetection:
    """COCO 2017 (splits train/val) in its download layout: ``<root>/{train,val}2017/`` + ``annotations/``."""
    base = require_root(root, "coco", COCO_LAYOUT)
    name = split[:-4] if split.endswith("2017") else split
    if name not in ("train", "val"):
        raise DataError(f"COCO split '{split}' is unknown; use train or val")
    image_dir = base / f"{name}2017"
    ann_file = base / "annotations" / f"instances_{name}2017.json"
    if not image_dir.is_dir():
        raise DataError(f"Image folder '{image_dir}' is missing; '{base}' should hold {COCO_LAYOUT}")
    if not ann_file.is_file():
        raise DataError(f"COCO annotation file '{ann_file}' is missing; '{base}' should hold {COCO_LAYOUT}")
    return CocoDetection(coco_info(), image_dir, ann_file, transform, name)


DIGITS_DET_INFO = DatasetInfo("digits-det", 11, ("__background__",) + DIGITS_INFO.class_names[1:],
                              palette=DIGITS_INFO.palette, task="detection", category_ids=tuple(range(1, 11)))


def digits_det_info(image_size: int | None = None, **_: Any) -> DatasetInfo:
    """Same scenes, sizes and ids (digit d = category d + 1) as ``digits``, seen as boxes."""
    return replace(DIGITS_DET_INFO, image_size=digits_info(image_size).image_size)


@register_dataset("digits-det", digits_det_info)
def build_digits_det(root: PathLike | None, split: str, transform: DetTransformFn | None = None,
                     image_size: int | None = None, num_train: int | None = None, num_val: int | None = None,
                     max_digits: int | None = None, seed: int | None = None) -> CocoDetection:
    """Built-in digits scenes (splits train/val) as 10-class detection; generated on first use.

    Root and options resolve exactly as for ``digits`` (the same folder serves both tasks).
    """
    if split not in ("train", "val"):
        raise DataError(f"digits-det split '{split}' is unknown; use train or val")
    seg = build_digits(root, split, None, image_size=image_size, num_train=num_train, num_val=num_val,
                       max_digits=max_digits, seed=seed)
    info = replace(DIGITS_DET_INFO, image_size=seg.info.image_size)
    return CocoDetection(info, seg.root / "JPEGImages", seg.root / "annotations" / f"instances_{split}.json",
                         transform, split)
