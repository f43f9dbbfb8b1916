"""COCO box mAP through pycocotools, the reference implementation the papers' tables use.

Two steps, kept apart so a detection task's accumulator can collect per-image results during
evaluation and score the whole split once at the end:

* :func:`to_coco_results` turns one image's network output (xyxy boxes in the resized input's
  pixels, contiguous model labels 1..K) into COCO result dicts (xywh boxes in the original image's
  pixels, the dataset's own category ids). Getting either conversion wrong does not crash
  pycocotools, it silently lowers the score, hence one tested place for it.
* :func:`coco_map` runs ``COCOeval(iouType="bbox")`` on an evaluated subset of images and returns a
  flat, JSON-serialisable dict.
"""

from __future__ import annotations

import contextlib
import io
import math
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import numpy as np

MAX_DETS = 100  # COCO's largest default maxDets; per-image results beyond it are dropped before loadRes


def _to_numpy(x: Any) -> np.ndarray:
    """Accept numpy arrays, torch tensors (any device) and plain sequences without importing torch."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def to_coco_results(
    image_id: int,
    boxes_xyxy: Any,
    scores: Any,
    labels: Any,
    label_to_category: Sequence[int],
    scale: tuple[float, float] = (1.0, 1.0),
    orig_size: tuple[int, int] | None = None,
) -> list[dict]:
    """One image's detections as COCO result dicts, in the original image's pixels.

    ``boxes_xyxy`` [N,4] is in the network input's pixels; ``scale = (sy, sx)`` is how much the
    original image was scaled to make that input (input = original * scale), so boxes are divided by
    (sx, sy, sx, sy). COCO ground truth lives in original pixels, so skipping this would compare
    boxes of the wrong size. With ``orig_size = (H, W)`` boxes are clipped to the original image and
    those left with zero width or height are dropped (COCOeval would count them as false positives).

    ``labels`` are contiguous model labels 1..K (0 is background and never emitted);
    ``label_to_category[label - 1]`` is the dataset's COCO category id, which need not be contiguous
    (COCO's own ids run 1..90 with gaps). A label of 0 or above K raises ``ValueError``: it would
    otherwise be mapped to a wrong or missing category without any error.

    Returns ``{"image_id", "category_id", "bbox": [x, y, w, h], "score"}`` with plain Python
    ints/floats so the list can be ``json.dumps``-ed.
    """
    boxes = _to_numpy(boxes_xyxy).astype(np.float64, copy=False)
    scores_np = _to_numpy(scores).astype(np.float64, copy=False).reshape(-1)
    labels_raw = _to_numpy(labels).reshape(-1)
    if boxes.size == 0 and scores_np.size == 0 and labels_raw.size == 0:
        return []
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"boxes_xyxy must have shape [N, 4], got {tuple(boxes.shape)}")
    n = boxes.shape[0]
    if scores_np.shape[0] != n or labels_raw.shape[0] != n:
        raise ValueError(f"{n} boxes but {scores_np.shape[0]} scores and {labels_raw.shape[0]} labels")
    labels_np = labels_raw.astype(np.int64)
    if np.any(labels_np != labels_raw):
        raise ValueError("labels must be integers (contiguous model labels 1..K)")
    k = len(label_to_category)
    bad = labels_np[(labels_np < 1) | (labels_np > k)]
    if bad.size:
        raise ValueError(f"label {int(bad[0])} outside 1..{k} (0 is background; K = len(label_to_category))")
    sy, sx = float(scale[0]), float(scale[1])
    if not (sy > 0 and sx > 0 and math.isfinite(sy) and math.isfinite(sx)):
        raise ValueError(f"scale must be two positive finite numbers (sy, sx), got {scale}")

    boxes = boxes / np.array([sx, sy, sx, sy])
    if orig_size is not None:
        h, w = float(orig_size[0]), float(orig_size[1])
        boxes[:, 0::2] = boxes[:, 0::2].clip(0.0, w)
        boxes[:, 1::2] = boxes[:, 1::2].clip(0.0, h)
    widths = boxes[:, 2] - boxes[:, 0]
    heights = boxes[:, 3] - boxes[:, 1]

    results = []
    for i in range(n):
        if not (widths[i] > 0 and heights[i] > 0):
            continue
        results.append({
            "image_id": int(image_id),
            "category_id": int(label_to_category[int(labels_np[i]) - 1]),
            "bbox": [float(boxes[i, 0]), float(boxes[i, 1]), float(widths[i]), float(heights[i])],
            "score": float(scores_np[i]),
        })
    return results


def _top_per_image(results: list[dict], max_dets: int = MAX_DETS) -> list[dict]:
    """Highest-scoring ``max_dets`` results per image (all classes together), as fresh dicts.

    COCOeval truncates per image *and class*; the usual detector contract (and what published numbers
    assume) is at most 100 detections per image overall. Copies, because loadRes writes ``id``,
    ``area``, ``iscrowd`` and ``segmentation`` into the dicts it is given.
    """
    per_image: dict[int, list[dict]] = defaultdict(list)
    for r in results:
        per_image[r["image_id"]].append(r)
    kept = []
    for img_id in sorted(per_image):
        rs = sorted(per_image[img_id], key=lambda r: -r["score"])[:max_dets]
        kept.extend({"image_id": r["image_id"], "category_id": r["category_id"],
                     "bbox": list(r["bbox"]), "score": r["score"]} for r in rs)
    return kept


def _validate_results(results: list[dict], image_ids: set[int], cat_ids: set[int]) -> None:
    """Fail in one line before pycocotools asserts obscurely or silently scores a mistake as 0."""
    for i, r in enumerate(results):
        missing = {"image_id", "category_id", "bbox", "score"} - set(r)
        if missing:
            raise ValueError(f"result {i} lacks {sorted(missing)}")
        if r["image_id"] not in image_ids:
            raise ValueError(f"result {i} has image_id {r['image_id']} which is not among the evaluated image_ids")
        if r["category_id"] not in cat_ids:
            raise ValueError(f"result {i} has category_id {r['category_id']} which is not a ground-truth category "
                             f"{sorted(cat_ids)} (map model labels through label_to_category)")
        if len(r["bbox"]) != 4:
            raise ValueError(f"result {i} bbox must be [x, y, w, h], got {r['bbox']}")
        if not math.isfinite(float(r["score"])):
            raise ValueError(f"result {i} has non-finite score {r['score']}")


def _empty_results_coco(coco_gt: Any) -> Any:
    """A detections COCO with no annotations, since ``loadRes([])`` raises IndexError."""
    from pycocotools.coco import COCO

    res = COCO()
    res.dataset = {"images": list(coco_gt.dataset.get("images", [])),
                   "categories": list(coco_gt.dataset.get("categories", [])),
                   "annotations": []}
    with contextlib.redirect_stdout(io.StringIO()):
        res.createIndex()
    return res


def _ap(precision: np.ndarray) -> float | None:
    """Mean over the entries pycocotools filled in; None where it marked all -1 (no ground truth)."""
    valid = precision[precision > -1]
    return float(valid.mean()) if valid.size else None


def coco_map(
    coco_gt: Any,
    results: list[dict],
    image_ids: Sequence[int],
    class_names: Sequence[str] | None = None,
) -> dict:
    """COCO box AP/AR of ``results`` on the images ``image_ids`` of ``coco_gt``.

    ``coco_gt`` is a ``pycocotools.coco.COCO`` with its index built; ``results`` are COCO result
    dicts as made by :func:`to_coco_results`. Only ``image_ids`` are evaluated
    (``params.imgIds = sorted(image_ids)``), so ground truth of images outside a subset does not count
    as missed. Each image keeps its 100 highest-scoring results (COCO's default maxDets [1, 10, 100]).
    Results naming an image outside ``image_ids`` or a category not in ``coco_gt`` raise
    ``ValueError``; an empty ``results`` list is scored (every AP 0.0) without pycocotools' loadRes,
    which crashes on it. pycocotools' prints are suppressed.

    Returns a JSON-serialisable dict:

    * ``"mAP"`` (AP@[.5:.95]), ``"AP50"``, ``"AP75"``, ``"AR100"``: floats in 0..1; 0.0 (never -1/NaN)
      when the subset has no ground truth at all.
    * ``"APs"``, ``"APm"``, ``"APl"``: None when the subset has no ground truth of that size
      (pycocotools' -1), so "no such objects" is not mistaken for "all of them missed".
    * ``"per_class_AP"``: {class name: AP@[.5:.95]}, names from ``class_names`` in the order of
      ``sorted(coco_gt.getCatIds())`` (the category names stored in ``coco_gt`` if None); None for a
      class with no ground truth in the subset.
    """
    from pycocotools.cocoeval import COCOeval

    cat_ids = sorted(coco_gt.getCatIds())
    if not cat_ids:
        raise ValueError("coco_gt has no categories")
    if class_names is None:
        names = [coco_gt.cats[c]["name"] for c in cat_ids]
    else:
        names = list(class_names)
        if len(names) != len(cat_ids):
            raise ValueError(f"{len(names)} class_names for {len(cat_ids)} ground-truth categories")
    if len(set(names)) != len(names):
        raise ValueError("class names must be unique (they key per_class_AP)")

    img_ids = sorted({int(i) for i in image_ids})
    if not img_ids:
        # COCOeval reads an empty imgIds as "every image", which would silently evaluate the whole set.
        raise ValueError("image_ids is empty")
    unknown = [i for i in img_ids if i not in coco_gt.imgs]
    if unknown:
        raise ValueError(f"image_ids not in coco_gt: {unknown[:5]}{' ...' if len(unknown) > 5 else ''}")
    _validate_results(results, set(img_ids), set(cat_ids))

    with contextlib.redirect_stdout(io.StringIO()):
        if results:
            coco_dt = coco_gt.loadRes(_top_per_image(results))
        else:
            coco_dt = _empty_results_coco(coco_gt)
        ev = COCOeval(coco_gt, coco_dt, iouType="bbox")
        ev.params.imgIds = img_ids
        ev.params.catIds = cat_ids
        ev.evaluate()
        ev.accumulate()
        ev.summarize()

    stats = [float(s) for s in ev.stats]

    def overall(s: float) -> float:
        return s if s > -1 else 0.0

    def by_size(s: float) -> float | None:
        return s if s > -1 else None

    precision = ev.eval["precision"]  # [T iou, R recall, K class, A area, M maxDets]; area 0 = all, maxDets -1 = 100
    per_class = {name: _ap(precision[:, :, k, 0, -1]) for k, name in enumerate(names)}
    return {
        "mAP": overall(stats[0]),
        "AP50": overall(stats[1]),
        "AP75": overall(stats[2]),
        "APs": by_size(stats[3]),
        "APm": by_size(stats[4]),
        "APl": by_size(stats[5]),
        "AR100": overall(stats[8]),
        "per_class_AP": per_class,
    }
