"""COCO box mAP (kdcompress.metrics.detection) against hand-computed cases on tiny in-memory ground truth."""

from __future__ import annotations

import contextlib
import copy
import io
import json

import numpy as np
import pytest
import torch

pytest.importorskip("pycocotools")
from pycocotools.coco import COCO  # noqa: E402

from kdcompress.metrics.detection import coco_map, to_coco_results  # noqa: E402

# Non-contiguous COCO category ids, as in real COCO (1..90 with gaps). Model labels: cat=1, dog=2, bird=3.
CATS = [{"id": 1, "name": "cat"}, {"id": 3, "name": "dog"}, {"id": 18, "name": "bird"}]
LABEL_TO_CATEGORY = [1, 3, 18]
HALF_RECALL_AP = 51 / 101  # precision 1 at the 51 recall thresholds 0.00..0.50 of COCO's 101, 0 after


def make_coco(images: list[dict], anns: list[tuple[int, int, list[float]]], cats: list[dict] = CATS) -> COCO:
    """GT from (image_id, category_id, xywh) triples; area = w*h, as COCO's boxes-only datasets do."""
    coco = COCO()
    coco.dataset = {
        "images": images,
        "categories": cats,
        "annotations": [
            {"id": i + 1, "image_id": img, "category_id": cat, "bbox": list(b), "area": b[2] * b[3], "iscrowd": 0}
            for i, (img, cat, b) in enumerate(anns)
        ],
    }
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


# image 1 (100x100): medium cat + medium dog; image 2 (200x200): small bird + large dog;
# image 3: a cat nobody detects (used for the subset test); image 4: no objects at all.
GT_ANNS = [
    (1, 1, [10.0, 20.0, 40.0, 40.0]),    # area 1600: medium
    (1, 3, [50.0, 50.0, 40.0, 30.0]),    # area 1200: medium
    (2, 18, [5.0, 5.0, 20.0, 20.0]),     # area 400: small
    (2, 3, [20.0, 10.0, 120.0, 100.0]),  # area 12000: large
    (3, 1, [30.0, 30.0, 50.0, 50.0]),
]
IMAGES = [
    {"id": 1, "width": 100, "height": 100},
    {"id": 2, "width": 200, "height": 200},
    {"id": 3, "width": 100, "height": 100},
    {"id": 4, "width": 100, "height": 100},
]


@pytest.fixture
def gt() -> COCO:
    return make_coco(IMAGES, GT_ANNS)


def perfect_results(images: tuple[int, ...] = (1, 2)) -> list[dict]:
    return [{"image_id": img, "category_id": cat, "bbox": list(b), "score": 1.0}
            for img, cat, b in GT_ANNS if img in images]


def xywh_to_xyxy(b: list[float]) -> list[float]:
    return [b[0], b[1], b[0] + b[2], b[1] + b[3]]


def model_output(images: tuple[int, ...] = (1, 2)) -> dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """What a perfect detector emits per image: xyxy boxes, float32 scores, contiguous labels 1..K."""
    out = {}
    for img in images:
        rows = [(xywh_to_xyxy(b), LABEL_TO_CATEGORY.index(cat) + 1) for i, cat, b in GT_ANNS if i == img]
        out[img] = (np.array([r[0] for r in rows], dtype=np.float32), np.ones(len(rows), dtype=np.float32),
                    np.array([r[1] for r in rows], dtype=np.int64))
    return out


def test_perfect_detector_scores_one(gt):
    m = coco_map(gt, perfect_results(), image_ids=[1, 2])
    assert m["mAP"] == pytest.approx(1.0, abs=1e-9)
    assert m["AP50"] == pytest.approx(1.0, abs=1e-9)
    assert m["AP75"] == pytest.approx(1.0, abs=1e-9)
    assert m["AR100"] == pytest.approx(1.0, abs=1e-9)
    for key in ("APs", "APm", "APl"):
        assert m[key] == pytest.approx(1.0, abs=1e-9)
    assert m["per_class_AP"] == {"cat": pytest.approx(1.0), "dog": pytest.approx(1.0), "bird": pytest.approx(1.0)}
    json.dumps(m)


def test_to_coco_results_converts_xyxy_to_xywh_and_raw_xyxy_scores_lower(gt):
    results = []
    for img, (boxes, scores, labels) in model_output().items():
        results += to_coco_results(img, boxes, scores, labels, LABEL_TO_CATEGORY)
    got = sorted((r["image_id"], r["category_id"], r["bbox"]) for r in results)
    assert got == sorted((img, cat, b) for img, cat, b in GT_ANNS if img in (1, 2))
    assert coco_map(gt, results, [1, 2])["mAP"] == pytest.approx(1.0, abs=1e-9)

    # The classic mistake: xyxy handed to COCO as if it were xywh. IoUs become 0.53, 0.17, 0.64, 0.78.
    raw = [{**r, "bbox": xywh_to_xyxy(r["bbox"])} for r in results]
    m = coco_map(gt, raw, [1, 2])
    assert m["mAP"] < 0.5
    assert m["AP75"] < 1.0


def test_labels_mapped_through_label_to_category_score_one(gt):
    results = []
    for img, (boxes, scores, labels) in model_output().items():
        results += to_coco_results(img, boxes, scores, labels, LABEL_TO_CATEGORY)
    assert {r["category_id"] for r in results} == {1, 3, 18}
    m = coco_map(gt, results, [1, 2])
    assert m["mAP"] == pytest.approx(1.0, abs=1e-9)


def test_identity_mapping_on_noncontiguous_ids_raises_or_scores_low(gt):
    identity = [1, 2, 3]
    results = []
    for img, (boxes, scores, labels) in model_output().items():
        results += to_coco_results(img, boxes, scores, labels, identity)
    # dog (label 2) becomes category 2, which the dataset does not have
    with pytest.raises(ValueError, match="category_id 2"):
        coco_map(gt, results, [1, 2])
    # the surviving results: cat right, bird mislabelled as category 3 (dog), dog missing -> only cat scores
    valid = [r for r in results if r["category_id"] != 2]
    m = coco_map(gt, valid, [1, 2])
    assert m["mAP"] == pytest.approx(1 / 3, abs=1e-6)
    assert m["per_class_AP"]["dog"] == pytest.approx(0.0)
    assert m["per_class_AP"]["bird"] == pytest.approx(0.0)


def test_image_id_outside_subset_raises(gt):
    results = perfect_results((1, 2, 3))
    with pytest.raises(ValueError, match="image_id 3"):
        coco_map(gt, results, [1, 2])


def test_image_ids_not_in_gt_or_empty_raise(gt):
    with pytest.raises(ValueError, match="not in coco_gt"):
        coco_map(gt, [], [1, 99])
    with pytest.raises(ValueError, match="empty"):
        coco_map(gt, [], [])


def test_empty_results_are_zero_not_a_crash(gt):
    m = coco_map(gt, [], [1, 2])
    for key in ("mAP", "AP50", "AP75", "APs", "APm", "APl", "AR100"):
        assert m[key] == 0.0, key
    assert m["per_class_AP"] == {"cat": 0.0, "dog": 0.0, "bird": 0.0}
    json.dumps(m)


def test_subset_without_any_ground_truth_reports_zero_not_minus_one(gt):
    for results in ([], [{"image_id": 4, "category_id": 1, "bbox": [1.0, 1.0, 10.0, 10.0], "score": 0.9}]):
        m = coco_map(gt, results, [4])
        for key in ("mAP", "AP50", "AP75", "AR100"):
            assert m[key] == 0.0, key
        assert m["APs"] is None and m["APm"] is None and m["APl"] is None
        assert m["per_class_AP"] == {"cat": None, "dog": None, "bird": None}


def test_missing_sizes_and_classes_are_none(gt):
    # image 1 alone: only medium objects, no bird
    m = coco_map(gt, perfect_results((1,)), [1])
    assert m["mAP"] == pytest.approx(1.0, abs=1e-9)
    assert m["APm"] == pytest.approx(1.0, abs=1e-9)
    assert m["APs"] is None and m["APl"] is None
    assert m["per_class_AP"]["bird"] is None
    assert m["per_class_AP"]["cat"] == pytest.approx(1.0)


def test_half_recall_is_51_over_101():
    gt = make_coco([{"id": 7, "width": 100, "height": 100}],
                   [(7, 1, [0.0, 0.0, 40.0, 40.0]), (7, 1, [50.0, 50.0, 40.0, 40.0])], cats=[CATS[0]])
    m = coco_map(gt, [{"image_id": 7, "category_id": 1, "bbox": [0.0, 0.0, 40.0, 40.0], "score": 0.9}], [7])
    assert m["mAP"] == pytest.approx(HALF_RECALL_AP, abs=1e-6)
    assert m["AP50"] == pytest.approx(HALF_RECALL_AP, abs=1e-6)
    assert m["AR100"] == pytest.approx(0.5, abs=1e-6)
    assert m["per_class_AP"]["cat"] == pytest.approx(HALF_RECALL_AP, abs=1e-6)


def test_img_ids_subset_limits_what_counts_against_recall(gt):
    results = perfect_results((1, 2))
    assert coco_map(gt, results, [1, 2])["mAP"] == pytest.approx(1.0, abs=1e-9)
    # image 3 has a cat with no detection: with it, cat recall is 1/2
    m = coco_map(gt, results, [1, 2, 3])
    assert m["per_class_AP"]["cat"] == pytest.approx(HALF_RECALL_AP, abs=1e-6)
    assert m["mAP"] == pytest.approx((HALF_RECALL_AP + 2.0) / 3, abs=1e-6)


def test_scale_maps_boxes_back_to_original_pixels(gt):
    # original 100x100 image resized by (sy, sx) = (2, 3): anisotropic, so swapped axes would show
    cat_xyxy = np.array([[10.0, 20.0, 50.0, 60.0]]) * np.array([3.0, 2.0, 3.0, 2.0])
    (r,) = to_coco_results(1, cat_xyxy, [0.8], [1], LABEL_TO_CATEGORY, scale=(2.0, 3.0))
    assert r["bbox"] == pytest.approx([10.0, 20.0, 40.0, 40.0])
    assert coco_map(gt, [r, *perfect_results((2,)), perfect_results((1,))[1]], [1, 2])["mAP"] == pytest.approx(1.0)


def test_boxes_clipped_to_original_image_and_empty_ones_dropped():
    boxes = np.array([
        [70.0, -5.0, 95.0, 30.0],   # crosses the right (W=80) and top edges
        [85.0, 10.0, 95.0, 20.0],   # entirely right of the image: zero width after clipping
        [10.0, 10.0, 10.0, 20.0],   # already zero width
    ])
    res = to_coco_results(5, boxes, [0.9, 0.8, 0.7], [1, 1, 1], LABEL_TO_CATEGORY, orig_size=(100, 80))
    assert len(res) == 1
    assert res[0]["bbox"] == pytest.approx([70.0, 0.0, 10.0, 30.0])
    # without orig_size nothing is clipped, only the degenerate box goes
    res = to_coco_results(5, boxes, [0.9, 0.8, 0.7], [1, 1, 1], LABEL_TO_CATEGORY)
    assert [r["bbox"] for r in res] == [[70.0, -5.0, 25.0, 35.0], [85.0, 10.0, 10.0, 10.0]]


def test_scale_and_clip_together():
    # input is the original (H=50, W=60) scaled 2x; a box past the input's right edge clips to W=60
    res = to_coco_results(1, np.array([[100.0, 20.0, 140.0, 60.0]]), [0.5], [2], LABEL_TO_CATEGORY,
                          scale=(2.0, 2.0), orig_size=(50, 60))
    assert res == [{"image_id": 1, "category_id": 3, "bbox": [50.0, 10.0, 10.0, 20.0], "score": 0.5}]


@pytest.mark.parametrize("bad", [0, 4, -1])
def test_background_or_out_of_range_label_raises(bad):
    with pytest.raises(ValueError, match="outside 1..3"):
        to_coco_results(1, np.array([[0.0, 0.0, 10.0, 10.0]]), [0.9], [bad], LABEL_TO_CATEGORY)


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match="shape"):
        to_coco_results(1, np.zeros((2, 5)), [0.1, 0.2], [1, 1], LABEL_TO_CATEGORY)
    with pytest.raises(ValueError, match="scores"):
        to_coco_results(1, np.zeros((2, 4)), [0.1], [1, 1], LABEL_TO_CATEGORY)


def test_empty_detections_give_empty_list():
    assert to_coco_results(1, np.zeros((0, 4)), np.zeros(0), np.zeros(0, dtype=np.int64), LABEL_TO_CATEGORY) == []
    assert to_coco_results(1, torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.long),
                           LABEL_TO_CATEGORY) == []


def test_float32_and_torch_inputs_come_out_as_python_numbers(gt):
    res = to_coco_results(np.int64(1), torch.tensor([[10.0, 20.0, 50.0, 60.0]]),
                          torch.tensor([0.7], dtype=torch.float32), torch.tensor([1]), LABEL_TO_CATEGORY)
    res += to_coco_results(1, np.array([[50.0, 50.0, 90.0, 80.0]], dtype=np.float32),
                           np.array([0.3], dtype=np.float32), np.array([2], dtype=np.int32), LABEL_TO_CATEGORY)
    for r in res:
        assert type(r["image_id"]) is int and type(r["category_id"]) is int
        assert type(r["score"]) is float
        assert all(type(v) is float for v in r["bbox"])
    assert res[0]["score"] == pytest.approx(0.7)
    json.loads(json.dumps(res))
    m = coco_map(gt, res, [1])
    assert m["mAP"] == pytest.approx(1.0, abs=1e-9)
    json.dumps(m)


def test_results_list_is_not_mutated_by_loadres(gt):
    results = perfect_results()
    before = copy.deepcopy(results)
    coco_map(gt, results, [1, 2])
    assert results == before


def test_keeps_top_100_per_image_across_classes(gt):
    # 120 higher-scoring false positives in other classes push image 1's only cat past the 100 cut
    junk = [{"image_id": 1, "category_id": 3 if i % 2 else 18, "bbox": [0.0, 90.0, 5.0, 5.0], "score": 0.9}
            for i in range(120)]
    cat = {"image_id": 1, "category_id": 1, "bbox": [10.0, 20.0, 40.0, 40.0], "score": 0.5}
    assert coco_map(gt, [cat, *junk], [1])["per_class_AP"]["cat"] == 0.0
    assert coco_map(gt, [cat, *junk[:99]], [1])["per_class_AP"]["cat"] == pytest.approx(1.0)


def test_class_names_follow_sorted_category_ids(gt):
    m = coco_map(gt, perfect_results((1,)), [1], class_names=["Cat", "Dog", "Bird"])
    assert list(m["per_class_AP"]) == ["Cat", "Dog", "Bird"]
    with pytest.raises(ValueError, match="class_names"):
        coco_map(gt, [], [1], class_names=["a", "b"])


def test_pycocotools_prints_are_suppressed(gt, capsys):
    coco_map(gt, perfect_results(), [1, 2])
    coco_map(gt, [], [1, 2])
    assert capsys.readouterr().out == ""
