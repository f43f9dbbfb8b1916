"""``kdcompress evaluate``: checkpoint + dataset -> the task's metrics (segmentation: mIoU, pixel accuracy,
mean class accuracy, per-class IoU; detection: COCO AP, AP50, AP75, APs/m/l, per-class AP)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from kdcompress.cli.common import DataName, DataRoot, Device, Json, NoProgress, console, print_json


def evaluate(
    checkpoint: Annotated[Path, typer.Argument(help="Model checkpoint (model.pt) from train or distill.")],
    data: DataName = None, data_root: DataRoot = None,
    split: Annotated[str, typer.Option("--split", help="Dataset split to evaluate.")] = "val",
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", min=1)] = 8,
    max_images: Annotated[Optional[int], typer.Option("--max-images", min=1, help="Evaluate N images spread evenly over the split (the same ones export verification uses).")] = None,
    device: Device = None, json_: Json = False, no_progress: NoProgress = False,
    log_every: Annotated[int, typer.Option("--log-every", min=1, help="Plain progress line every N images when "
                                           "output is not a terminal.")] = 10,
) -> None:
    """Evaluate a checkpoint on a dataset split (defaults: the dataset it was trained on)."""
    from kdcompress.engine.evaluation import evaluate_checkpoint

    if checkpoint.is_dir() and (checkpoint / "model.pt").is_file():  # a run folder: its model
        checkpoint = checkpoint / "model.pt"
    report = evaluate_checkpoint(checkpoint, data=data, data_root=data_root, split=split, batch_size=batch_size,
                                 max_images=max_images, device=device or "auto", progress=not (no_progress or json_), log_every=log_every)
    if json_:
        print_json(report)
        return
    from rich.table import Table

    from kdcompress.tasks import TASKS

    per_class = [(k, col) for k, col in (("per_class_iou", "IoU"), ("per_class_AP", "AP")) if report.get(k)]
    for key, col in per_class:
        table = Table(title=f"{report['arch']} on {report['dataset']}/{report['split']} ({report['images']} images)")
        table.add_column("class")
        table.add_column(col, justify="right")
        for name, value in report[key].items():
            table.add_row(name, "n/a" if value is None else f"{100 * value:.2f}")
        console.print(table)
    task = TASKS.get(report["task"])
    console.print("  ".join((f"{col} [bold]{100 * report[key]:.2f}[/]" if key == task.headline
                             else f"{col} {100 * report[key]:.2f}") for key, col in task.report_columns)
                  + f"  ({report['images']} images, {report['wall_s']:.1f} s)")
