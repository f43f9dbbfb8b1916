"""Semantic segmentation: cross-entropy, a confusion matrix, logit/argmax parity, mIoU drop."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from kdcompress.errors import ExportError, KdError
from kdcompress.tasks import Metric, Parity, Task, input_dims

#: Relative errors are taken against max|ref| over the compared tensor, floored by this value,
#: so a logit near zero cannot blow the ratio up.
REL_EPS = 1e-6


@dataclass(frozen=True)
class Tolerances:
    """Limits an artifact must meet; ``None`` switches a check off.

    ``max_abs`` is on raw logits (only meaningful for fp32), ``min_argmax_agreement`` is the
    fraction of pixels whose predicted class matches PyTorch, ``max_miou_drop`` is mIoU(torch) -
    mIoU(artifact) on the validation split, in absolute mIoU (0.005 = 0.5 points).
    """

    max_abs: float | None = None
    min_argmax_agreement: float | None = None
    max_miou_drop: float | None = None


#: The single place where segmentation's default parity limits live (per call or target overrides).
DEFAULT_TOLERANCES: dict[str, Tolerances] = {
    "fp32": Tolerances(max_abs=1e-3, min_argmax_agreement=0.999, max_miou_drop=0.005),
    "fp16": Tolerances(max_abs=None, min_argmax_agreement=0.99, max_miou_drop=0.01),
    "int8": Tolerances(max_abs=None, min_argmax_agreement=0.95, max_miou_drop=0.03),
}


def compare_outputs(ref: np.ndarray, out: np.ndarray) -> dict[str, Any]:
    """Worst-case difference of two logit tensors (N x K x H x W).

    ``max_rel`` = max|ref - out| / max(max|ref|, REL_EPS): relative to the largest reference
    logit, not element-wise (element-wise ratios explode where a logit crosses zero).
    ``argmax_agreement`` is the fraction of pixels with the same class over axis 1.
    """
    ref = np.asarray(ref, dtype=np.float32)
    out = np.asarray(out, dtype=np.float32)
    if ref.shape != out.shape:
        raise ExportError(f"output shapes differ: reference {list(ref.shape)} vs artifact {list(out.shape)}. "
                          f"The artifact was exported for another input size or class count.")
    pixels = int(ref.size // max(ref.shape[1], 1)) if ref.ndim >= 2 else int(ref.size)
    if not np.isfinite(out).all():
        bad = int((~np.isfinite(out)).sum())
        return {"max_abs": math.inf, "mean_abs": math.inf, "max_rel": math.inf, "argmax_agreement": 0.0,
                "worst_index": list(np.unravel_index(int(np.argmax(~np.isfinite(out))), out.shape)),
                "nonfinite": bad, "pixels": pixels, "elements": int(ref.size)}
    diff = np.abs(ref - out)
    worst = int(np.argmax(diff)) if diff.size else 0
    max_abs = float(diff.max()) if diff.size else 0.0
    scale = max(float(np.abs(ref).max()) if ref.size else 0.0, REL_EPS)
    if ref.ndim >= 2:
        agree = ref.argmax(1) == out.argmax(1)
        agreement, pixels = float(agree.mean()), int(agree.size)
    else:
        agreement, pixels = float(ref.argmax() == out.argmax()), 1
    return {
        "max_abs": max_abs,
        "mean_abs": float(diff.mean()) if diff.size else 0.0,
        "max_rel": max_abs / scale,
        "argmax_agreement": agreement,
        "worst_index": [int(i) for i in np.unravel_index(worst, diff.shape)] if diff.size else [],
        "nonfinite": 0,
        "pixels": pixels,
        "elements": int(diff.size),
    }


class SegParity(Parity):
    """Worst logit error over all images and the per-pixel argmax agreement."""

    def __init__(self) -> None:
        self.n = 0
        self.max_abs = self.max_rel = self.abs_sum = 0.0
        self.elems = self.agree = self.pixels = 0
        self.worst: dict[str, Any] = {"image": None, "index": []}

    def update(self, ref: np.ndarray, out: np.ndarray) -> None:
        r = compare_outputs(ref, out)
        if r["max_abs"] > self.max_abs or self.worst["image"] is None:
            self.worst = {"image": self.n, "index": r["worst_index"]}
        self.max_abs = max(self.max_abs, r["max_abs"])
        self.max_rel = max(self.max_rel, r["max_rel"])
        self.abs_sum += r["mean_abs"] * r["elements"]
        self.elems += r["elements"]
        self.agree += r["argmax_agreement"] * r["pixels"]
        self.pixels += r["pixels"]
        self.n += int(np.asarray(ref).shape[0])

    def report(self) -> dict[str, Any]:
        return {"images": self.n, "max_abs": self.max_abs, "max_rel": self.max_rel,
                "max_rel_definition": "max|ref-out| / max(max|ref|, 1e-6) per image, worst image",
                "mean_abs": self.abs_sum / max(self.elems, 1),
                "argmax_agreement": self.agree / max(self.pixels, 1), "worst": self.worst}

    @staticmethod
    def summary(report: dict[str, Any]) -> str:
        return (f"max|Δ| {report.get('max_abs', float('nan')):.2e}  "
                f"argmax agreement {report.get('argmax_agreement', float('nan')):.5f}")

    def failures(self, report: dict[str, Any], tolerances: Tolerances) -> list[str]:
        out = []
        if tolerances.max_abs is not None and not report["max_abs"] <= tolerances.max_abs:
            out.append(f"max_abs {report['max_abs']:.3g} > limit {tolerances.max_abs:g}")
        agree = report["argmax_agreement"]
        if tolerances.min_argmax_agreement is not None and not agree >= tolerances.min_argmax_agreement:
            out.append(f"argmax_agreement {agree:.5f} < limit {tolerances.min_argmax_agreement:g}")
        return out


class SegMetric(Metric):
    """A confusion matrix; ``compute`` gives mIoU, aAcc, mAcc and per-class IoU by class name."""

    def __init__(self, num_classes: int, ignore_index: int, class_names: Sequence[str],
                 device: torch.device | str = "cpu") -> None:
        from kdcompress.metrics.segmentation import ConfusionMatrix

        self.cm = ConfusionMatrix(num_classes, ignore_index, device=device)
        self.class_names = list(class_names)

    def update(self, outputs: torch.Tensor | np.ndarray, targets: torch.Tensor) -> None:
        if isinstance(outputs, np.ndarray):
            outputs = torch.from_numpy(outputs.argmax(1))  # indices: a K-times smaller tensor to move
        self.cm.update(outputs.to(self.cm.mat.device), targets.to(self.cm.mat.device))

    def all_reduce(self) -> None:
        self.cm.all_reduce()

    def compute(self) -> dict[str, Any]:
        return self.cm.compute().as_dict(self.class_names)


class SegmentationTask(Task):
    """Per-pixel classification over ``info.num_classes`` classes, ``info.ignore_index`` ignored."""

    name = "segmentation"
    headline = "mIoU"
    report_columns = (("mIoU", "mIoU"), ("aAcc", "aAcc"), ("mAcc", "mAcc"))
    output_names = ("logits",)
    tolerances = DEFAULT_TOLERANCES
    parity_cls = SegParity

    def __init__(self, info: Any) -> None:
        self.num_classes = int(info.num_classes)
        self.ignore_index = int(getattr(info, "ignore_index", 255))
        self.class_names = tuple(info.class_names)

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(outputs, targets, ignore_index=self.ignore_index)

    def collate(self, batch: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        from kdcompress.data import seg_collate

        return seg_collate(batch)

    def metric(self, dataset: Any = None, device: torch.device | str = "cpu") -> SegMetric:
        return SegMetric(self.num_classes, self.ignore_index, self.class_names, device)

    def check_outputs(self, outputs: torch.Tensor | np.ndarray) -> None:
        if outputs.shape[1] != self.num_classes:
            raise KdError(f"Model predicts {outputs.shape[1]} classes but the dataset has {self.num_classes}. "
                          f"Use a checkpoint trained on this dataset.")

    def resize(self, sample: tuple[torch.Tensor, torch.Tensor], size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Image bilinear, labels nearest: torch and the artifact then see the same resized images."""
        img, lab = sample
        if tuple(img.shape[-2:]) == tuple(size):
            return img, lab
        img = F.interpolate(img[None].float(), size=size, mode="bilinear", align_corners=False)[0]
        lab = F.interpolate(lab[None, None].float(), size=size, mode="nearest")[0, 0].long()
        return img, lab

    def io_spec(self, input_size: tuple[int, int], dynamic_batch: bool, dynamic_spatial: bool) -> dict[str, Any]:
        b, hh, ww, axes = input_dims(input_size, dynamic_batch, dynamic_spatial)
        return {
            "input": {"name": "input", "shape": [b, 3, hh, ww], "dtype": "float32", "layout": "NCHW",
                      "meaning": "RGB image normalised exactly like kdcompress's val transform with normalization.mean/std"},
            "output": {"name": "logits", "shape": [b, self.num_classes, hh, ww], "dtype": "float32",
                       "meaning": "per-class logits at input resolution; argmax over axis 1 gives the label map"},
            "dynamic_axes": {"input": dict(axes), "logits": dict(axes)},
        }
