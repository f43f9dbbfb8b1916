"""``kdcompress models`` and ``kdcompress taps``: what the zoo holds and what each model exposes."""

from __future__ import annotations

from typing import Annotated

import typer

from kdcompress.cli.common import Json, console, parse_size, print_json

NumClasses = Annotated[int, typer.Option("--num-classes", "-k", min=1, help="Classes of the head (21 = VOC, 19 = Cityscapes).")]
DetClasses = Annotated[int, typer.Option("--det-classes", min=2, help="Detector classes incl. background (81 = COCO).")]


def models(num_classes: NumClasses = 21, det_classes: DetClasses = 81, json_: Json = False) -> None:
    """List the model zoo (segmentation and detection) with parameter counts."""
    from kdcompress.models import zoo_table

    rows = zoo_table(num_classes, det_classes)
    if json_:
        print_json(rows)
        return
    from rich.table import Table

    table = Table(title=f"kdcompress model zoo (segmentation: {num_classes} classes, detection: {det_classes})")
    for col in ("model", "task", "params", "output stride", "paper"):
        table.add_column(col, justify="right" if col == "params" else "left")
    for r in rows:
        table.add_row(r["name"], r["task"], f"{r['params'] / 1e6:.2f} M", str(r["output_stride"] or "FPN"), r["paper"])
    console.print(table)


def taps(
    model: Annotated[str, typer.Argument(help="Model name from `kdcompress models`.")],
    input_size: Annotated[str, typer.Option("--input-size", help="HxW of the dry run.")] = "512x512",
    num_classes: NumClasses = 21, json_: Json = False,
) -> None:
    """Dry run: print every distillation tap of MODEL with its shape and stride (no training)."""
    from kdcompress.models import build_model
    from kdcompress.taps import tap_shapes

    from kdcompress.models import task_of

    m = build_model(model, num_classes if task_of(model) == "segmentation" else max(num_classes, 2))
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


def registry_lists() -> dict[str, list[str]]:
    """Every plug-in list, read from its registry (the one place each is defined)."""
    import kdcompress.export  # noqa: F401  registers the TensorRT runtime
    from kdcompress.config import list_presets
    from kdcompress.data import DATASETS
    from kdcompress.export import TARGETS as EXPORT_TARGETS
    from kdcompress.methods import METHODS
    from kdcompress.models import MODELS
    from kdcompress.runtime import RUNNERS
    from kdcompress.tasks import TASKS

    return {"tasks": TASKS.names(), "methods": METHODS.names(), "models": MODELS.names(), "datasets": DATASETS.names(),
            "export-targets": list(EXPORT_TARGETS), "runtimes": ["torch", *RUNNERS.names()],
            "recipes": list_presets("recipes"), "targets": list_presets("targets")}


def list_(
    kind: Annotated[str, typer.Argument(help="tasks, methods, models, datasets, export-targets, runtimes, recipes, "
                                             "targets or all.")] = "all",
    json_: Json = False,
) -> None:
    """What can be named on the command line, read from the registries."""
    from kdcompress.errors import ConfigError

    lists = registry_lists()
    if kind != "all" and kind not in lists:
        raise ConfigError(f"Unknown list '{kind}'. Choose one of: {', '.join(lists)} or all.")
    chosen = lists if kind == "all" else {kind: lists[kind]}
    if json_:
        print_json(chosen)
        return
    for name, items in chosen.items():
        console.print(f"[bold]{name}[/]: {', '.join(items)}", highlight=False)
