"""Sidecar JSON beside every exported artifact (``<artifact>.json``).

The metadata lives *beside* the artifact, never inside it: a plain ``.onnx`` or TensorRT plan
stays loadable by stock tools (``trtexec --loadEngine``, Netron, onnxruntime), while a deployer
still finds the class names, the normalisation, the input contract, the versions that built
it and the parity results that were checked before it was written.
"""

from __future__ import annotations

import datetime as _dt
import json
import platform
from pathlib import Path
from typing import Any

from kdcompress.engine.checkpoint import sha256_file
from kdcompress.errors import ExportError
from kdcompress.versions import package_version

SIDECAR_FORMAT = "kdcompress.artifact/1"


def sidecar_path(artifact: str | Path) -> Path:
    """``model.onnx`` -> ``model.onnx.json`` (appending keeps ``model.onnx`` and ``model.engine`` apart)."""
    artifact = Path(artifact)
    return artifact.with_name(artifact.name + ".json")





def versions() -> dict[str, str | None]:
    """Versions that decide whether an artifact is reproducible / loadable elsewhere."""
    import torch

    ort = package_version("onnxruntime") or package_version("onnxruntime-gpu")
    from kdcompress.export.tensorrt import trt_version_installed  # every distribution name (tensorrt, -cu12, -cu13, ...)

    trt = trt_version_installed()
    from kdcompress import __version__ as kd_version

    return {
        "kdcompress": kd_version,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnx": package_version("onnx"),
        "onnxruntime": ort,
        "onnxslim": package_version("onnxslim"),
        "tensorrt": trt,
    }


def build_sidecar(
    artifact: str | Path,
    *,
    kind: str,
    precision: str,
    meta: dict[str, Any],
    input_size: tuple[int, int],
    dynamic_batch: bool,
    dynamic_spatial: bool,
    checkpoint: str | Path | None,
    checkpoint_sha256: str | None,
    opset: int | None = None,
    parity: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Everything a deployer needs to feed the artifact and trust its output."""
    from kdcompress.tasks import task_from_meta

    artifact = Path(artifact)
    task = task_from_meta(meta)
    num_classes = int(meta["num_classes"])
    names = meta.get("class_names") or [str(i) for i in range(num_classes)]
    data: dict[str, Any] = {
        "format": SIDECAR_FORMAT,
        "artifact": artifact.name,
        "artifact_sha256": sha256_file(artifact) if artifact.is_file() else None,
        "kind": kind,
        "task": task.name,
        "precision": precision,
        "opset": opset,
        "arch": meta.get("arch"),
        "num_classes": num_classes,
        "output_stride": meta.get("output_stride"),
        "class_names": list(names),
        "ignore_index": meta.get("ignore_index"),
        "dataset": meta.get("dataset"),
        "input_size": [int(input_size[0]), int(input_size[1])],
        **task.io_spec(input_size, dynamic_batch, dynamic_spatial),
        "normalization": {"mean": list(meta.get("mean") or []), "std": list(meta.get("std") or [])},
        "source_checkpoint": {
            "path": str(Path(checkpoint).resolve()) if checkpoint else None,
            "sha256": checkpoint_sha256,
        },
        "versions": versions(),
        "parity": parity or {},
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    if extra:
        data.update(extra)
    return data


def write_sidecar(artifact: str | Path, data: dict[str, Any]) -> Path:
    """Atomic write: a crash never leaves an artifact with a half-written description."""
    from kdcompress.engine.checkpoint import atomic_write_text

    return atomic_write_text(sidecar_path(artifact), json.dumps(_jsonable(data), indent=2, sort_keys=False) + "\n")


def read_sidecar(artifact: str | Path, required: bool = True) -> dict[str, Any] | None:
    """Parse ``<artifact>.json``; a missing or corrupt file is an ExportError (or None if not required)."""
    path = sidecar_path(artifact)
    if not path.is_file():
        if required:
            raise ExportError(f"'{path}' is missing: artifacts need their sidecar JSON. Re-export with `kdcompress export`.")
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ExportError(f"Sidecar '{path}' is unreadable ({type(e).__name__}). Re-export the artifact.") from e
    if not isinstance(data, dict) or data.get("format") != SIDECAR_FORMAT:
        raise ExportError(f"'{path}' is not a kdcompress sidecar (format {data.get('format') if isinstance(data, dict) else None!r}). Re-export the artifact.")
    return data


def _jsonable(obj: Any) -> Any:
    """numpy scalars, tuples and Paths -> plain JSON types; NaN -> null (JSON has no NaN)."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item") and callable(obj.item) and getattr(obj, "ndim", 1) == 0:
        obj = obj.item()
    if isinstance(obj, float) and obj != obj:
        return None
    return obj
