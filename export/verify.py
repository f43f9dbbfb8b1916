"""Parity checks of an exported artifact against the PyTorch model, on real validation images.

Two questions are asked, because either alone can mislead: are the *outputs* close (the task's
parity: for segmentation logit error and per-pixel argmax agreement; catches wrong graphs,
layouts and normalisation), and is the task's *metric* the same on the validation split (what a
user ships)? The metric comes from the one evaluation path (``kdcompress.engine.evaluate``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch

from kdcompress.engine.evaluate import evaluate, runner_predict, select_indices
from kdcompress.errors import ExportError, KdError


def resolve_tolerances(precision: str, tolerances: Any, task: Any) -> Any:
    """The task's limits for ``precision``; a dict replaces fields, a Tolerances object is used as is."""
    return task.tolerance(precision, tolerances)


def verify_against(ref_runner: Any, runner: Any, images: Iterable[np.ndarray | torch.Tensor], tolerances: Any,
                   *, task: Any, raise_on_failure: bool = True) -> dict[str, Any]:
    """Run both runners on every image; the task aggregates how far the outputs are apart.

    Returns the task's parity report plus ``reference``, ``candidate``, ``tolerances``,
    ``failures`` and ``passed``; with ``raise_on_failure`` a missed limit raises ExportError
    naming the metric, its value and the limit.
    """
    parity = task.parity()
    n = 0
    for img in images:
        batch = img[None] if img.ndim == 3 else img
        parity.update(ref_runner.infer(batch), runner.infer(batch))
        n += batch.shape[0]
    if n == 0:
        raise ExportError("no verification images: the validation split is empty. Check the dataset root/split.")
    report: dict[str, Any] = {"reference": getattr(ref_runner, "name", "reference"),
                              "candidate": getattr(runner, "name", "candidate"), **parity.report(),
                              "tolerances": task.tolerance_dict(tolerances)}
    failures = parity.failures(report, tolerances)
    report["failures"] = failures
    report["passed"] = not failures
    if failures and raise_on_failure:
        raise parity_error(f"{report['candidate']} vs {report['reference']} on {n} validation images", failures, report)
    return report


def check_metric_drop(ref: float, art: float, tolerances: Any, task: Any, what: str = "artifact") -> float:
    """Absolute drop of the task's headline metric; ExportError when above the task's limit."""
    drop = float(ref) - float(art)
    limit = task.metric_drop_limit(tolerances)
    if limit is not None and not drop <= limit:
        raise parity_error(what, [f"{task.headline} drop {drop:.4f} ({ref:.4f} -> {art:.4f}) > limit {limit:g}"],
                           {f"{task.headline}_reference": ref, f"{task.headline}_artifact": art, "drop": drop})
    return drop


def images_of(dataset: Any, n: int | None) -> Iterator[np.ndarray]:
    """Normalised images (1 x 3 x H x W float32) of ``n`` evenly spread samples."""
    for i in select_indices(len(dataset), n):
        img = dataset[i][0]
        yield img[None].numpy().astype(np.float32, copy=False)


def metrics_of(runner: Any, dataset: Any, task: Any, max_images: int | None, batch_size: int = 1,
               description: str = "evaluate") -> dict[str, Any]:
    """The task's metrics of any runner through the one evaluation path (same images as `evaluate`)."""
    try:
        return evaluate(runner_predict(runner), dataset, task, max_images=max_images, batch_size=batch_size,
                        progress=False, description=description)
    except KdError as e:
        if isinstance(e, ExportError):
            raise
        raise ExportError(str(e)) from None


def parity_error(what: str, failures: Sequence[str], report: dict[str, Any]) -> ExportError:
    err = ExportError(f"Verification failed for {what}: {'; '.join(failures)}. The artifact was deleted; "
                      f"loosen the tolerance only if the drop is acceptable, or use a higher precision.")
    err.report = report  # type: ignore[attr-defined]
    return err


class ArtifactGuard:
    """Deletes the listed files if the ``with`` block fails: a failed export leaves nothing behind."""

    def __init__(self, *paths: str | Path) -> None:
        self.paths = [Path(p) for p in paths]

    def __enter__(self) -> "ArtifactGuard":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is not None:
            for p in self.paths:
                Path(p).unlink(missing_ok=True)


class StagedArtifact:
    """Build an artifact in a temp file beside ``dest``; only a verified one replaces ``dest``.

    ``commit(sidecar)`` renames the temp file over ``dest`` and writes its sidecar; a failure in
    the ``with`` block deletes the temp file and leaves the previous artifact and sidecar exactly
    as they were (byte-identical).
    """

    def __init__(self, dest: str | Path) -> None:
        self.dest = Path(dest)
        self.tmp = self.dest.with_name(f".{self.dest.stem}.staging{self.dest.suffix}")
        self.committed = False

    def __enter__(self) -> "StagedArtifact":
        self.dest.parent.mkdir(parents=True, exist_ok=True)
        self.tmp.unlink(missing_ok=True)  # a temp file a killed export left behind
        return self

    def commit(self, sidecar: dict[str, Any]) -> None:
        import os

        from kdcompress.export.metadata import write_sidecar

        sidecar = dict(sidecar, artifact=self.dest.name)
        os.replace(self.tmp, self.dest)
        write_sidecar(self.dest, sidecar)
        self.committed = True

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if not self.committed:
            self.tmp.unlink(missing_ok=True)
