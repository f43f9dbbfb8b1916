"""Evaluation over a whole split: one confusion matrix, sharded across DDP ranks and reduced."""

from __future__ import annotations

from typing import Callable

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from kdcompress.data import seg_collate
from kdcompress.engine.distributed import is_main
from kdcompress.metrics.segmentation import ConfusionMatrix, SegMetrics
from kdcompress.progress import LoopProgress


def _shard(dataset: Dataset, max_images: int | None) -> Dataset:
    n = len(dataset) if max_images is None else min(len(dataset), max_images)
    idx = list(range(n))
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # Strided shards without padding: every image counted exactly once across ranks.
        idx = idx[torch.distributed.get_rank()::torch.distributed.get_world_size()]
    return Subset(dataset, idx)


@torch.no_grad()
def evaluate_predictor(predict: Callable[[torch.Tensor], torch.Tensor], dataset: Dataset, num_classes: int,
                       ignore_index: int = 255, batch_size: int = 8, device: torch.device | str = "cpu",
                       max_images: int | None = None, workers: int = 0, progress: bool = True,
                       description: str = "evaluate", log_every: int = 10) -> SegMetrics:
    """Run ``predict(images) -> logits`` over the split and return metrics of the whole split."""
    loader = DataLoader(_shard(dataset, max_images), batch_size=batch_size, shuffle=False,
                        num_workers=workers, collate_fn=seg_collate)
    cm = ConfusionMatrix(num_classes, ignore_index, device=device)
    with LoopProgress(description, len(loader), enabled=progress and is_main(), every=log_every) as bar:
        for images, labels in loader:
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            logits = predict(images)
            if logits.shape[1] != num_classes:
                from kdcompress.errors import KdError

                raise KdError(f"Model predicts {logits.shape[1]} classes but the dataset has {num_classes}. "
                              f"Use a checkpoint trained on this dataset.")
            cm.update(logits, labels)
            bar.advance()
    cm.all_reduce()
    return cm.compute()


def evaluate_model(model: torch.nn.Module, dataset: Dataset, num_classes: int, ignore_index: int = 255,
                   batch_size: int = 8, device: torch.device | str = "cpu", max_images: int | None = None,
                   workers: int = 0, progress: bool = True, amp: bool = False, log_every: int = 10) -> SegMetrics:
    device = torch.device(device)
    was_training = model.training
    model.eval()

    def predict(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.float16, enabled=amp and device.type == "cuda"):
            return model(x).float()

    try:
        return evaluate_predictor(predict, dataset, num_classes, ignore_index, batch_size, device,
                                  max_images, workers, progress, log_every=log_every)
    finally:
        model.train(was_training)
