"""Pascal VOC 2012 segmentation (optionally SBD-augmented), also the reader of the digits set.

Layout (ROOT = the VOC2012 folder or a parent holding ``VOCdevkit/VOC2012``)::

    ROOT/JPEGImages/<id>.jpg
    ROOT/SegmentationClass/<id>.png          palette PNG, values = class ids, 255 = boundary
    ROOT/ImageSets/Segmentation/<split>.txt  one id per line
    ROOT/SegmentationClassAug/<id>.png       (SBD) grayscale class ids
    ROOT/ImageSets/Segmentation/train_aug.txt  (SBD) 10582 training ids
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from kdcompress.data import DatasetInfo, PathLike, SegDataset, Transform, register_dataset, require_root
from kdcompress.errors import DataError

VOC_CLASSES: tuple[str, ...] = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)

IMAGE_EXTS = (".jpg", ".jpeg", ".png")
LAYOUT = ("JPEGImages/*.jpg, SegmentationClass/*.png and ImageSets/Segmentation/{train,val}.txt "
          "(the VOC2012 folder, or a parent with VOCdevkit/VOC2012)")


def voc_colormap(n: int = 256) -> np.ndarray:
    """The standard VOC palette (bit-interleaved class index), uint8 (n, 3); 255 -> (224, 224, 192)."""
    idx = np.arange(n)
    cmap = np.zeros((n, 3), dtype=np.int64)
    c = idx.copy()
    for shift in range(7, -1, -1):
        for ch in range(3):
            cmap[:, ch] |= ((c >> ch) & 1) << shift
        c >>= 3
    return cmap.astype(np.uint8)


VOC_PALETTE: tuple[tuple[int, int, int], ...] = tuple(tuple(int(v) for v in rgb) for rgb in voc_colormap(21))
VOC_INFO = DatasetInfo("voc", 21, VOC_CLASSES, palette=VOC_PALETTE)


def resolve_voc_root(root: PathLike | None, dataset: str = "voc") -> Path:
    """Accept the VOC2012 folder itself or a parent holding VOCdevkit/VOC2012 (or VOC2012)."""
    path = require_root(root, dataset, LAYOUT)
    for cand in (path, path / "VOCdevkit" / "VOC2012", path / "VOC2012"):
        if (cand / "JPEGImages").is_dir():
            return cand
    raise DataError(f"'{path}' has no JPEGImages/ folder (nor VOCdevkit/VOC2012/JPEGImages/); "
                    f"expected {LAYOUT}")


def _read_split(list_file: Path) -> list[str]:
    """Ids from a split file; DeepLab-style lines '/JPEGImages/x.jpg /SegmentationClassAug/x.png' work too."""
    ids = []
    for line in list_file.read_text().splitlines():
        parts = line.split()
        if parts:
            ids.append(Path(parts[0]).stem)
    return ids


class VOCSegmentation(SegDataset):
    """VOC-layout reader; pass another ``info`` to reuse it for any dataset stored the VOC way."""

    def __init__(self, root: PathLike | None, split: str = "train", transform: Transform | None = None,
                 info: DatasetInfo = VOC_INFO, sbd: bool = False) -> None:
        base = resolve_voc_root(root, info.name)
        if split == "train_aug":
            sbd = True
        if sbd and split == "train":
            split = "train_aug"
        seg_dir = base / "ImageSets" / "Segmentation"
        label_dir = base / ("SegmentationClassAug" if split == "train_aug" else "SegmentationClass")
        list_file = seg_dir / f"{split}.txt"
        if split == "train_aug":
            missing = [str(p.relative_to(base)) for p in (list_file, label_dir) if not p.exists()]
            if missing:
                raise DataError(
                    f"SBD-augmented training needs {' and '.join(missing)} in '{base}'; add the "
                    f"'SegmentationClassAug' download (grayscale class-id PNGs + train_aug.txt) or use sbd=False")
        if not seg_dir.is_dir():
            raise DataError(f"'{base}' has no ImageSets/Segmentation/ folder; expected {LAYOUT}")
        if not list_file.is_file():
            have = sorted(p.stem for p in seg_dir.glob("*.txt"))
            raise DataError(f"Split list '{list_file}' is missing; available splits: {', '.join(have) or 'none'}")
        if not label_dir.is_dir():
            raise DataError(f"'{base}' has no {label_dir.name}/ folder; expected {LAYOUT}")
        ids = _read_split(list_file)
        if not ids:
            raise DataError(f"Split list '{list_file}' is empty; add one image id per line")

        images = {}
        for name in os.listdir(base / "JPEGImages"):
            stem, ext = os.path.splitext(name)
            if ext.lower() in IMAGE_EXTS:
                images.setdefault(stem, name)
        labels = set(os.listdir(label_dir))
        no_img = [i for i in ids if i not in images]
        no_lab = [i for i in ids if f"{i}.png" not in labels]
        for what, missing_ids, folder in (("images", no_img, "JPEGImages"), ("labels", no_lab, label_dir.name)):
            if missing_ids:
                shown = ", ".join(missing_ids[:3]) + (" ..." if len(missing_ids) > 3 else "")
                raise DataError(f"{len(missing_ids)} {what} of split '{split}' are missing from "
                                f"'{base / folder}' (e.g. {shown}); restore them or fix '{list_file}'")
        super().__init__(info, [base / "JPEGImages" / images[i] for i in ids],
                         [label_dir / f"{i}.png" for i in ids], transform)
        self.root = base
        self.split = split
        self.ids = ids


@register_dataset("voc", VOC_INFO)
def build_voc(root: PathLike | None, split: str, transform: Transform | None = None,
              sbd: bool = False) -> VOCSegmentation:
    """Pascal VOC 2012, 21 classes; ``sbd=True`` (or split 'train_aug') trains on the 10582 SBD set."""
    return VOCSegmentation(root, split, transform, VOC_INFO, sbd=sbd)
