"""Parity checks of an exported artifact against the PyTorch model, on real validation images.

Two questions are asked, because either alone can mislead: are the *logits* close (catches
wrong graphs, layouts and normalisation), and is the *segmentation* the same (argmax
agreement per pixel and the mIoU over the validation split, which is what a user ships)?
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from kdcompress.errors import ExportError, KdError

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

    @staticmethod
    def for_precision(precision: str, **overrides: Any) -> "Tolerances":
        """Defaults of :data:`DEFAULT_TOLERANCES` for ``precision``, with keyword overrides."""
        if precision not in DEFAULT_TOLERANCES:
            raise KdError(f"Unknown precision '{precision}'. Available: {', '.join(DEFAULT_TOLERANCES)}")
        base = DEFAULT_TOLERANCES[precision]
        unknown = set(overrides) - set(asdict(base))
        if unknown:
            raise KdError(f"Unknown tolerance '{sorted(unknown)[0]}'. Available: {', '.join(asdict(base))}")
        return replace(base, **overrides)


#: The single place where default parity limits live (override per call or via Tolerances(...)).
DEFAULT_TOLERANCES: dict[str, Tolerances] = {
    "fp32": Tolerances(max_abs=1e-3, min_argmax_agreement=0.999, max_miou_drop=0.005),
    "fp16": Tolerances(max_abs=None, min_argmax_agreement=0.99, max_miou_drop=0.01),
    "int8": Tolerances(max_abs=None, min_argmax_agreement=0.95, max_miou_drop=0.03),
}


def resolve_tolerances(precision: str, tolerances: "Tolerances | dict[str, Any] | None") -> Tolerances:
    """``None`` -> defaults; a dict -> defaults with those fields replaced; a Tolerances -> as is."""
    if tolerances is None:
        return Tolerances.for_precision(precision)
    if isinstance(tolerances, dict):
        return Tolerances.for_precision(precision, **tolerances)
    if isinstance(tolerances, Tolerances):
        return tolerances
    raise KdError(f"tolerances must be a Tolerances or a dict, got {type(tolerances).__name__}.")


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
    if not np.isfinite(out).all():
        bad = int((~np.isfinite(out)).sum())
        return {"max_abs": math.inf, "mean_abs": math.inf, "max_rel": math.inf, "argmax_agreement": 0.0,
                "worst_index": list(np.unravel_index(int(np.argmax(~np.isfinite(out))), out.shape)),
                "nonfinite": bad, "pixels": int(ref.size // max(ref.shape[1], 1)) if ref.ndim >= 2 else int(ref.size),
                "elements": int(ref.size)}
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


def verify_against(ref_runner: Any, runner: Any, images: Iterable[np.ndarray | torch.Tensor],
                   tolerances: Tolerances, raise_on_failure: bool = True) -> dict[str, Any]:
    """Run both runners on every image, aggregate the worst logit error and the pixel agreement.

    Returns ``{"images", "max_abs", "max_rel", "mean_abs", "argmax_agreement", "worst":
    {"image", "index"}, "tolerances", "failures", "passed"}``; with ``raise_on_failure`` a
    failed limit raises ExportError naming the metric, its value and the limit.
    """
    n = 0
    max_abs = max_rel = 0.0
    abs_sum = 0.0
    elems = agree = pixels = 0
    worst: dict[str, Any] = {"image": None, "index": []}
    for img in images:
        batch = img[None] if img.ndim == 3 else img
        r = compare_outputs(ref_runner.infer(batch), runner.infer(batch))
        size, count = r["elements"], r["pixels"]
        if r["max_abs"] > max_abs or worst["image"] is None:
            worst = {"image": n, "index": r["worst_index"]}
        max_abs = max(max_abs, r["max_abs"])
        max_rel = max(max_rel, r["max_rel"])
        abs_sum += r["mean_abs"] * size
        elems += size
        agree += r["argmax_agreement"] * count
        pixels += count
        n += batch.shape[0]
    if n == 0:
        raise ExportError("no verification images: the validation split is empty. Check the dataset root/split.")
    report: dict[str, Any] = {
        "reference": getattr(ref_runner, "name", "reference"),
        "candidate": getattr(runner, "name", "candidate"),
        "images": n,
        "max_abs": max_abs,
        "max_rel": max_rel,
        "max_rel_definition": "max|ref-out| / max(max|ref|, 1e-6) per image, worst image",
        "mean_abs": abs_sum / max(elems, 1),
        "argmax_agreement": agree / max(pixels, 1),
        "worst": worst,
        "tolerances": asdict(tolerances),
    }
    failures = []
    if tolerances.max_abs is not None and not max_abs <= tolerances.max_abs:
        failures.append(f"max_abs {max_abs:.3g} > limit {tolerances.max_abs:g}")
    if tolerances.min_argmax_agreement is not None and not report["argmax_agreement"] >= tolerances.min_argmax_agreement:
        failures.append(f"argmax_agreement {report['argmax_agreement']:.5f} < limit {tolerances.min_argmax_agreement:g}")
    report["failures"] = failures
    report["passed"] = not failures
    if failures and raise_on_failure:
        raise parity_error(f"{report['candidate']} vs {report['reference']} on {n} validation images", failures, report)
    return report


def check_miou_drop(miou_ref: float, miou_art: float, tolerances: Tolerances, what: str = "artifact") -> float:
    """Absolute mIoU drop; ExportError when above ``tolerances.max_miou_drop``."""
    drop = float(miou_ref) - float(miou_art)
    if tolerances.max_miou_drop is not None and not drop <= tolerances.max_miou_drop:
        raise parity_error(what, [f"mIoU drop {drop:.4f} ({miou_ref:.4f} -> {miou_art:.4f}) > limit {tolerances.max_miou_drop:g}"],
                           {"miou_reference": miou_ref, "miou_artifact": miou_art, "drop": drop})
    return drop


def parity_error(what: str, failures: Sequence[str], report: dict[str, Any]) -> ExportError:
    err = ExportError(f"Verification failed for {what}: {'; '.join(failures)}. The artifact was deleted; "
                      f"loosen the tolerance only if the drop is acceptable, or use a higher precision.")
    err.report = report  # type: ignore[attr-defined]
    return err


class ResizedDataset(torch.utils.data.Dataset):
    """Resize normalised images (bilinear) and labels (nearest) to the exported input size.

    Static-shape artifacts only accept their export size; evaluating torch and the artifact on
    the same resized images keeps the comparison fair.
    """

    def __init__(self, dataset: Any, size: tuple[int, int] | None) -> None:
        self.dataset = dataset
        self.size = (int(size[0]), int(size[1])) if size is not None else None
        self.info = getattr(dataset, "info", None)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        img, lab = self.dataset[i]
        if self.size is None or tuple(img.shape[-2:]) == self.size:
            return img, lab
        img = F.interpolate(img[None].float(), size=self.size, mode="bilinear", align_corners=False)[0]
        lab = F.interpolate(lab[None, None].float(), size=self.size, mode="nearest")[0, 0].long()
        return img, lab


def sample_indices(n_total: int, n: int | None) -> list[int]:
    """``n`` indices spread evenly over the split (deterministic; first and last included)."""
    if n is None or n >= n_total:
        return list(range(n_total))
    if n <= 0:
        return []
    return sorted({int(round(i * (n_total - 1) / max(n - 1, 1))) for i in range(n)})


def images_of(dataset: Any, n: int | None) -> Iterator[np.ndarray]:
    """Normalised images (1 x 3 x H x W float32) of ``n`` evenly spread samples."""
    for i in sample_indices(len(dataset), n):
        img, _ = dataset[i]
        yield img[None].numpy().astype(np.float32, copy=False)


def miou_of(runner: Any, dataset: Any, batch_size: int = 1, max_images: int | None = None,
            num_classes: int | None = None, ignore_index: int | None = None) -> Any:
    """SegMetrics of ``runner`` over ``dataset`` (images already normalised, labels H x W).

    Batches are formed only from same-sized images; ``max_images`` evenly spread samples
    (None = the whole split).
    """
    from kdcompress.metrics.segmentation import ConfusionMatrix

    info = getattr(dataset, "info", None)
    k = num_classes if num_classes is not None else getattr(info, "num_classes", None)
    ign = ignore_index if ignore_index is not None else getattr(info, "ignore_index", 255)
    idx = sample_indices(len(dataset), max_images)
    if not idx:
        raise ExportError("cannot compute mIoU: the validation split is empty. Check the dataset root/split.")
    cm = None
    pending: list[tuple[torch.Tensor, torch.Tensor]] = []

    def flush() -> None:
        nonlocal cm
        if not pending:
            return
        imgs = torch.stack([p[0] for p in pending]).numpy().astype(np.float32, copy=False)
        labs = torch.stack([p[1] for p in pending])
        logits = runner.infer(imgs)
        if cm is None:
            cm = ConfusionMatrix(int(k if k is not None else logits.shape[1]), int(ign))
        pred = torch.from_numpy(np.asarray(logits).argmax(1))
        cm.update(pred, labs)
        pending.clear()

    for i in idx:
        img, lab = dataset[i]
        if pending and (tuple(pending[0][0].shape) != tuple(img.shape) or len(pending) >= batch_size):
            flush()
        pending.append((img, lab))
    flush()
    return cm.compute()


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
