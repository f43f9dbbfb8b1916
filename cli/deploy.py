"""``kdcompress export`` and ``kdcompress profile``: verified artifacts and efficiency tables."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from kdcompress.cli.common import DataRoot, Json, NoProgress, console, parse_size, print_json


def export(
    checkpoint: Annotated[Path, typer.Argument(help="Model checkpoint (model.pt).")],
    to: Annotated[str, typer.Option("--to", help="onnx, ort-int8 or tensorrt.")] = "onnx",
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Artifact path (default beside the checkpoint).")] = None,
    input_size: Annotated[Optional[str], typer.Option("--input-size", help="HxW (default: the training crop).")] = None,
    dynamic_batch: Annotated[bool, typer.Option("--dynamic-batch/--static-batch")] = True,
    dynamic_spatial: Annotated[bool, typer.Option("--dynamic-spatial", help="Also make H and W dynamic.")] = False,
    opset: Annotated[int, typer.Option("--opset", help="ONNX opset (>= 17).")] = 18,
    precision: Annotated[Optional[str], typer.Option("--precision", help="fp32, fp16 or int8 (per target).")] = None,
    max_abs: Annotated[Optional[float], typer.Option("--max-abs", help="Max |logit| difference allowed.")] = None,
    min_argmax: Annotated[Optional[float], typer.Option("--min-argmax", help="Min pixel argmax agreement.")] = None,
    max_drop: Annotated[Optional[float], typer.Option("--max-drop", help="Max mIoU drop vs PyTorch (absolute).")] = None,
    verify_images: Annotated[int, typer.Option("--verify-images", help="Val images for tensor parity.")] = 8,
    max_eval_images: Annotated[Optional[int], typer.Option("--max-eval-images", help="Limit the mIoU check.")] = None,
    calib_images: Annotated[int, typer.Option("--calib-images", help="Training images for INT8 calibration.")] = 32,
    workspace_mb: Annotated[int, typer.Option("--workspace-mb", help="TensorRT workspace limit.")] = 4096,
    data_root: DataRoot = None, json_: Json = False, no_progress: NoProgress = False,
) -> None:
    """Export a checkpoint and prove the artifact matches PyTorch (tensors and mIoU); no artifact on failure."""
    from kdcompress.export import export_checkpoint

    tol = {k: v for k, v in {"max_abs": max_abs, "min_argmax_agreement": min_argmax, "max_miou_drop": max_drop}.items()
           if v is not None}
    res = export_checkpoint(checkpoint, to=to, out_path=out, input_size=parse_size(input_size) if input_size else None,
                            dynamic_batch=dynamic_batch, dynamic_spatial=dynamic_spatial, opset=opset,
                            precision=precision, tolerances=tol or None, verify_images=verify_images,
                            max_eval_images=max_eval_images, calib_images=calib_images, data_root=data_root,
                            progress=not (no_progress or json_), workspace_mb=workspace_mb)
    if json_:
        print_json(res.as_dict())
        return
    par = res.parity.get("artifact", res.parity)
    console.print(f"[green]verified[/] {res.artifact} ({res.precision})  "
                  f"max|Δ| {par.get('max_abs', float('nan')):.2e}  argmax agreement {par.get('argmax_agreement', float('nan')):.5f}  "
                  f"mIoU torch {res.miou_torch:.4f} → artifact {res.miou_artifact:.4f} (drop {res.drop:+.4f})")
    console.print(f"metadata: {res.sidecar}")


def profile(
    targets: Annotated[list[str], typer.Argument(help="Model names, checkpoints (.pt), ONNX files or engines.")],
    input_size: Annotated[str, typer.Option("--input-size", help="HxW (default 800x1088, ACAM-KD Table 7).")] = "800x1088",
    batch: Annotated[int, typer.Option("--batch", "-b")] = 1,
    backend: Annotated[Optional[str], typer.Option("--backend", help="torch, ort or tensorrt (default per target).")] = None,
    device: Annotated[str, typer.Option("--device", help="cpu or cuda.")] = "cpu",
    warmup: Annotated[int, typer.Option("--warmup")] = 5,
    iters: Annotated[int, typer.Option("--iters")] = 50,
    num_classes: Annotated[Optional[int], typer.Option("--num-classes", "-k", help="Classes for model-name targets.")] = None,
    threads: Annotated[Optional[int], typer.Option("--threads", help="CPU threads for torch and ORT.")] = None,
    json_: Json = False,
) -> None:
    """Params, FLOPs (GMACs as in the papers), peak memory, latency and FPS, side by side."""
    from kdcompress.profiling import profile_many, render_table

    rows = profile_many(targets, input_size=parse_size(input_size), batch=batch, backend=backend, device=device,
                        warmup=warmup, iters=iters, num_classes=num_classes, threads=threads)
    if json_:
        print_json(rows)
        return
    console.print(render_table(rows))
    env = rows[0].get("environment", {}) if rows else {}
    console.print(f"[dim]environment: {env}[/]", highlight=False)
