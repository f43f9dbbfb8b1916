"""Object detection: torchvision's own losses, COCO mAP (pycocotools), box-level parity, mAP drop.

Labels inside kdcompress are contiguous (1..K, 0 = background); the dataset's own COCO category ids
(``DatasetInfo.category_ids``) are restored only when results are handed to pycocotools, and boxes
are mapped back to original-image pixels there (``target["scale"]``), so mAP is COCO's.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from kdcompress.errors import KdError
from kdcompress.tasks import Metric, Parity, Task, input_dims

#: Detections per image, as COCO's maxDets and torchvision's ``detections_per_img``.
MAX_DETECTIONS = 100
#: Reference detections below this score are not required to reappear in an artifact's output
#: (near-threshold boxes flip in and out with any numeric change, mAP barely sees them).
PARITY_MIN_SCORE = 0.3
PARITY_MIN_IOU = 0.9


@dataclass(frozen=True)
class DetTolerances:
    """``min_box_match``: share of reference boxes (score >= 0.3) that the artifact reproduces with the
    same label at IoU >= 0.9; ``max_score_diff`` on those matches; ``max_map_drop`` = mAP(torch) -
    mAP(artifact) in absolute mAP (0.005 = 0.5 points). ``None`` switches a check off."""

    min_box_match: float | None = None
    max_score_diff: float | None = None
    max_map_drop: float | None = None


DEFAULT_TOLERANCES: dict[str, DetTolerances] = {
    "fp32": DetTolerances(min_box_match=0.99, max_score_diff=1e-3, max_map_drop=0.005),
    "fp16": DetTolerances(min_box_match=0.95, max_score_diff=None, max_map_drop=0.01),
    "int8": DetTolerances(min_box_match=None, max_score_diff=None, max_map_drop=0.03),
}


def as_detections(outputs: Any) -> list[dict[str, np.ndarray]]:
    """Per-image ``{boxes [N,4] xyxy, scores [N], labels [N]}`` from an eager model's list of dicts or an
    exported graph's fixed-size ``(boxes [B,D,4], scores [B,D], labels [B,D], num_detections [B])``."""
    def np_(x: Any) -> np.ndarray:
        return x.detach().float().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)

    if isinstance(outputs, (list, tuple)) and outputs and isinstance(outputs[0], dict):
        return [{"boxes": np_(o["boxes"]).reshape(-1, 4), "scores": np_(o["scores"]).reshape(-1),
                 "labels": np_(o["labels"]).astype(np.int64).reshape(-1)} for o in outputs]
    if isinstance(outputs, (list, tuple)) and len(outputs) == 4:
        boxes, scores, labels, num = (np_(x) for x in outputs)
        return [{"boxes": boxes[i, :int(num[i])].reshape(-1, 4), "scores": scores[i, :int(num[i])],
                 "labels": labels[i, :int(num[i])].astype(np.int64)} for i in range(boxes.shape[0])]
    if isinstance(outputs, (list, tuple)) and not outputs:
        return []
    raise KdError("detection outputs must be a list of {boxes, scores, labels} dicts or "
                  "(boxes, scores, labels, num_detections) arrays.")


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix of xyxy boxes [N,4] x [M,4]."""
    if not len(a) or not len(b):
        return np.zeros((len(a), len(b)), dtype=np.float64)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(-1)
    area_a = np.clip(a[:, 2:] - a[:, :2], 0, None).prod(-1)
    area_b = np.clip(b[:, 2:] - b[:, :2], 0, None).prod(-1)
    return inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-12)


class DetParity(Parity):
    """Greedy box matching per image: each confident reference box must reappear (same label, IoU >= 0.9)."""

    def __init__(self) -> None:
        self.n = self.ref_boxes = self.matched = 0
        self.max_score_diff = self.max_box_diff = 0.0
        self.count_diff = 0

    def update(self, ref: Any, out: Any) -> None:
        for r, o in zip(as_detections(ref), as_detections(out)):
            self.n += 1
            keep = r["scores"] >= PARITY_MIN_SCORE
            rb, rs, rl = r["boxes"][keep], r["scores"][keep], r["labels"][keep]
            iou = box_iou(rb, o["boxes"])
            used = np.zeros(len(o["boxes"]), dtype=bool)
            for i in np.argsort(-rs):
                cand = np.where((o["labels"] == rl[i]) & ~used & (iou[i] >= PARITY_MIN_IOU))[0] if iou.size else []
                if len(cand):
                    j = cand[np.argmax(iou[i, cand])]
                    used[j] = True
                    self.matched += 1
                    self.max_score_diff = max(self.max_score_diff, float(abs(rs[i] - o["scores"][j])))
                    self.max_box_diff = max(self.max_box_diff, float(np.abs(rb[i] - o["boxes"][j]).max()))
            self.ref_boxes += int(keep.sum())
            self.count_diff = max(self.count_diff, abs(len(r["boxes"]) - len(o["boxes"])))

    def report(self) -> dict[str, Any]:
        return {"images": self.n, "reference_boxes": self.ref_boxes, "matched": self.matched,
                "box_match": self.matched / self.ref_boxes if self.ref_boxes else 1.0,
                "match_definition": f"reference boxes with score >= {PARITY_MIN_SCORE} reproduced with the same "
                                    f"label at IoU >= {PARITY_MIN_IOU}",
                "max_score_diff": self.max_score_diff, "max_box_diff_px": self.max_box_diff,
                "max_count_diff": self.count_diff}

    @staticmethod
    def summary(report: dict[str, Any]) -> str:
        return (f"boxes matched {report.get('matched', 0)}/{report.get('reference_boxes', 0)} "
                f"({report.get('box_match', float('nan')):.4f})  max score Δ {report.get('max_score_diff', float('nan')):.2e}"
                f"  max box Δ {report.get('max_box_diff_px', float('nan')):.2e} px")

    def failures(self, report: dict[str, Any], tolerances: DetTolerances) -> list[str]:
        out = []
        if tolerances.min_box_match is not None and not report["box_match"] >= tolerances.min_box_match:
            out.append(f"box_match {report['box_match']:.4f} < limit {tolerances.min_box_match:g}")
        if tolerances.max_score_diff is not None and not report["max_score_diff"] <= tolerances.max_score_diff:
            out.append(f"max_score_diff {report['max_score_diff']:.3g} > limit {tolerances.max_score_diff:g}")
        return out


class DetMetric(Metric):
    """Collects COCO results (original pixels, dataset category ids) and scores them with pycocotools."""

    def __init__(self, coco_gt: Any, category_ids: Sequence[int], class_names: Sequence[str]) -> None:
        self.coco_gt, self.category_ids, self.class_names = coco_gt, list(category_ids), list(class_names)
        self.results: list[dict[str, Any]] = []
        self.image_ids: list[int] = []

    def update(self, outputs: Any, targets: Sequence[dict[str, Any]]) -> None:
        from kdcompress.metrics.detection import to_coco_results

        for det, t in zip(as_detections(outputs), targets):
            image_id = int(t["image_id"])
            self.image_ids.append(image_id)
            self.results += to_coco_results(image_id, det["boxes"], det["scores"], det["labels"], self.category_ids,
                                            scale=tuple(float(s) for s in t["scale"]),
                                            orig_size=tuple(int(s) for s in t["orig_size"]))

    def all_reduce(self) -> None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered: list[Any] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, (self.results, self.image_ids))
            self.results = [r for res, _ in gathered for r in res]
            self.image_ids = [i for _, ids in gathered for i in ids]

    def compute(self) -> dict[str, Any]:
        from kdcompress.metrics.detection import coco_map

        return coco_map(self.coco_gt, self.results, self.image_ids, self.class_names)


class DetectionTask(Task):
    """Boxes of ``info.num_classes - 1`` object classes (label 0 = background); mAP as COCO computes it."""

    name = "detection"
    headline = "mAP"
    report_columns = (("mAP", "mAP"), ("AP50", "AP50"), ("AP75", "AP75"))
    output_names = ("boxes", "scores", "labels", "num_detections")
    tolerances = DEFAULT_TOLERANCES
    parity_cls = DetParity
    dynamic_shapes = False  # anchors, static top-k and the per-image NMS loop are fixed by the export size
    int8_op_types = ("Conv", "Gemm", "MatMul")  # backbone, FPN and heads; post-processing stays fp32

    def __init__(self, info: Any) -> None:
        self.num_classes = int(info.num_classes)
        self.class_names = tuple(info.class_names)
        ids = getattr(info, "category_ids", None)
        self.category_ids = tuple(ids) if ids else tuple(range(1, self.num_classes))

    def loss(self, outputs: dict[str, torch.Tensor], targets: Any) -> torch.Tensor:
        """torchvision's loss dict (classification, box regression, centerness / RPN terms), summed."""
        return sum(outputs.values())  # type: ignore[return-value]

    def training_loss(self, model: Any, images: Any, targets: Any) -> torch.Tensor:
        return self.loss(model(images, targets), targets)

    def features(self, model: Any, images: Any) -> Any:
        inner = getattr(model, "module", model)
        return inner.features(images)

    def predict(self, model: Any, images: Any) -> Any:
        return model(images)

    def train_transform(self, data: Any) -> Any:
        from kdcompress.data.detection import DetTransform

        low, high = self._sizes(data)
        return DetTransform(low, high, tuple(data.scale_range), bool(data.flip))

    def val_transform(self, data: Any = None, mean: Sequence[float] | None = None,
                      std: Sequence[float] | None = None) -> Any:
        from kdcompress.data import IMAGENET_MEAN, IMAGENET_STD
        from kdcompress.data.detection import DetTransform

        low, high = self._sizes(data)
        return DetTransform(low, high, mean=tuple(mean or IMAGENET_MEAN), std=tuple(std or IMAGENET_STD))

    @staticmethod
    def _sizes(data: Any) -> tuple[int, int]:
        """(shorter side, longer-side cap) of ``data.resize``; the crop size's sides when unset."""
        resize = getattr(data, "resize", None) or list(getattr(data, "crop_size", None) or (800, 1333))
        return int(min(resize)), int(max(resize))

    def export_size(self, data: Any) -> tuple[int, int]:
        low, high = self._sizes(data)
        m = 32
        return -(-low // m) * m, -(-high // m) * m

    def checkpoint_transform(self, meta: dict[str, Any]) -> Any:
        return self.val_transform(SimpleNamespace(resize=meta.get("resize") or meta.get("input_size")),
                                  meta.get("mean"), meta.get("std"))

    def collate(self, batch: Sequence[Any]) -> tuple[torch.Tensor, list[dict[str, Any]]]:
        from kdcompress.data.detection import det_collate

        return det_collate(batch)

    def targets_to(self, targets: Any, device: torch.device | str) -> Any:
        return [{k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in t.items()}
                for t in targets]

    def metric(self, dataset: Any = None, device: torch.device | str = "cpu") -> DetMetric:
        coco = getattr(dataset, "coco", None) or getattr(getattr(dataset, "dataset", None), "coco", None)
        if coco is None:
            raise KdError("mAP needs the dataset's COCO ground truth; evaluate on a detection dataset.")
        return DetMetric(coco, self.category_ids, self.class_names[1:])

    def check_outputs(self, outputs: Any) -> None:
        for det in as_detections(outputs):
            labels = det["labels"]
            if len(labels) and (labels.min() < 1 or labels.max() >= self.num_classes):
                raise KdError(f"Model predicts labels up to {int(labels.max())} but the dataset has "
                              f"{self.num_classes - 1} classes. Use a checkpoint trained on this dataset.")

    def resize(self, sample: tuple[torch.Tensor, dict[str, Any]], size: tuple[int, int]) -> tuple[torch.Tensor, Any]:
        """The image stretched to a static export size; boxes and ``scale`` follow, so mAP stays in original pixels."""
        img, target = sample
        h, w = img.shape[-2:]
        if (h, w) == tuple(size):
            return img, target
        sy, sx = size[0] / h, size[1] / w
        img = F.interpolate(img[None].float(), size=size, mode="bilinear", align_corners=False)[0]
        target = dict(target)
        target["boxes"] = target["boxes"] * torch.tensor([sx, sy, sx, sy], dtype=target["boxes"].dtype)
        old = target.get("scale", (1.0, 1.0))
        target["scale"] = (float(old[0]) * sy, float(old[1]) * sx)
        return img, target

    def io_spec(self, input_size: tuple[int, int], dynamic_batch: bool, dynamic_spatial: bool) -> dict[str, Any]:
        b, hh, ww, axes_in = input_dims(input_size, dynamic_batch, dynamic_spatial)
        d = MAX_DETECTIONS
        axes_out = {"0": "batch"} if dynamic_batch else {}
        return {
            "input": {"name": "input", "shape": [b, 3, hh, ww], "dtype": "float32", "layout": "NCHW",
                      "meaning": "RGB image resized and normalised exactly like kdcompress's detection val transform"},
            "outputs": {
                "boxes": {"shape": [b, d, 4], "dtype": "float32", "meaning": "x1, y1, x2, y2 in input pixels"},
                "scores": {"shape": [b, d], "dtype": "float32", "meaning": "confidence, descending"},
                "labels": {"shape": [b, d], "dtype": "int64",
                           "meaning": "contiguous class 1..K; category_ids[label-1] is the dataset's id"},
                "num_detections": {"shape": [b], "dtype": "int64", "meaning": "valid rows; the rest are padding"},
            },
            "category_ids": list(self.category_ids),
            "dynamic_axes": {"input": axes_in, **{k: dict(axes_out) for k in self.output_names}},
        }
