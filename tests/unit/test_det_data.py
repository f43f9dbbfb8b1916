"""Detection data: COCO loader on a real-layout fixture, DetTransform, det_collate, digits-det, bad input."""

from __future__ import annotations

import json
import pickle
import random
import warnings

import pytest
import torch
from PIL import Image

from kdcompress.data import DatasetInfo, build_dataset, dataset_info
from kdcompress.data.detection import (
    CocoDetection,
    DetTransform,
    det_collate,
)
from kdcompress.data.fixtures import write_coco_fixture
from kdcompress.errors import DataError

CATS = ((1, "person"), (3, "car"), (18, "dog"))
DIGITS = {"image_size": 64, "num_train": 8, "num_val": 4}


@pytest.fixture
def coco_root(tmp_path):
    return write_coco_fixture(tmp_path / "coco", n_train=4, n_val=2, size=(48, 64), categories=CATS,
                              boxes_per_image=2)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KDCOMPRESS_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _build_quiet(*args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build_dataset(*args, **kwargs)


def _json(root, split="train"):
    return root / "annotations" / f"instances_{split}2017.json"


def _one_line(err) -> str:
    msg = str(err.value)
    assert "\n" not in msg
    return msg


# ----------------------------------------------------------------------------------------------- COCO loader


def test_coco_loader_targets(coco_root):
    with pytest.warns(UserWarning) as rec:
        ds = build_dataset("coco", coco_root, "train")
    msgs = [str(w.message) for w in rec if "clipped" in str(w.message)]
    assert msgs == [f"1 boxes clipped to the image, 1 of zero area dropped in '{_json(coco_root)}'"]
    assert isinstance(ds, CocoDetection) and len(ds) == 4 and ds.ids == [1, 2, 3, 4]
    assert ds.info.task == "detection" and ds.info.num_classes == 81

    doc = json.loads(_json(coco_root).read_text())
    cat_ids = ds.info.category_ids
    for i in range(len(ds)):
        img, target = ds.load_raw(i)
        assert img.mode == "RGB" and img.size == (64, 48)
        assert ds.image_id(i) == target["image_id"] == ds.ids[i] and target["orig_size"] == (48, 64)
        assert target["boxes"].dtype == torch.float32 and target["labels"].dtype == torch.int64
        expect = [a for a in doc["annotations"] if a["image_id"] == ds.ids[i] and not a["iscrowd"]
                  and a["bbox"][2] > 0]
        assert len(target["boxes"]) == len(expect)
        for box, label, ann in zip(target["boxes"].tolist(), target["labels"].tolist(), expect):
            x, y, w, h = ann["bbox"]
            assert box == [x, y, min(x + w, 64), y + h]  # xyxy, clipped at the right edge
            assert 1 <= label <= 80 and cat_ids[label - 1] == ann["category_id"]
    assert {c for c, _ in CATS} == {cat_ids[lab - 1] for i in range(len(ds)) for lab in ds.load_raw(i)[1]["labels"]}
    boxes0 = ds.load_raw(0)[1]["boxes"]
    assert boxes0[-1].tolist() == [54.0, 5.0, 64.0, 15.0]  # the box hanging past the right edge

    image, target = ds[0]  # no transform: native size, normalised, scale 1
    assert image.shape == (3, 48, 64) and image.dtype == torch.float32 and target["scale"] == (1.0, 1.0)


def test_coco_val_no_warning_and_empty_images_kept(coco_root):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = build_dataset("coco", coco_root, "val")
    assert len(ds) == 2 and ds.ids == [101, 102] and ds.split == "val"

    doc = json.loads(_json(coco_root, "val").read_text())
    doc["annotations"] = [a for a in doc["annotations"] if a["image_id"] != 101]
    _json(coco_root, "val").write_text(json.dumps(doc))
    ds = build_dataset("coco", coco_root, "val2017")
    assert len(ds) == 2
    _, target = ds[ds.ids.index(101)]
    assert target["boxes"].shape == (0, 4) and target["labels"].shape == (0,)
    assert target["boxes"].dtype == torch.float32 and target["labels"].dtype == torch.int64


def test_coco_info_without_disk():
    info = dataset_info("coco")
    assert info.num_classes == 81 and len(info.category_ids) == 80 and info.task == "detection"
    assert info.class_names[0] == "__background__" and "N/A" not in info.class_names
    named = dict(zip(info.category_ids, info.class_names[1:]))
    assert named[1] == "person" and named[3] == "car" and named[18] == "dog" and named[90] == "toothbrush"
    assert 12 not in info.category_ids and max(info.category_ids) == 90


def test_detection_info_checks_category_ids():
    with pytest.raises(ValueError, match="category ids"):
        DatasetInfo("x", 3, ("__background__", "a", "b"), task="detection", category_ids=(1,))


# ----------------------------------------------------------------------------------------------- DetTransform


def _pair(w=64, h=48):
    img = Image.new("RGB", (w, h), (10, 200, 30))
    target = {"boxes": torch.tensor([[4.0, 6.0, 20.0, 30.0], [40.0, 0.0, 64.0, 48.0]]),
              "labels": torch.tensor([1, 2]), "image_id": 7, "orig_size": (h, w)}
    return img, target


def test_transform_resize_keeps_aspect_and_scales_boxes():
    img, target = _pair()
    out, t = DetTransform(min_size=96, max_size=1000)(img, target)
    assert out.shape == (3, 96, 128) and out.dtype == torch.float32
    assert t["scale"] == (2.0, 2.0) and t["image_id"] == 7 and t["orig_size"] == (48, 64)
    assert torch.equal(t["boxes"], target["boxes"] * 2) and torch.equal(t["labels"], target["labels"])
    sy, sx = t["scale"]
    assert torch.allclose(t["boxes"] / torch.tensor([sx, sy, sx, sy]), target["boxes"])

    out, t = DetTransform(min_size=96, max_size=100)(img, target)  # longer side capped
    assert out.shape == (3, 75, 100)
    sy, sx = t["scale"]
    assert (sy, sx) == (75 / 48, 100 / 64)
    assert torch.allclose(t["boxes"], target["boxes"] * torch.tensor([sx, sy, sx, sy]))

    out, t = DetTransform(min_size=33, max_size=1000)(img, target)  # rounding: per-axis scales differ
    assert out.shape[1] == 33 and out.shape[2] == round(64 * 33 / 48)
    assert t["scale"] == (33 / 48, out.shape[2] / 64)


def test_transform_normalises():
    img, target = _pair()
    out, _ = DetTransform(48, 64)(img, target)
    expect = (torch.tensor([10, 200, 30]) / 255 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor(
        [0.229, 0.224, 0.225])
    assert torch.allclose(out[:, 0, 0], expect, atol=1e-5)


def test_transform_flip_mirrors_boxes():
    img = Image.new("RGB", (64, 48))
    img.paste((255, 255, 255), (4, 6, 20, 30))  # white where the first box is
    _, target = _pair()
    tf = DetTransform(48, 64, flip=True)
    flips = 0
    for seed in range(20):
        random.seed(seed)
        out, t = tf(img, target)
        b = target["boxes"]
        if not torch.equal(t["boxes"], b):
            flips += 1
            assert torch.equal(t["boxes"], torch.stack([64 - b[:, 2], b[:, 1], 64 - b[:, 0], b[:, 3]], 1))
            x1, y1, x2, y2 = (int(v) for v in t["boxes"][0])
            assert (out[:, y1:y2, x1:x2] > 2).all() and (out[:, :, :x1] < 2).all()  # the white patch moved
    assert 0 < flips < 20


def test_transform_scale_range_and_determinism():
    img, target = _pair()
    tf = DetTransform(32, 64, scale_range=(0.5, 2.0), flip=True)
    shorts = set()
    for _ in range(30):
        out, t = tf(img, target)
        h, w = out.shape[-2:]
        shorts.add(h)
        assert 16 <= h <= 64 and abs(w - 64 * h / 48) <= 1
    assert len(shorts) > 5
    runs = []
    for _ in range(2):
        random.seed(123)
        runs.append([tf(img, target) for _ in range(5)])
    for (a, ta), (b, tb) in zip(*runs):
        assert torch.equal(a, b) and torch.equal(ta["boxes"], tb["boxes"]) and ta["scale"] == tb["scale"]
    # a fixed range draws nothing, so evaluation does not disturb the training random stream
    random.seed(5)
    expect = random.random()
    random.seed(5)
    DetTransform(32, 64)(img, target)
    assert random.random() == expect
    assert pickle.loads(pickle.dumps(tf)) == tf


def test_transform_empty_and_numpy_targets():
    img, _ = _pair()
    out, t = DetTransform(48, 64, flip=True)(img, {"boxes": [], "labels": [], "image_id": 1})
    assert t["boxes"].shape == (0, 4) and t["boxes"].dtype == torch.float32 and t["labels"].dtype == torch.int64
    assert t["orig_size"] == (48, 64)
    with pytest.raises(ValueError):
        DetTransform(100, 50)
    with pytest.raises(ValueError):
        DetTransform(10, 50, scale_range=(2.0, 1.0))


# ----------------------------------------------------------------------------------------------- collate


def test_det_collate_pads_to_multiple_of_32():
    targets = [{"boxes": torch.tensor([[1.0, 2.0, 3.0, 4.0]]), "labels": torch.tensor([1])},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}]
    images = [torch.ones(3, 40, 70), torch.full((3, 64, 33), 2.0)]
    batch, tgts = det_collate(list(zip(images, targets)))
    assert batch.shape == (2, 3, 64, 96)
    assert torch.equal(batch[0, :, :40, :70], images[0]) and batch[0, :, 40:].abs().sum() == 0
    assert batch[0, :, :, 70:].abs().sum() == 0 and torch.equal(batch[1, :, :, :33], images[1])
    assert tgts[0] is targets[0] and torch.equal(tgts[0]["boxes"], torch.tensor([[1.0, 2.0, 3.0, 4.0]]))
    batch, _ = det_collate([(torch.ones(3, 32, 64), targets[0])])
    assert batch.shape == (1, 3, 32, 64)
    with pytest.raises(ValueError):
        det_collate([])


def test_loader_with_transform_and_collate(coco_root):
    ds = _build_quiet("coco", coco_root, "train", DetTransform(60, 100))
    batch, targets = det_collate([ds[i] for i in range(len(ds))])
    assert batch.shape == (4, 3, 64, 96)  # 48x64 -> 60x80, padded to 64x96
    raw = ds.load_raw(0)[1]["boxes"]
    sy, sx = targets[0]["scale"]
    assert torch.allclose(targets[0]["boxes"] / torch.tensor([sx, sy, sx, sy]), raw)


# ----------------------------------------------------------------------------------------------- digits-det


def test_digits_det_boxes_match_json(cache):
    info = dataset_info("digits-det", image_size=64)
    assert info.image_size == (64, 64) and info.num_classes == 11 and info.category_ids == tuple(range(1, 11))
    assert info.class_names == ("__background__",) + tuple(str(d) for d in range(10))
    assert dataset_info("digits-det").image_size == (96, 96)

    ds = build_dataset("digits-det", None, "val", **DIGITS)
    assert len(ds) == 4 and ds.info.image_size == (64, 64) and ds.info.task == "detection"
    seg = build_dataset("digits", None, "val", **DIGITS)
    assert seg.root == ds.image_dir.parent  # the same cached folder serves both tasks
    doc = json.loads((seg.root / "annotations" / "instances_val.json").read_text())
    for i in range(len(ds)):
        img, target = ds.load_raw(i)
        assert img.size == (64, 64)
        anns = [a for a in doc["annotations"] if a["image_id"] == ds.image_id(i)]
        assert anns and target["boxes"].tolist() == [[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)]
        assert target["labels"].tolist() == [a["category_id"] for a in anns]  # ids 1..10 = labels 1..10
    assert len(build_dataset("digits-det", seg.root, "train")) == 8


# ----------------------------------------------------------------------------------------------- bad input


def test_unknown_category_id(coco_root):
    doc = json.loads(_json(coco_root).read_text())
    doc["categories"].append({"id": 99, "name": "dragon"})
    doc["annotations"][0]["category_id"] = 99
    _json(coco_root).write_text(json.dumps(doc))
    with pytest.raises(DataError) as err:
        _build_quiet("coco", coco_root, "train")
    msg = _one_line(err)
    assert "category id 99" in msg and str(_json(coco_root)) in msg and "1-11, 13-25" in msg


def test_missing_image_file(coco_root):
    (coco_root / "val2017" / "000000000102.jpg").unlink()
    with pytest.raises(DataError) as err:
        _build_quiet("coco", coco_root, "val")
    msg = _one_line(err)
    assert "1 of 2 images" in msg and "000000000102.jpg" in msg and "missing" in msg and "restore" in msg


def test_bad_json(coco_root):
    _json(coco_root).write_text("{not json")
    with pytest.raises(DataError) as err:
        _build_quiet("coco", coco_root, "train")
    msg = _one_line(err)
    assert "not valid JSON" in msg and "instances_train2017.json" in msg


def test_missing_annotation_file_and_layout(coco_root, tmp_path):
    _json(coco_root, "val").unlink()
    with pytest.raises(DataError) as err:
        build_dataset("coco", coco_root, "val")
    msg = _one_line(err)
    assert "instances_val2017.json" in msg and "missing" in msg and "train2017/" in msg
    with pytest.raises(DataError) as err:
        build_dataset("coco", tmp_path / "nowhere", "val")
    assert "does not exist" in _one_line(err)
    with pytest.raises(DataError) as err:
        build_dataset("coco", coco_root, "test")
    assert "train or val" in _one_line(err)


def test_image_size_mismatch(coco_root):
    Image.new("RGB", (10, 10)).save(coco_root / "val2017" / "000000000101.jpg")
    ds = build_dataset("coco", coco_root, "val")
    with pytest.raises(DataError) as err:
        ds.load_raw(ds.ids.index(101))
    assert "10x10" in _one_line(err) and "64x48" in str(err.value)
