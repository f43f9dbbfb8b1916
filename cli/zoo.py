"""``kdcompress models`` and ``kdcompress taps``: what the zoo holds and what each model exposes."""

from __future__ import annotations

from typing import Annotated

import typer

from kdcompress.cli.common import Json, console, parse_size, print_json

NumClasses = Annotated[int, typer.Option("--num-classes", "-k", min=1, help="Classes of the head (21 = VOC, 19 = Cityscapes).")]


def models(num_classes: NumClasses = 21, json_: Json = False) -> None:
    """List the model zoo with parameter counts."""
    from kdcompress.models import zoo_table

    rows = zoo_table(num_classes)
    if json_:
        print_json(rows)
        return
    from rich.table import Table

    table = Table(title=f"kdcompress model zoo ({num_classes} classes)")
    for col in ("model", "params", "output stride", "paper"):
        table.add_column(col, justify="right" if col == "params" else "left")
    for r in rows:
        table.add_row(r["name"], f"{r['params'] / 1e6:.2f} M", str(r["output_stride"]), r["paper"])
    console.print(table)


def taps(
    model: Annotated[str, typer.Argument(help="Model name from `kdcompress models`.")],
    input_size: Annotated[str, typer.Option("--input-size", help="HxW of the dry run.")] = "512x512",
    num_classes: NumClasses = 21, json_: Json = False,
) -> None:
    """Dry run: print every distillation tap of MODEL with its shape and stride (no training)."""
    from kdcompress.models import build_model
    from kdcompress.taps import tap_shapes

    m = build_model(model, num_classes)
    size = parse_size(input_size)
    shapes = tap_shapes(m, size)
    rows = [{"tap": n, "module": t.path, "stride": t.stride, "shape": list(shapes[n]), "note": t.note}
            for n, t in m.taps().items()]
    if json_:
        print_json(rows)
        return
    from rich.table import Table

    table = Table(title=f"{model} taps at {size[0]}x{size[1]}")
    for col in ("tap", "shape (B, C, H, W)", "stride", "module"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["tap"], str(tuple(r["shape"])), str(r["stride"]), r["module"] + (f"  ({r['note']})" if r["note"] else ""))
    console.print(table)
