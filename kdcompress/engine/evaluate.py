"""The one evaluation path: every metric (PyTorch, ONNX, INT8, TensorRT; evaluate, validation during
training, export verification, pipeline gates, report) is computed by :func:`evaluate`.

Same image selection everywhere (:func:`select_indices`: ``max_images`` spread evenly over the
split), same batching (consecutive images of one size, never padded, so a static-shape artifact and
PyTorch see identical inputs), same accumulator (the task's metric). Sharded across DDP ranks and
reduced, so every rank reports the metric of the whole selection.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from kdcompress.engine.distributed import is_main
from kdcompress.errors import KdError
from kdcompress.progress import LoopProgress


def select_indices(n_total: int, n: int | None) -> list[int]:
    """``n`` indices spread evenly over the split (deterministic; first and last included)."""
    if n is None or n >= n_total:
        return list(range(n_total))
    if n <= 0:
        return []
    return sorted({int(round(i * (n_total - 1) / max(n - 1, 1))) for i in range(n)})


def eval_count(dataset: Any, max_images: int | None) -> int:
    """How many images a metric is computed on (``None``: the whole split)."""
    return len(select_indices(len(dataset), max_images))


class Resized(Dataset):
    """A split at a static export size; the task moves the targets with the image."""

    def __init__(self, dataset: Any, task: Any, size: tuple[int, int] | None) -> None:
        self.dataset, self.task = dataset, task
        self.size = (int(size[0]), int(size[1])) if size is not None else None
        self.info = getattr(dataset, "info", None)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> Any:
        sample = self.dataset[i]
        return sample if self.size is None else self.task.resize(sample, self.size)


def batches(dataset: Any, indices: Sequence[int], batch_size: int,
            collate: Callable[[list[Any]], Any]) -> Iterator[tuple[int, Any]]:
    """``(count, collated batch)`` of consecutive same-size samples, at most ``batch_size`` each."""
    pending: list[Any] = []
    for i in indices:
        sample = dataset[i]
        if pending and (tuple(pending[0][0].shape) != tuple(sample[0].shape) or len(pending) >= batch_size):
            yield len(pending), collate(pending)
            pending = []
        pending.append(sample)
    if pending:
        yield len(pending), collate(pending)


def model_predict(model: torch.nn.Module, task: Any, device: torch.device | str,
                  amp: bool = False) -> Callable[[Any], Any]:
    """``images -> outputs`` of an eager model (fp16 autocast on CUDA when ``amp``), as the task reads them."""
    device = torch.device(device)

    def predict(images: Any) -> Any:
        images = images.to(device, non_blocking=True) if isinstance(images, torch.Tensor) else \
            [im.to(device, non_blocking=True) for im in images]
        with torch.autocast(device.type, dtype=torch.float16, enabled=amp and device.type == "cuda"):
            return task.predict(model, images)

    return predict


def runner_predict(runner: Any) -> Callable[[torch.Tensor], np.ndarray]:
    """``images -> outputs`` of any runtime Runner (PyTorch, ONNX Runtime, TensorRT)."""
    return lambda images: runner.infer(images.numpy().astype(np.float32, copy=False))


@torch.no_grad()
def evaluate(predict: Callable[[torch.Tensor], Any], dataset: Any, task: Any, *, max_images: int | None = None,
             batch_size: int = 8, device: torch.device | str = "cpu", progress: bool = True,
             description: str = "evaluate", log_every: int = 10) -> dict[str, Any]:
    """The task's metrics of ``predict`` over ``max_images`` evenly spread images (+ ``"images"``)."""
    if batch_size < 1:
        raise KdError(f"evaluation batch size must be >= 1, got {batch_size}.")
    idx = select_indices(len(dataset), max_images)
    if not idx:
        raise KdError("cannot evaluate: the split is empty. Check the dataset root and split.")
    count = len(idx)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # Strided shards without padding: every image counted exactly once across ranks.
        idx = idx[torch.distributed.get_rank()::torch.distributed.get_world_size()]
    metric = task.metric(dataset, device)
    with LoopProgress(description, len(idx), enabled=progress and is_main(), every=log_every, unit="image") as bar:
        for n, (images, targets) in batches(dataset, idx, batch_size, task.collate):
            outputs = predict(images)
            task.check_outputs(outputs)
            metric.update(outputs, targets)
            bar.advance(n)
    metric.all_reduce()
    return {**metric.compute(), "images": count}


def evaluate_model(model: torch.nn.Module, dataset: Any, task: Any, *, batch_size: int = 8,
                   device: torch.device | str = "cpu", max_images: int | None = None, progress: bool = True,
                   amp: bool = False, log_every: int = 10, description: str = "evaluate") -> dict[str, Any]:
    """:func:`evaluate` of an eager model (eval mode for the call, training mode restored)."""
    was_training = model.training
    model.eval()
    try:
        return evaluate(model_predict(model, task, device, amp), dataset, task, max_images=max_images,
                        batch_size=batch_size, device=device, progress=progress, description=description,
                        log_every=log_every)
    finally:
        model.train(was_training)
