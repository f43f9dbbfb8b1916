"""Evaluate a saved checkpoint on a dataset, checking that the two belong together."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from kdcompress.data import build_dataset, val_transform
from kdcompress.engine.checkpoint import load_model
from kdcompress.engine.distributed import resolve_device
from kdcompress.engine.evaluate import evaluate_model
from kdcompress.errors import KdError


def checkpoint_dataset(meta: dict[str, Any], source: str, data: str | None, data_root: str | Path | None,
                       split: str, transform: Any) -> Any:
    """The split a checkpoint was trained on (or ``data``): its root and options when it is the same dataset."""
    name = data or meta.get("dataset")
    if not name:
        raise KdError(f"'{source}' does not say which dataset it was trained on; pass --data.")
    same = name == meta.get("dataset")
    root = data_root if data_root is not None else (meta.get("data_root") if same else None)
    options = dict(meta.get("data_options") or {}) if same else {}
    return build_dataset(name, str(root) if root is not None else None, split, transform, **options)


def evaluate_checkpoint(checkpoint: str | Path, data: str | None = None, data_root: str | Path | None = None,
                        split: str = "val", batch_size: int = 8, max_images: int | None = None,
                        device: str = "auto", progress: bool = True, log_every: int = 10) -> dict[str, Any]:
    t0 = time.perf_counter()
    dev = resolve_device(device)
    model, meta = load_model(checkpoint, dev)
    ds = checkpoint_dataset(meta, str(checkpoint), data, data_root, split,
                            val_transform(tuple(meta.get("mean", (0.485, 0.456, 0.406))),
                                          tuple(meta.get("std", (0.229, 0.224, 0.225)))))
    name = data or meta["dataset"]
    if ds.info.num_classes != int(meta["num_classes"]):
        raise KdError(f"'{checkpoint}' predicts {meta['num_classes']} classes but dataset '{name}' has "
                      f"{ds.info.num_classes}. Evaluate it on the dataset it was trained on.")
    res = evaluate_model(model, ds, ds.info.num_classes, ds.info.ignore_index, batch_size, dev, max_images,
                         progress=progress, log_every=log_every)
    n = len(ds) if max_images is None else min(len(ds), max_images)
    return {"checkpoint": str(checkpoint), "arch": meta["arch"], "dataset": name, "split": split, "images": n,
            **res.as_dict(ds.info.class_names), "wall_s": time.perf_counter() - t0}
