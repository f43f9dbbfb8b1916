"""``kdcompress visualize predictions|method``: headless PNG figures (paths printed, one per line)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from kdcompress.cli.common import DataName, DataRoot

app = typer.Typer(
    name="visualize",
    help="Headless PNG figures: predictions side by side, and what a distillation method sees.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

Images = Annotated[int, typer.Option("--images", "-n", help="How many validation images (the first N), one figure each.")]
FigOut = Annotated[Optional[Path], typer.Option("--out", "-o", help="Folder for the PNGs (default: the run folder's "
                                                                      "figures/).")]
Split = Annotated[str, typer.Option("--split", help="Dataset split to draw from.")]
VizDevice = Annotated[str, typer.Option("--device", help="cpu (default: reproducible files), auto, cuda or cuda:N.")]


def _print(paths: list[Path]) -> None:
    for p in paths:  # plain lines (no rich wrapping): scripts read them
        typer.echo(str(p))


@app.command("predictions")
def predictions(
    model: Annotated[Optional[list[str]], typer.Option(
        "--model", "-m", help="LABEL=CHECKPOINT (model.pt or run folder), one column each, in order; repeat: "
                              "--model teacher=runs/t/model.pt --model plain=... --model distilled=...")] = None,
    images: Images = 4, out: FigOut = None,
    grid: Annotated[bool, typer.Option("--grid", help="One figure with a row per image (predictions_grid.png).")] = False,
    data: DataName = None, data_root: DataRoot = None, split: Split = "val", device: VizDevice = "cpu",
) -> None:
    """Image, ground truth and each checkpoint's prediction side by side (predictions_000.png, ...)."""
    from kdcompress.visualize import predictions_figures

    _print(predictions_figures(list(model or []), out, images, grid=grid, data=data, data_root=data_root,
                               split=split, device=device))


@app.command("method")
def method(
    run: Annotated[Path, typer.Argument(help="Folder of a `kdcompress distill` run (model.pt, state.pt, config.yaml).")],
    images: Images = 4, out: FigOut = None,
    position: Annotated[Optional[str], typer.Option(
        "--position", help="CanKD: student position Y,X on the tap map whose affinity is shown (default: centre).")] = None,
    tap: Annotated[Optional[str], typer.Option(
        "--tap", help="ACAM-KD / CanKD: which distilled tap to show (default: the first).")] = None,
    teacher: Annotated[Optional[Path], typer.Option(
        "--teacher", "-t", help="Teacher checkpoint (default: the one recorded in the run's config.yaml).")] = None,
    data_root: DataRoot = None, split: Split = "val", device: VizDevice = "cpu",
) -> None:
    """What the distillation method sees: feature energy per tap, and AttnFD gates / ACAM-KD masks / CanKD affinity."""
    from kdcompress.visualize import method_figures, parse_position

    _print(method_figures(run, out, images, position=parse_position(position), tap=tap, teacher=teacher,
                          data_root=data_root, split=split, device=device))
