"""Built-in digits set: determinism, split by source sample, labels, COCO boxes, caching."""

from __future__ import annotations

import filecmp
import json

import numpy as np
import pytest
import torch
from PIL import Image

from kdcompress.data import build_dataset, dataset_info
from kdcompress.data.coco import load_coco
from kdcompress.data.digits import (
    MARKER,
    _scene,
    _split_sources,
    digits_folder_name,
    ensure_digits,
    paste_digit,
    visible_boxes,
)
from kdcompress.data.voc import VOCSegmentation, voc_colormap
from kdcompress.errors import DataError


def _png(path) -> np.ndarray:
    """Raw pixel values of an image file (palette indices for mode P), file closed afterwards."""
    with Image.open(path) as im:
        return np.array(im)


SMALL = {"image_size": 48, "num_train": 20, "num_val": 8, "max_digits": 4}


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KDCOMPRESS_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _tree_equal(a, b) -> bool:
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    return files_a == files_b and all(filecmp.cmp(a / f, b / f, shallow=False) for f in files_a)


def test_generation_layout_and_determinism(cache, tmp_path):
    a = ensure_digits(**SMALL, seed=3)
    assert a == cache / digits_folder_name(48, 20, 8, 4, 3) and a.name == "digits-48px-20-8-4-s3"
    for rel in ("JPEGImages/train_000000.jpg", "SegmentationClass/val_000007.png",
                "ImageSets/Segmentation/train.txt", "ImageSets/Segmentation/val.txt",
                "annotations/instances_train.json", "annotations/instances_val.json", MARKER):
        assert (a / rel).is_file(), rel
    assert not [p for p in cache.iterdir() if p.name.startswith(".")]  # no temp dirs left
    b = ensure_digits(tmp_path / "again", **SMALL, seed=3)
    assert _tree_equal(a, b)
    c = ensure_digits(tmp_path / "other", **SMALL, seed=4)
    assert not filecmp.cmp(a / "JPEGImages/train_000000.jpg", c / "JPEGImages/train_000000.jpg", shallow=False)
    with Image.open(a / "SegmentationClass/train_000000.png") as label:
        assert label.mode == "P" and label.getpalette()[:33] == voc_colormap(11).ravel().tolist()


def test_reuses_complete_cache(cache):
    a = ensure_digits(**SMALL)
    stamp = (a / MARKER).stat().st_mtime_ns
    assert ensure_digits(**SMALL) == a and (a / MARKER).stat().st_mtime_ns == stamp


def test_split_by_source_sample():
    train, val = _split_sources(1797, seed=0)
    assert len(set(train) & set(val)) == 0 and len(train) + len(val) == 1797
    assert abs(len(val) - 0.2 * 1797) < 1
    t2, _ = _split_sources(1797, seed=1)
    assert not np.array_equal(train, t2)


def test_dataset_labels_and_classes(cache):
    train = build_dataset("digits", None, "train", **SMALL)
    val = build_dataset("digits", None, "val", **SMALL)
    assert isinstance(train, VOCSegmentation) and train.info == dataset_info("digits", **SMALL)
    assert train.info.image_size == (SMALL["image_size"],) * 2 and dataset_info("digits").image_size == (96, 96)
    assert len(train) == 20 and len(val) == 8
    x, y = train[0]
    assert x.shape == (3, 48, 48) and x.dtype == torch.float32 and y.shape == (48, 48) and y.dtype == torch.int64
    counts = train.check_labels()
    assert counts.shape == (12,)
    assert (counts[1:11] > 0).sum() >= 8  # most digit classes present in 20 scenes
    share = counts / counts.sum()
    assert share[0] > 0.5 and 0.05 < share[1:11].sum() < 0.4 and 0.005 < share[-1] < 0.15
    meta = json.loads((train.root / MARKER).read_text())
    assert meta["splits"]["train"]["source_samples"] + meta["splits"]["val"]["source_samples"] == 1797


def test_rim_pixels_are_ignore():
    """Mid-intensity glyph pixels (a blend of ink and background) are 255, high ones the class."""
    glyph = np.zeros((1, 8, 8), np.float32)
    glyph[0, 1:7, 1:7] = 0.375  # plateau between the rim thresholds
    glyph[0, 3:5, 3:5] = 1.0
    S = 48
    yy, xx = np.mgrid[0:S, 0:S].astype(np.float32) / S
    img, lab, boxes = _scene(np.random.default_rng(0), glyph, np.array([7]), np.array([0]), S, 1, yy, xx)
    assert img.shape == (S, S, 3) and img.dtype == np.uint8
    assert set(np.unique(lab)) == {0, 8, 255}
    digit, bg = lab == 8, lab == 0
    touching = ((digit[1:] & bg[:-1]).sum() + (digit[:-1] & bg[1:]).sum()
                + (digit[:, 1:] & bg[:, :-1]).sum() + (digit[:, :-1] & bg[:, 1:]).sum())
    assert touching == 0 and (lab == 255).sum() > digit.sum()
    (box,) = boxes
    x, y, w, h = box["bbox"]
    assert box["category_id"] == 8 and box["area"] == (lab[y:y + h, x:x + w] != 0).sum()
    assert (lab[:y] == 0).all() and (lab[y + h:] == 0).all() and (lab[:, :x] == 0).all() and (lab[:, x + w:] == 0).all()


def test_occlusion_later_digit_wins():
    canvas = np.zeros((12, 12, 3), np.float32)
    label = np.zeros((12, 12), np.uint8)
    inst = np.zeros((12, 12), np.uint8)
    solid = np.ones((6, 6), np.float32)
    paste_digit(canvas, label, inst, solid, 0, 0, 1, 3, np.array([1.0, 0, 0]))
    paste_digit(canvas, label, inst, solid, 3, 3, 2, 5, np.array([0, 0, 1.0]))
    assert (label[3:9, 3:9] == 5).all() and (label[:3, :6] == 3).all() and (label[9:] == 0).all()
    assert np.allclose(canvas[4, 4], [0, 0, 1]) and np.allclose(canvas[1, 1], [1, 0, 0])
    boxes = visible_boxes(inst, [3, 5])
    assert boxes[0] == {"category_id": 3, "area": 27, "bbox": [0, 0, 6, 6]}
    assert boxes[1] == {"category_id": 5, "area": 36, "bbox": [3, 3, 6, 6]}
    paste_digit(canvas, label, inst, np.ones((12, 12), np.float32), 0, 0, 3, 7, np.array([0, 1.0, 0]))
    assert [b["category_id"] for b in visible_boxes(inst, [3, 5, 7])] == [7]  # hidden digits get no box


def test_coco_boxes(cache):
    root = ensure_digits(**SMALL)
    for split, n in (("train", 20), ("val", 8)):
        coco = load_coco(root / "annotations" / f"instances_{split}.json")
        assert len(coco.getImgIds()) == n and sorted(coco.getCatIds()) == list(range(1, 11))
        assert {c["name"] for c in coco.loadCats(coco.getCatIds())} == {str(d) for d in range(10)}
        anns = coco.loadAnns(coco.getAnnIds())
        assert len(anns) >= n
        for ann in anns:
            img = coco.loadImgs(ann["image_id"])[0]
            x, y, w, h = ann["bbox"]
            assert w > 0 and h > 0 and x >= 0 and y >= 0 and x + w <= img["width"] and y + h <= img["height"]
            assert ann["iscrowd"] == 0 and 0 < ann["area"] <= w * h
            lab = _png(root / "SegmentationClass" / img["file_name"].replace(".jpg", ".png"))
            assert (lab[y:y + h, x:x + w] == ann["category_id"]).any() or (lab[y:y + h, x:x + w] == 255).any()


def test_build_into_given_root_and_reuse(tmp_path, cache):
    root = tmp_path / "mydigits"
    root.mkdir()
    ds = build_dataset("digits", root, "val", **SMALL)
    assert ds.root == root and len(ds) == 8 and not cache.exists()
    assert len(build_dataset("digits", root, "train")) == 20  # options read from the folder
    with pytest.raises(DataError, match="differ"):
        build_dataset("digits", root, "train", image_size=64)
    with pytest.raises(DataError, match="not"):
        ensure_digits(root, **{**SMALL, "seed": 9})
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "x.txt").write_text("x")
    with pytest.raises(DataError, match="neither empty nor"):
        build_dataset("digits", junk, "train")
    with pytest.raises(DataError, match="image_size"):
        ensure_digits(tmp_path / "bad", image_size=4)
    with pytest.raises(DataError, match="available splits"):
        build_dataset("digits", root, "test")
