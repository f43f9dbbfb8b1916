"""Cityscapes fine annotations, 34 labelIds mapped to the 19 evaluation trainIds.

Layout::

    ROOT/leftImg8bit/<split>/<city>/<name>_leftImg8bit.png
    ROOT/gtFine/<split>/<city>/<name>_gtFine_labelIds.png
"""

from __future__ import annotations

import numpy as np

from kdcompress.data import DatasetInfo, PathLike, SegDataset, Transform, register_dataset, require_root
from kdcompress.errors import DataError

CITYSCAPES_CLASSES: tuple[str, ...] = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
    "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle",
)
CITYSCAPES_PALETTE: tuple[tuple[int, int, int], ...] = (
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153), (153, 153, 153),
    (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60),
    (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32),
)
CITYSCAPES_INFO = DatasetInfo("cityscapes", 19, CITYSCAPES_CLASSES, palette=CITYSCAPES_PALETTE)

# labelId -> trainId for the 19 evaluated classes (cityscapesScripts labels.py); the rest -> 255.
LABEL_TO_TRAIN: dict[int, int] = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10,
    24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
}
NUM_LABEL_IDS = 34

LAYOUT = ("leftImg8bit/<split>/<city>/*_leftImg8bit.png and "
          "gtFine/<split>/<city>/*_gtFine_labelIds.png")


def cityscapes_lut() -> np.ndarray:
    """labelIds 0..33 (and 255, the stored -1 'license plate') -> trainIds; other raw values invalid."""
    lut = np.full(256, -1, dtype=np.int16)
    lut[:NUM_LABEL_IDS] = 255
    lut[255] = 255
    for label_id, train_id in LABEL_TO_TRAIN.items():
        lut[label_id] = train_id
    return lut


class CityscapesSegmentation(SegDataset):
    """Finds image/labelIds pairs per city; labels are mapped to trainIds with a lookup table."""

    def __init__(self, root: PathLike | None, split: str = "train", transform: Transform | None = None) -> None:
        base = require_root(root, "cityscapes", LAYOUT)
        img_dir = base / "leftImg8bit" / split
        gt_dir = base / "gtFine" / split
        for d in (base / "leftImg8bit", base / "gtFine"):
            if not d.is_dir():
                raise DataError(f"'{base}' has no {d.name}/ folder; expected {LAYOUT}")
        if not img_dir.is_dir():
            have = sorted(p.name for p in (base / "leftImg8bit").iterdir() if p.is_dir())
            raise DataError(f"Split folder '{img_dir}' is missing; available splits: {', '.join(have) or 'none'}")
        if not gt_dir.is_dir():
            raise DataError(f"Label folder '{gt_dir}' is missing; download gtFine_trainvaltest and extract it "
                            f"next to leftImg8bit/")
        images = sorted(img_dir.glob("*/*_leftImg8bit.png"))
        if not images:
            raise DataError(f"No *_leftImg8bit.png images in '{img_dir}/<city>/'; expected {LAYOUT}")
        labels = [gt_dir / p.parent.name / p.name.replace("_leftImg8bit.png", "_gtFine_labelIds.png")
                  for p in images]
        missing = [p for p in labels if not p.is_file()]
        if missing:
            raise DataError(f"{len(missing)} of {len(labels)} label files are missing, e.g. '{missing[0]}'; "
                            f"extract gtFine for split '{split}'")
        super().__init__(CITYSCAPES_INFO, images, labels, transform, label_lut=cityscapes_lut())
        self.root = base
        self.split = split


@register_dataset("cityscapes", CITYSCAPES_INFO)
def build_cityscapes(root: PathLike | None, split: str,
                     transform: Transform | None = None) -> CityscapesSegmentation:
    """Cityscapes fine, 19 trainId classes (splits train/val/test)."""
    return CityscapesSegmentation(root, split, transform)
