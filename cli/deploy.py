"""``kdcompress export`` and ``kdcompress profile``: verified artifacts and efficiency tables."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from kdcompress.cli.common import DataRoot, Json, NoProgress, console, parse_size, print_json


def export(
    checkpoint: Annotated[Path, typer.Argument(help="Model checkpoint (model.pt).")],
    to: Annotated[Optional[str], typer.Option("--to", help="Export target (`kdcompress list export-targets`; default onnx).")] = None,
    target: Annotated[Optional[str], typer.Option("--target", help="Deployment preset (profiles/targets): cpu-ort-int8, jetson-orin-fp16, ...")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Artifact path (default beside the checkpoint).")] = None,
    input_size: Annotated[Optional[str], typer.Option("--input-size", help="HxW (default: the training crop).")] = None,
    dynamic_batch: Annotated[Optional[bool], typer.Option("--dynamic-batch/--static-batch")] = None,
    dynamic_spatial: Annotated[Optional[bool], typer.Option("--dynamic-spatial", help="Also make H and W dynamic.")] = None,
    opset: Annotated[Optional[int], typer.Option("--opset", help="ONNX opset (>= 17, default 18).")] = None,
    precision: Annotated[Optional[str], typer.Option("--precision", help="fp32, fp16 or int8 (per target).")] = None,
    max_abs: Annotated[Optional[float], typer.Option("--max-abs", help="Max |logit| difference allowed.")] = None,
    min_argmax: Annotated[Optional[float], typer.Option("--min-argmax", help="Min pixel argmax agreement.")] = None,
    max_drop: Annotated[Optional[float], typer.Option("--max-drop", help="Max drop of the task metric (mIoU, mAP) vs PyTorch (absolute).")] = None,
    verify_images: Annotated[int, typer.Option("--verify-images", help="Val images for tensor parity.")] = 8,
    max_eval_images: Annotated[Optional[int], typer.Option("--max-eval-images", help="Limit the mIoU check.")] = None,
    calib_images: Annotated[Optional[int], typer.Option("--calib-images", help="Training images for INT8 calibration (default 32).")] = None,
    workspace_mb: Annotated[Optional[int], typer.Option("--workspace-mb", help="TensorRT workspace limit (default 4096).")] = None,
    data_root: DataRoot = None, json_: Json = False, no_progress: NoProgress = False,
) -> None:
    """Export a checkpoint and prove the artifact matches PyTorch (tensors and mIoU); no artifact on failure."""
    from kdcompress.config import load_target
    from kdcompress.export import export_checkpoint

    preset = load_target(target) if target else {"export": {}, "tolerances": {}}
    opts = dict(preset["export"])
    explicit = {"to": to, "input_size": parse_size(input_size) if input_size else None, "dynamic_batch": dynamic_batch,
                "dynamic_spatial": dynamic_spatial, "opset": opset, "precision": precision,
                "calib_images": calib_images, "workspace_mb": workspace_mb}
    opts.update({k: v for k, v in explicit.items() if v is not None})
    tol = dict(preset["tolerances"])
    tol.update({k: v for k, v in {"max_abs": max_abs, "min_argmax_agreement": min_argmax,
                                  "max_drop": max_drop}.items() if v is not None})
    res = export_checkpoint(checkpoint, to=opts.pop("to", "onnx"), out_path=out,
                            input_size=tuple(opts.pop("input_size")) if opts.get("input_size") else None,
                            tolerances=tol or None, verify_images=verify_images, max_eval_images=max_eval_images,
                            data_root=data_root, progress=not (no_progress or json_),
                            **{k: v for k, v in opts.items() if k != "input_size"})
    if json_:
        print_json(res.as_dict())
        return
    console.print(f"[green]verified[/] {res.artifact} ({res.precision})  {res.summary}  "
                  f"{res.metric} torch {res.miou_torch:.4f} → artifact {res.miou_artifact:.4f} (drop {res.drop:+.4f})")
    console.print(f"metadata: {res.sidecar}")


def profile(
    targets: Annotated[list[str], typer.Argument(help="Model names, checkpoints (.pt), ONNX files or engines.")],
    target: Annotated[Optional[str], typer.Option("--target", help="Deployment preset supplying backend/device/size.")] = None,
    input_size: Annotated[Optional[str], typer.Option("--input-size", help="HxW (default 800x1088, ACAM-KD Table 7).")] = None,
    batch: Annotated[Optional[int], typer.Option("--batch", "-b", help="Batch size (default 1).")] = None,
    backend: Annotated[Optional[str], typer.Option("--backend", help="Runtime (`kdcompress list runtimes`; default per target).")] = None,
    device: Annotated[Optional[str], typer.Option("--device", help="cpu or cuda (default cpu).")] = None,
    warmup: Annotated[int, typer.Option("--warmup")] = 5,
    iters: Annotated[int, typer.Option("--iters")] = 50,
    num_classes: Annotated[Optional[int], typer.Option("--num-classes", "-k", help="Classes for model-name targets.")] = None,
    threads: Annotated[Optional[int], typer.Option("--threads", help="CPU threads for torch and ORT.")] = None,
    json_: Json = False,
) -> None:
    """Params, FLOPs (GMACs as in the papers), peak memory, latency and FPS, side by side."""
    import kdcompress.export  # noqa: F401  registers the TensorRT backend for .engine targets
    from kdcompress.config import load_target
    from kdcompress.profiling import profile_many, render_table

    opts = dict(load_target(target)["profile"]) if target else {}
    explicit = {"input_size": parse_size(input_size) if input_size else None, "batch": batch, "backend": backend,
                "device": device, "threads": threads}
    opts.update({k: v for k, v in explicit.items() if v is not None})
    opts["input_size"] = tuple(opts.get("input_size", (800, 1088)))
    rows = profile_many(targets, progress=not json_, warmup=warmup, iters=iters, num_classes=num_classes, **opts)
    if json_:
        print_json(rows)
        return
    console.print(render_table(rows))
    env = rows[0].get("env", {}) if rows else {}
    console.print(f"[dim]environment: {env}[/]", highlight=False)
