"""Loaders on fixtures in the real layouts, label mapping, bad inputs, collate, COCO helpers."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from kdcompress.data import (
    DATASETS,
    DatasetInfo,
    build_dataset,
    dataset_info,
    seg_collate,
)
from kdcompress.data.camvid import CamVidSegmentation
from kdcompress.data.cityscapes import LABEL_TO_TRAIN, CityscapesSegmentation
from kdcompress.data.coco import load_coco, write_coco_json
from kdcompress.data.fixtures import write_camvid_fixture, write_cityscapes_fixture, write_voc_fixture
from kdcompress.data.voc import VOC_INFO, VOCSegmentation, voc_colormap
from kdcompress.errors import ConfigError, DataError, KdError


def _png(path) -> np.ndarray:
    """Raw pixel values of an image file (palette indices for mode P), file closed afterwards."""
    with Image.open(path) as im:
        return np.array(im)


def _check_sample(ds, i: int, size: tuple[int, int], num_classes: int) -> torch.Tensor:
    img, lab = ds[i]
    assert img.dtype == torch.float32 and img.shape == (3, *size)
    assert lab.dtype == torch.int64 and lab.shape == size
    vals = set(lab.unique().tolist())
    assert vals <= set(range(num_classes)) | {255}
    return lab


# ---------------------------------------------------------------------------------------------- registry


def test_registry_and_info_without_disk():
    assert {"voc", "cityscapes", "camvid", "digits"} <= set(DATASETS.names())
    assert dataset_info("voc") == VOC_INFO
    assert dataset_info("voc").num_classes == 21 and dataset_info("voc").class_names[15] == "person"
    assert dataset_info("cityscapes").num_classes == 19
    assert dataset_info("camvid").class_names[0] == "Sky"
    digits = dataset_info("digits", image_size=48)
    assert digits.num_classes == 11 and digits.class_names[:2] == ("background", "0")
    assert digits.ignore_index == 255 and len(digits.palette) == 11
    with pytest.raises(KdError, match="Available"):
        dataset_info("vocc")
    with pytest.raises(ConfigError, match="sbd"):
        build_dataset("voc", "/nonexistent", "train", sbdd=True)


def test_voc_colormap_standard_entries():
    cmap = voc_colormap()
    assert tuple(cmap[1]) == (128, 0, 0) and tuple(cmap[15]) == (192, 128, 128)
    assert tuple(cmap[255]) == (224, 224, 192)


# ---------------------------------------------------------------------------------------------- VOC


def test_voc_loader(tmp_path):
    write_voc_fixture(tmp_path / "VOC2012", n_train=4, n_val=2, size=(40, 48))
    train = build_dataset("voc", tmp_path / "VOC2012", "train")
    val = build_dataset("voc", tmp_path / "VOC2012", "val")
    assert len(train) == 4 and len(val) == 2 and len(train.image_paths) == 4
    lab = _check_sample(train, 0, (40, 48), 21)
    raw = _png(train.label_paths[0])
    assert np.array_equal(lab.numpy(), raw)  # palette indices are the classes
    img, lab_np = train.load_raw(1)
    assert img.mode == "RGB" and img.size == (48, 40) and lab_np.dtype == np.uint8 and lab_np.shape == (40, 48)
    counts = train.check_labels()
    assert counts.shape == (22,) and counts.sum() == 4 * 40 * 48 and counts[-1] > 0


def test_voc_accepts_vocdevkit_parent(tmp_path):
    write_voc_fixture(tmp_path / "VOCdevkit" / "VOC2012")
    ds = VOCSegmentation(tmp_path, "trainval")
    assert len(ds) == 6 and ds.root == tmp_path / "VOCdevkit" / "VOC2012"


def test_voc_sbd(tmp_path):
    write_voc_fixture(tmp_path, n_train=3, n_val=2, sbd=True)
    aug = build_dataset("voc", tmp_path, "train", sbd=True)
    assert aug.split == "train_aug" and len(aug) == 6
    assert all(p.parent.name == "SegmentationClassAug" for p in aug.label_paths)
    with Image.open(aug.label_paths[0]) as im:
        assert im.mode == "L"
    _check_sample(aug, 5, (40, 48), 21)
    assert len(build_dataset("voc", tmp_path, "train_aug")) == 6
    val = build_dataset("voc", tmp_path, "val", sbd=True)  # evaluation stays on the official labels
    assert val.label_paths[0].parent.name == "SegmentationClass"


def test_voc_sbd_missing_says_what(tmp_path):
    write_voc_fixture(tmp_path)
    with pytest.raises(DataError, match="train_aug.txt and SegmentationClassAug"):
        build_dataset("voc", tmp_path, "train", sbd=True)


def test_voc_custom_info(tmp_path):
    write_voc_fixture(tmp_path, num_classes=5)
    info = DatasetInfo("five", 5, tuple("abcde"))
    ds = VOCSegmentation(tmp_path, "train", info=info)
    assert ds.info.num_classes == 5
    assert ds.check_labels()[:5].sum() > 0


# ---------------------------------------------------------------------------------------------- Cityscapes / CamVid


def test_cityscapes_mapping(tmp_path):
    write_cityscapes_fixture(tmp_path, n_train=3, n_val=2, size=(32, 64))
    ds = build_dataset("cityscapes", tmp_path, "train")
    assert isinstance(ds, CityscapesSegmentation) and len(ds) == 3
    assert len(build_dataset("cityscapes", tmp_path, "val")) == 2
    lab = _check_sample(ds, 0, (32, 64), 19).numpy()
    raw = _png(ds.label_paths[0])
    assert (lab[raw == 7] == 0).all() and (raw == 7).any()  # road
    assert (lab[raw == 26] == 13).all() and (raw == 26).any()  # car
    assert (lab[raw == 0] == 255).all() and (raw == 0).any()  # unlabeled
    assert (lab[raw == 9] == 255).all() and (lab[raw == 255] == 255).all()
    expected = np.full(256, 255)
    for k, v in LABEL_TO_TRAIN.items():
        expected[k] = v
    assert np.array_equal(lab, expected[raw])


def test_camvid_mapping(tmp_path):
    write_camvid_fixture(tmp_path, n_train=2, n_val=1, n_test=1, size=(36, 48))
    ds = build_dataset("camvid", tmp_path, "train")
    assert isinstance(ds, CamVidSegmentation) and len(ds) == 2
    assert len(build_dataset("camvid", tmp_path, "test")) == 1
    lab = _check_sample(ds, 0, (36, 48), 11).numpy()
    raw = _png(ds.label_paths[0])
    assert (raw == 11).any() and (lab[raw == 11] == 255).all()
    assert np.array_equal(lab[raw < 11], raw[raw < 11])


# ---------------------------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize("name", ["voc", "cityscapes", "camvid"])
def test_missing_and_empty_root(tmp_path, name):
    with pytest.raises(DataError, match="does not exist"):
        build_dataset(name, tmp_path / "nope", "train")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="is empty"):
        build_dataset(name, tmp_path / "empty", "train")
    with pytest.raises(DataError, match="needs a root"):
        build_dataset(name, None, "train")


def test_missing_subfolders(tmp_path):
    (tmp_path / "junk.txt").write_text("x")
    with pytest.raises(DataError, match="JPEGImages"):
        build_dataset("voc", tmp_path, "train")
    with pytest.raises(DataError, match="leftImg8bit"):
        build_dataset("cityscapes", tmp_path, "train")
    with pytest.raises(DataError, match="trainannot|train"):
        build_dataset("camvid", tmp_path, "train")

    voc = write_voc_fixture(tmp_path / "voc")
    with pytest.raises(DataError, match="available splits: train, trainval, val"):
        build_dataset("voc", voc, "test")
    (voc / "ImageSets/Segmentation/val.txt").write_text("\n")
    with pytest.raises(DataError, match="empty"):
        build_dataset("voc", voc, "val")
    next((voc / "JPEGImages").glob("2007_000001.jpg")).unlink()
    with pytest.raises(DataError, match="1 images of split 'train' are missing.*2007_000001"):
        build_dataset("voc", voc, "train")

    cs = write_cityscapes_fixture(tmp_path / "cs")
    next((cs / "gtFine/val").rglob("*.png")).unlink()
    with pytest.raises(DataError, match="label files are missing"):
        build_dataset("cityscapes", cs, "val")
    with pytest.raises(DataError, match="available splits: train, val"):
        build_dataset("cityscapes", cs, "test")

    cv = write_camvid_fixture(tmp_path / "cv")
    for p in (cv / "valannot").iterdir():
        p.unlink()
    (cv / "valannot").rmdir()
    with pytest.raises(DataError, match="valannot"):
        build_dataset("camvid", cv, "val")


def test_out_of_range_label_names_file(tmp_path):
    write_voc_fixture(tmp_path, num_classes=11)
    info = DatasetInfo("eleven", 11, tuple(str(i) for i in range(11)))
    ds = VOCSegmentation(tmp_path, "train", info=info)
    ds[0]
    bad = _png(ds.label_paths[1])
    bad[:4, :4] = 50
    Image.fromarray(bad).save(ds.label_paths[1])
    with pytest.raises(DataError, match=r"2007_000001\.png.*\[50\]"):
        ds[1]
    with pytest.raises(DataError, match=r"2007_000001\.png.*\[50\]"):
        ds.check_labels()
    ds.check_labels(max_files=1)  # only the first file: fine


def test_wrong_dataset_and_colour_labels(tmp_path):
    write_voc_fixture(tmp_path)  # 21-class labels read with a 3-class info -> values out of range
    ds = VOCSegmentation(tmp_path, "train", info=DatasetInfo("small", 3, ("a", "b", "c")))
    with pytest.raises(DataError, match="not valid for dataset 'small'"):
        ds.check_labels()
    Image.fromarray(np.stack([_png(ds.label_paths[0])] * 3, -1)).save(ds.label_paths[0])
    with pytest.raises(DataError, match="channels"):
        ds[0]
    ds.image_paths[1].write_bytes(b"not a jpeg")
    with pytest.raises(DataError, match="corrupt"):
        ds[1]


def test_cityscapes_rejects_non_labelid_values(tmp_path):
    cs = write_cityscapes_fixture(tmp_path, n_train=1, n_val=1)
    ds = build_dataset("cityscapes", cs, "train")
    raw = _png(ds.label_paths[0])
    raw[0, 0] = 40
    Image.fromarray(raw).save(ds.label_paths[0])
    with pytest.raises(DataError, match=r"_gtFine_labelIds\.png.*\[40\]"):
        ds[0]


def test_image_label_size_mismatch(tmp_path):
    write_camvid_fixture(tmp_path, n_train=1)
    ds = build_dataset("camvid", tmp_path, "train")
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(ds.label_paths[0])
    with pytest.raises(DataError, match="must match"):
        ds[0]


# ---------------------------------------------------------------------------------------------- collate / loader


def test_seg_collate_pads():
    a = (torch.ones(3, 4, 5), torch.ones(4, 5, dtype=torch.long))
    b = (torch.ones(3, 6, 3), torch.zeros(6, 3, dtype=torch.long))
    imgs, labs = seg_collate([a, b])
    assert imgs.shape == (2, 3, 6, 5) and labs.shape == (2, 6, 5) and labs.dtype == torch.long
    assert (imgs[0, :, 4:] == 0).all() and (labs[0, 4:] == 255).all()
    assert (imgs[1, :, :, 3:] == 0).all() and (labs[1, :, 3:] == 255).all()
    assert (labs[0, :4, :5] == 1).all() and (labs[1, :6, :3] == 0).all()
    same, _ = seg_collate([a, a])
    assert same.shape == (2, 3, 4, 5)


def test_dataloader_with_mixed_sizes(tmp_path):
    write_voc_fixture(tmp_path / "a", n_train=2, size=(40, 48))
    ds = build_dataset("voc", tmp_path / "a", "train")
    ds.image_paths[1] = ds.image_paths[0]
    loader = torch.utils.data.DataLoader(ds, batch_size=2, collate_fn=seg_collate)
    imgs, labs = next(iter(loader))
    assert imgs.shape == (2, 3, 40, 48) and labs.shape == (2, 40, 48)


# ---------------------------------------------------------------------------------------------- COCO helpers


def test_coco_roundtrip_and_errors(tmp_path):
    path = write_coco_json(tmp_path / "ann" / "x.json", [{"id": 1, "file_name": "a.jpg", "width": 8, "height": 8}],
                           [{"id": 1, "image_id": 1, "category_id": 2, "bbox": [1, 1, 3, 3], "area": 9,
                             "iscrowd": 0}], [{"id": 2, "name": "1"}])
    coco = load_coco(path)
    assert coco.getAnnIds(imgIds=[1]) == [1] and coco.loadCats([2])[0]["name"] == "1"
    assert not list((tmp_path / "ann").glob(".*tmp"))
    with pytest.raises(DataError, match="missing"):
        load_coco(tmp_path / "none.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(DataError, match="not valid JSON"):
        load_coco(tmp_path / "bad.json")
    (tmp_path / "bad2.json").write_text(json.dumps({"images": []}))
    with pytest.raises(DataError, match="lacks"):
        load_coco(tmp_path / "bad2.json")
    (tmp_path / "bad3.json").write_text(json.dumps({"images": [], "categories": [], "annotations": [
        {"id": 1, "image_id": 5, "category_id": 1, "bbox": [0, 0, 1, 1]}]}))
    with pytest.raises(DataError, match="unknown image"):
        load_coco(tmp_path / "bad3.json")
