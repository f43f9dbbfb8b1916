"""``kdcompress pipeline RECIPE``: the one command CI runs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from kdcompress.cli.common import NoProgress, Out, Sets, console, overrides

RECIPE_HELP = "Built-in recipe name (digits, or any listed by `kdcompress list recipes`) or path to a YAML recipe."


def pipeline(
    recipe: Annotated[str, typer.Argument(help=RECIPE_HELP)] = "digits",
    out: Out = None,
    teacher: Annotated[Optional[Path], typer.Option("--teacher", "-t", help="Use this teacher checkpoint instead of training one.")] = None,
    min_miou: Annotated[Optional[float], typer.Option("--min-miou", help="Gate: distilled student mIoU >= this.")] = None,
    max_export_drop: Annotated[Optional[float], typer.Option("--max-export-drop", help="Gate: mIoU drop of every export <= this.")] = None,
    min_fps: Annotated[Optional[float], typer.Option("--min-fps", help="Gate: FPS of pipeline.gate_artifact >= this.")] = None,
    max_latency_ms: Annotated[Optional[float], typer.Option("--max-latency-ms", help="Gate: median latency <= this.")] = None,
    set_: Sets = None,
    force: Annotated[bool, typer.Option("--force", help="Replace whatever the run folder holds.")] = False,
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted stage from its checkpoint.")] = False,
    no_progress: NoProgress = False,
) -> None:
    """Train teacher (unless given) -> plain + distilled student -> evaluate -> export -> profile -> gates."""
    from kdcompress.config import load_recipe
    from kdcompress.pipeline import run_pipeline

    cfg = load_recipe(recipe, overrides(set_, **{
        "distill.teacher_checkpoint": str(teacher) if teacher else None, "pipeline.min_miou": min_miou,
        "pipeline.max_export_drop": max_export_drop, "pipeline.min_fps": min_fps,
        "pipeline.max_latency_ms": max_latency_ms}))
    out = out or Path("runs") / f"pipeline-{cfg.name}"
    report = run_pipeline(cfg, out, force=force, resume=resume, progress=not no_progress)
    ev, h = report["evaluation"], report["headline"]
    console.print(", ".join(f"{report['labels'][k]} {h} {100 * v[h]:.2f}" for k, v in ev.items()))
    for name, e in report["exports"].items():
        if e.get("drop") is not None:
            console.print(f"{name}: {e['artifact']}  {h} {100 * e['metric_artifact']:.2f} (drop {100 * e['drop']:+.2f})")
    console.print(f"[green]report[/] {out / 'report.md'}  ({report['wall_s']:.0f} s)")
