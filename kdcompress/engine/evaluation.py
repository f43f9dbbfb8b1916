"""Evaluate a saved checkpoint on a dataset, checking that the two belong together."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from kdcompress.data import build_dataset, dataset_info
from kdcompress.engine.checkpoint import load_model
from kdcompress.engine.distributed import resolve_device
from kdcompress.engine.evaluate import evaluate_model
from kdcompress.errors import KdError
from kdcompress.tasks import task_for, task_from_meta


def checkpoint_dataset(meta: dict[str, Any], source: str, data: str | None, data_root: str | Path | None,
                       split: str, transform: Any) -> Any:
    """The split a checkpoint was trained on (or ``data``): its root and options when it is the same dataset."""
    name = data or meta.get("dataset")
    if not name:
        raise KdError(f"'{source}' does not say which dataset it was trained on; pass --data.")
    same = name == meta.get("dataset")
    root = data_root if data_root is not None else (meta.get("data_root") if same else None)
    options = dict(meta.get("data_options") or {}) if same else {}
    info = dataset_info(name, **options)
    ckpt_task = meta.get("task", "segmentation")
    if info.task != ckpt_task:  # before building: the transforms of one task cannot read the other's samples
        raise KdError(f"'{source}' is a {ckpt_task} checkpoint but dataset '{name}' is a {info.task} dataset. "
                      f"Use a {ckpt_task} dataset (kdcompress list datasets).")
    if transform is None:
        transform = task_from_meta(meta).checkpoint_transform(meta)
    return build_dataset(name, str(root) if root is not None else None, split, transform, **options)


def evaluate_checkpoint(checkpoint: str | Path, data: str | None = None, data_root: str | Path | None = None,
                        split: str = "val", batch_size: int = 8, max_images: int | None = None,
                        device: str = "auto", progress: bool = True, log_every: int = 10) -> dict[str, Any]:
    """The task's metrics of a checkpoint on ``max_images`` evenly spread images of ``split``."""
    t0 = time.perf_counter()
    dev = resolve_device(device)
    model, meta = load_model(checkpoint, dev)
    ds = checkpoint_dataset(meta, str(checkpoint), data, data_root, split, None)
    name = data or meta["dataset"]
    if ds.info.num_classes != int(meta["num_classes"]):
        raise KdError(f"'{checkpoint}' predicts {meta['num_classes']} classes but dataset '{name}' has "
                      f"{ds.info.num_classes}. Evaluate it on the dataset it was trained on.")
    task = task_for(ds.info)
    res = evaluate_model(model, ds, task, batch_size=batch_size, device=dev, max_images=max_images,
                         progress=progress, log_every=log_every)
    return {"checkpoint": str(checkpoint), "arch": meta["arch"], "task": task.name, "dataset": name,
            "split": split, **res, "wall_s": time.perf_counter() - t0}
