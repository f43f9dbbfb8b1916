"""Export a checkpoint to a verified deployable artifact: ONNX fp32, ORT static INT8, TensorRT.

Every artifact is checked against the PyTorch model on real validation images (logit error,
per-pixel argmax agreement, mIoU drop) before it is kept; a failed check deletes it. INT8 and
TensorRT start from the verified fp32 ONNX, which is reused when its sidecar says it was made
from the same checkpoint with the same settings.

Public API: :func:`export_checkpoint` / :class:`ExportResult` (what the CLI calls), plus the
building blocks :func:`export_onnx`, :func:`quantize_int8`, :func:`build_engine`, the runners and
the verification helpers.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdcompress.errors import CheckpointError, ExportError
from kdcompress.engine.checkpoint import sha256_file
from kdcompress.engine.evaluate import Resized, eval_count
from kdcompress.export.job import Backend, ExportJob, ExportResult, _Progress
from kdcompress.export.metadata import read_sidecar, sidecar_path
from kdcompress.export.onnx import DEFAULT_OPSET, check_opset, export_onnx
from kdcompress.export.ort_quant import build_ort_int8, calibration_images, quantize_int8
from kdcompress.export.runners import OrtRunner, Runner, TorchRunner, TrtRunner
from kdcompress.export.tensorrt import _preflight as trt_preflight
from kdcompress.export.tensorrt import build_engine, build_tensorrt
from kdcompress.export.verify import StagedArtifact, check_metric_drop, images_of, metrics_of, resolve_tolerances, verify_against
from kdcompress.registry import Registry
from kdcompress.tasks import Task, task_from_meta

__all__ = [
    "ExportResult", "ExportJob", "Backend", "BACKENDS", "export_checkpoint", "TARGETS", "export_onnx", "quantize_int8", "build_engine",
    "Runner", "TorchRunner", "OrtRunner", "TrtRunner", "verify_against", "metrics_of", "read_sidecar", "sidecar_path",
]

#: Export targets by name: one module each (precisions, default, artifact suffix, builder); a new
#: target is its module plus one line here. Tolerances per precision belong to the task
#: (``kdcompress.tasks``: segmentation's in ``kdcompress/tasks/segmentation.py``).
BACKENDS: Registry[Backend] = Registry("export target")
BACKENDS.add("onnx", Backend("onnx", ("fp32",), "fp32", lambda p: ".onnx"))
BACKENDS.add("ort-int8", Backend("ort-int8", ("int8",), "int8", lambda p: ".int8.onnx", build=build_ort_int8))
BACKENDS.add("tensorrt", Backend("tensorrt", ("fp32", "fp16", "int8"), "fp16", lambda p: f".{p}.engine",
                                 build=build_tensorrt, preflight=trt_preflight))
TARGETS = tuple(BACKENDS.names())
_REQUIRED_META = ("arch", "num_classes", "mean", "std", "dataset")


def _check_meta(ckpt: Path, meta: dict[str, Any], need_input_size: bool) -> None:
    keys = _REQUIRED_META + (("input_size",) if need_input_size else ())
    for key in keys:
        if meta.get(key) in (None, [], ""):
            extra = " or pass --input-size H W" if key == "input_size" else ""
            raise CheckpointError(f"'{ckpt}' metadata lacks '{key}', which export needs. Re-create the checkpoint "
                                  f"with `kdcompress train`/`distill`{extra}.")
    for key in ("mean", "std"):
        if len(meta[key]) != 3:
            raise CheckpointError(f"'{ckpt}' metadata '{key}' must hold 3 values (RGB), got {meta[key]!r}. Re-create the checkpoint.")


def _datasets(meta: dict[str, Any], data_root: str | Path | None, size: tuple[int, int], split: str, task: Task) -> Resized:
    from kdcompress.data import build_dataset

    root = data_root if data_root is not None else meta.get("data_root")
    ds = build_dataset(meta["dataset"], str(root) if root is not None else None, split,
                       task.checkpoint_transform(meta), **dict(meta.get("data_options") or {}))
    k = getattr(getattr(ds, "info", None), "num_classes", None)
    if k is not None and int(k) != int(meta["num_classes"]):
        raise CheckpointError(f"the checkpoint predicts {meta['num_classes']} classes but dataset '{meta['dataset']}' "
                              f"has {k}. Pass the --data-root of the dataset it was trained on.")
    return Resized(ds, task, size)


def _onnx_reusable(path: Path, ckpt_sha: str, size: tuple[int, int], dynamic_batch: bool, dynamic_spatial: bool,
                   opset: int) -> bool:
    """An existing fp32 ONNX can be reused only if its sidecar proves it is this export, verified and untouched."""
    if not path.is_file():
        return False
    try:
        side = read_sidecar(path, required=False)
    except ExportError:
        return False
    if not side:
        return False
    axes = side.get("dynamic_axes", {}).get("input", {})
    return (
        side.get("source_checkpoint", {}).get("sha256") == ckpt_sha
        and side.get("precision") == "fp32" and side.get("kind") == "onnx"
        and side.get("input_size") == [int(size[0]), int(size[1])]
        and side.get("opset") == opset
        and ("0" in axes) == bool(dynamic_batch) and ("2" in axes) == bool(dynamic_spatial)
        and bool(side.get("parity", {}).get("passed"))
        and side.get("artifact_sha256") == sha256_file(path)
    )


def _find_reusable_onnx(default: Path, artifact: Path, ckpt_sha: str, size: tuple[int, int], dynamic_batch: bool,
                        dynamic_spatial: bool, opset: int) -> Path | None:
    """The default fp32 path, else any verified fp32 ``*.onnx`` beside the artifact made from this checkpoint.

    Lets ``--to ort-int8 --out run/student.int8.onnx`` reuse ``run/student.onnx`` exported earlier.
    """
    candidates = [default] + sorted(p for p in artifact.parent.glob("*.onnx") if p not in (default, artifact))
    for cand in candidates:
        if _onnx_reusable(cand, ckpt_sha, size, dynamic_batch, dynamic_spatial, opset):
            return cand
    return None


def _default_paths(ckpt: Path, to: str, precision: str, out_path: str | Path | None) -> tuple[Path, Path]:
    """(artifact, fp32 onnx). The fp32 ONNX sits beside the artifact as ``<ckpt stem>.onnx``."""
    stem = ckpt.stem
    if BACKENDS.get(to).build is None:  # the fp32 ONNX is the artifact
        art = Path(out_path) if out_path else ckpt.with_name(f"{stem}.onnx")
        return art, art
    suffix = BACKENDS.get(to).suffix(precision)
    art = Path(out_path) if out_path else ckpt.with_name(stem + suffix)
    fp32 = art.with_name(f"{stem}.onnx")
    if fp32.resolve() == art.resolve():
        fp32 = art.with_name(f"{stem}.fp32.onnx")
    return art, fp32


def export_checkpoint(
    ckpt_path: str | Path,
    to: str = "onnx",
    out_path: str | Path | None = None,
    input_size: tuple[int, int] | None = None,
    dynamic_batch: bool | None = None,
    dynamic_spatial: bool = False,
    opset: int = DEFAULT_OPSET,
    precision: str | None = None,
    tolerances: Any = None,
    verify_images: int = 8,
    max_eval_images: int | None = None,
    calib_images: int = 32,
    data_root: str | Path | None = None,
    progress: bool = True,
    *,
    workspace_mb: int = 4096,
    timing_cache: str | Path | None = None,
    calib_cache: str | Path | None = None,
    min_shape: tuple[int, int, int, int] | None = None,
    opt_shape: tuple[int, int, int, int] | None = None,
    max_shape: tuple[int, int, int, int] | None = None,
) -> ExportResult:
    """Export ``ckpt_path`` to ``to`` (onnx | ort-int8 | tensorrt), verify it, write it + sidecar.

    Verification runs on the checkpoint's validation split (its dataset, data_root and
    data_options, val transform, images resized to ``input_size``): logits/argmax parity on
    ``verify_images`` evenly spread images, then mIoU of PyTorch and of the artifact on
    ``max_eval_images`` evenly spread images (None = the whole split; the same images and metric
    as ``kdcompress evaluate``). ``tolerances`` (a dict or the task's Tolerances) overrides the
    task's per-precision defaults. INT8 calibrates on ``calib_images`` *training*
    images. Raises KdError subclasses with one-line messages; nothing is left behind on failure.
    """
    backend, precision = _check_request(to, precision, opset, verify_images, max_eval_images, calib_images, calib_cache)
    ckpt = Path(ckpt_path)
    prog = _Progress(progress)
    with prog.stage("load", f"load {ckpt.name}"):
        model, meta, size, task, val = _load(ckpt, input_size, data_root)
    if dynamic_batch is None:
        dynamic_batch = task.dynamic_shapes
    if not task.dynamic_shapes and (dynamic_batch or dynamic_spatial):
        raise ExportError(f"{task.name} graphs are exported with static shapes (post-processing runs per image "
                          f"at the export size); drop --dynamic-batch / --dynamic-spatial.")
    tol = resolve_tolerances(precision, tolerances, task)
    artifact, fp32_path = _default_paths(ckpt, to, precision, out_path)
    torch_ref = TorchRunner(model, "cpu")
    common = dict(meta=meta, input_size=size, dynamic_batch=dynamic_batch, dynamic_spatial=dynamic_spatial,
                  checkpoint=ckpt, checkpoint_sha256=sha256_file(ckpt))
    eval_config = {"dataset": meta["dataset"], "data_root": str(data_root if data_root is not None else meta.get("data_root")),
                   "data_options": dict(meta.get("data_options") or {}), "split": "val", "input_size": list(size),
                   "images": eval_count(val, max_eval_images), "max_eval_images": max_eval_images}
    src = _Source(model, task, val, torch_ref, common, eval_config, size, opset, verify_images, max_eval_images, prog)

    # The fp32 ONNX: the artifact itself, or the verified source of INT8 / TensorRT (reused when it can be).
    found = None if backend.build is None else _find_reusable_onnx(fp32_path, artifact, common["checkpoint_sha256"],
                                                                    size, dynamic_batch, dynamic_spatial, opset)
    if found is not None:
        fp32_path, fp32_parity = found, read_sidecar(found)["parity"]
        prog.note(f"[dim]reusing verified {fp32_path.name} (same checkpoint and settings)[/dim]")
    else:
        fp32_parity = _export_fp32(src, fp32_path, resolve_tolerances("fp32", tolerances if precision == "fp32" else None,
                                                                      task))
    if backend.build is None:
        return _labelled(ExportResult(target=to, precision="fp32", artifact=fp32_path, sidecar=sidecar_path(fp32_path),
                                      parity=fp32_parity, miou_torch=fp32_parity["miou_torch"],
                                      miou_artifact=fp32_parity["miou_artifact"], drop=fp32_parity["miou_drop"],
                                      timings=prog.timings, onnx_fp32=fp32_path, onnx_parity=fp32_parity,
                                      eval_images=fp32_parity["eval_images"]), task)
    miou_torch = fp32_parity.get("miou_torch") if fp32_parity.get("eval_config") == eval_config else None
    if miou_torch is None:  # reused ONNX verified on other images: score PyTorch on these
        with prog.stage("miou_torch", f"{task.headline} PyTorch"):
            miou_torch = metrics_of(torch_ref, val, task, max_eval_images)[task.headline]
    calib: list[Any] = []
    if precision == "int8" and calib_images and calib_images > 0:
        with prog.stage("calibration_data", f"load {calib_images} training images for calibration"):
            calib = calibration_images(_datasets(meta, data_root, size, "train", task), calib_images, size)
    job = ExportJob(target=to, ckpt=ckpt, model=model, meta=meta, task=task, size=size, val=val, torch_ref=torch_ref,
                    precision=precision, tol=tol, artifact=artifact, fp32_path=fp32_path, fp32_parity=fp32_parity,
                    miou_torch=miou_torch, reused=found is not None, prog=prog, common=common, eval_config=eval_config,
                    verify_images=verify_images, max_eval_images=max_eval_images, calib=calib, opset=opset,
                    options={"workspace_mb": workspace_mb, "timing_cache": timing_cache, "calib_cache": calib_cache,
                             "min_shape": min_shape, "opt_shape": opt_shape, "max_shape": max_shape})
    return _labelled(backend.build(job), task)  # type: ignore[misc]  (every target but onnx has a builder)


def _labelled(res: ExportResult, task: Task) -> ExportResult:
    """The task's metric name and parity summary on a result, for reports that name no task."""
    res.metric = task.headline
    res.summary = task.parity_cls.summary(res.parity.get("artifact", res.parity))
    return res


def _check_request(to: str, precision: str | None, opset: int, verify_images: int, max_eval_images: int | None,
                   calib_images: int, calib_cache: str | Path | None) -> tuple[Backend, str]:
    """Every option that needs no file, checked before anything is loaded or written."""
    if to not in BACKENDS:
        raise ExportError(f"Unknown export target '{to}'. Available: {', '.join(TARGETS)}")
    backend = BACKENDS.get(to)
    precision = precision or backend.default_precision
    if precision not in backend.precisions:
        raise ExportError(f"Precision '{precision}' is not available for --to {to}. "
                          f"Available: {', '.join(backend.precisions)}")
    check_opset(opset)
    if verify_images is None or verify_images < 1:
        raise ExportError(f"verify_images must be >= 1 (got {verify_images}): every artifact is checked on real images.")
    if max_eval_images is not None and max_eval_images < 1:
        raise ExportError(f"max_eval_images must be >= 1 or None for the whole split (got {max_eval_images}).")
    if precision == "int8" and (calib_images is None or calib_images < 1) and not (calib_cache and Path(calib_cache).is_file()):
        raise ExportError(f"calibration set is empty: --calib-images must be >= 1 for INT8 (got {calib_images}).")
    if backend.preflight is not None:  # fail before minutes of ONNX export when the machine cannot build it
        backend.preflight()
    return backend, precision


def _load(ckpt: Path, input_size: tuple[int, int] | None,
          data_root: str | Path | None) -> tuple[Any, dict[str, Any], tuple[int, int], Task, Resized]:
    """The model, its metadata, the export size, its task and its validation split at that size."""
    from kdcompress.engine.checkpoint import load_model

    model, meta = load_model(ckpt, "cpu")
    _check_meta(ckpt, meta, need_input_size=input_size is None)
    size = tuple(int(s) for s in (input_size if input_size is not None else meta["input_size"]))
    if len(size) != 2 or min(size) < 1:
        raise ExportError(f"input size must be (H, W) with positive sides, got {input_size or meta['input_size']!r}.")
    check = getattr(model, "check_input_size", None)
    if callable(check):
        check(size)  # KdError naming the multiples that work
    task = task_from_meta(meta)
    model = _exportable(model, task)
    val = _datasets(meta, data_root, size, "val", task)  # type: ignore[arg-type]
    if len(val) == 0:
        raise ExportError(f"the validation split of '{meta['dataset']}' is empty: export cannot be verified. "
                          f"Check --data-root.")
    return model, meta, size, task, val  # type: ignore[return-value]


def _exportable(model: Any, task: Task) -> Any:
    """The module an artifact holds: detectors get a post-processing written for export (static top-k, box
    decoding, ONNX NonMaxSuppression; ``det_postprocess``), whose PyTorch outputs are the reference."""
    if task.name == "detection":
        from kdcompress.export.det_postprocess import ExportableDetector
        from kdcompress.tasks.detection import MAX_DETECTIONS

        return ExportableDetector(model, max_detections=MAX_DETECTIONS).eval()
    return model


@dataclass
class _Source:
    """What the fp32 ONNX export needs of the checked request."""

    model: Any
    task: Task
    val: Resized
    torch_ref: TorchRunner
    common: dict[str, Any]
    eval_config: dict[str, Any]
    size: tuple[int, int]
    opset: int
    verify_images: int
    max_eval_images: int | None
    prog: _Progress


def _export_fp32(src: _Source, fp32_path: Path, tol: Any) -> dict[str, Any]:
    """Export, verify (parity + metric drop) and commit the fp32 ONNX; a failure leaves a previous file untouched."""
    from kdcompress.export.metadata import build_sidecar

    task, val, prog, n = src.task, src.val, src.prog, src.max_eval_images
    with StagedArtifact(fp32_path) as staged:
        with prog.stage("export_onnx", f"export ONNX (opset {src.opset}, dynamo)"):
            export_onnx(src.model, staged.tmp, src.size, dynamic_batch=src.common["dynamic_batch"],
                        dynamic_spatial=src.common["dynamic_spatial"], opset=src.opset,
                        input_names=task.input_names, output_names=task.output_names)
        with OrtRunner(staged.tmp) as ort_fp32:
            with prog.stage("verify_onnx", f"verify ONNX fp32 on {min(src.verify_images, len(val))} val images"):
                parity = verify_against(src.torch_ref, ort_fp32, images_of(val, src.verify_images), tol, task=task)
            with prog.stage("miou_torch", f"{task.headline} PyTorch"):
                ref = metrics_of(src.torch_ref, val, task, n)[task.headline]
            with prog.stage("miou_onnx", f"{task.headline} ONNX fp32"):
                art = metrics_of(ort_fp32, val, task, n)[task.headline]
        drop = check_metric_drop(ref, art, tol, task, f"ONNX fp32 '{fp32_path.name}'")
        parity.update(miou_torch=ref, miou_artifact=art, miou_drop=drop, eval_images=eval_count(val, n),
                      eval_config=src.eval_config, passed=True)
        staged.commit(build_sidecar(staged.tmp, kind="onnx", precision="fp32", opset=src.opset, parity=parity,
                                    **src.common))
    return parity


def _register_tensorrt_runtime() -> None:
    """The ``tensorrt`` runtime of the core's registry (profiling, pipeline); the core never imports export."""
    from kdcompress.runtime import RUNNERS

    if "tensorrt" not in RUNNERS:
        RUNNERS.add("tensorrt", lambda path, device="cuda", threads=None: TrtRunner(path, device))


_register_tensorrt_runtime()
