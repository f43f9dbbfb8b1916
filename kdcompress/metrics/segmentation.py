"""Segmentation metrics from one confusion matrix accumulated over the whole split.

Accumulating intersection and union over the split (not averaging per-image IoUs) is the
convention of mmseg and the papers' tables; classes absent from both prediction and ground
truth are left out of the mean (nanmean).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


class ConfusionMatrix:
    """rows = ground truth, columns = prediction; ignore_index pixels are dropped."""

    def __init__(self, num_classes: int, ignore_index: int = 255, device: str | torch.device = "cpu") -> None:
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.mat = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """``pred``: class indices (B,H,W) or logits (B,K,H,W); ``target``: (B,H,W)."""
        if pred.dim() == target.dim() + 1:
            pred = pred.argmax(1)
        keep = target != self.ignore_index
        t = target[keep].to(torch.int64)
        p = pred[keep].to(torch.int64)
        if t.numel() and (int(t.max()) >= self.num_classes or int(t.min()) < 0):
            raise ValueError(f"label value {int(t.max())} outside [0, {self.num_classes})")
        idx = t * self.num_classes + p
        self.mat += torch.bincount(idx, minlength=self.num_classes ** 2).reshape(
            self.num_classes, self.num_classes).to(self.mat.device)

    def all_reduce(self) -> None:
        """Sum the matrix across DDP ranks so every rank reports the metric of the whole split."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(self.mat)

    def compute(self) -> "SegMetrics":
        return SegMetrics.from_matrix(self.mat.cpu())


@dataclass
class SegMetrics:
    miou: float
    aacc: float
    macc: float
    iou: list[float]  # per class, nan where the class never occurs
    acc: list[float]

    @staticmethod
    def from_matrix(mat: torch.Tensor) -> "SegMetrics":
        mat = mat.double()
        tp = mat.diag()
        gt = mat.sum(1)
        pr = mat.sum(0)
        union = gt + pr - tp
        iou = tp / union  # 0/0 -> nan: class absent everywhere
        acc = tp / gt
        total = mat.sum()
        aacc = float(tp.sum() / total) if total > 0 else float("nan")
        return SegMetrics(
            miou=float(torch.nanmean(iou)),
            aacc=aacc,
            macc=float(torch.nanmean(acc)),
            iou=[float(x) for x in iou],
            acc=[float(x) for x in acc],
        )

    def as_dict(self, class_names: list[str] | tuple[str, ...] | None = None) -> dict:
        names = list(class_names) if class_names else [str(i) for i in range(len(self.iou))]
        return {
            "mIoU": self.miou,
            "aAcc": self.aacc,
            "mAcc": self.macc,
            "per_class_iou": {n: (None if v != v else v) for n, v in zip(names, self.iou)},
        }
