"""``kdcompress train`` and ``kdcompress distill``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from kdcompress.cli.common import (DataName, DataRoot, Device, NoProgress, Out, Recipe, Sets, console,
                                   overrides)

Steps = Annotated[Optional[int], typer.Option("--steps", min=1, help="Optimizer steps (overrides the recipe).")]
Batch = Annotated[Optional[int], typer.Option("--batch-size", "-b", min=1, help="Global batch size.")]
Lr = Annotated[Optional[float], typer.Option("--lr", help="Base learning rate.")]
Seed = Annotated[Optional[int], typer.Option("--seed", help="Random seed.")]
Resume = Annotated[bool, typer.Option("--resume", help="Continue the run in --out from its last checkpoint.")]
Pretrained = Annotated[Optional[str], typer.Option(
    "--pretrained", help="Backbone weights: imagenet (torchvision file under TORCH_HOME), digits (the built-in "
                         "pretraining, trained once and cached), a torchvision-layout .pth file, or none.")]
Force = Annotated[bool, typer.Option("--force", help="Overwrite a finished or different run in --out.")]
LogEvery = Annotated[Optional[int], typer.Option(
    "--log-every", min=1, help="Plain progress line every N steps when output is not a terminal (train.log_every).")]


def _run(recipe_name: str, role: str, model: str | None, out: Path | None, sets: list[str] | None, explicit: dict,
         resume: bool, force: bool, no_progress: bool) -> None:
    from kdcompress.config import load_recipe
    from kdcompress.engine.trainer import train as run_train

    # Another dataset than the recipe's: its dataset options no longer apply (--set may add new ones).
    reset = {"data.options": {}} if explicit.get("data.name") else {}
    recipe = load_recipe(recipe_name, reset | overrides(sets, **explicit, **({f"{role}.model": model} if model else {})))
    from kdcompress.models import resolve_model_name

    arch = resolve_model_name(getattr(recipe, role).model, recipe.teacher.model)
    suffix = f"-{recipe.distill.method}" if role == "student" and recipe.distill.method != "none" else ""
    out = out or Path("runs") / f"{recipe.name}-{arch}{suffix}"
    res = run_train(recipe, role, out, resume=resume, force=force, progress=not no_progress)
    from kdcompress.engine.distributed import is_main

    if is_main():
        m = res.metrics
        console.print(f"[green]saved[/] {res.model_path}  step {res.step}  val {res.headline} "
                      f"{m.get(res.headline, float('nan')):.4f}  "
                      f"({res.wall_s:.0f} s)")


def _role_sets(role: str, steps: int | None, batch: int | None, lr: float | None, seed: int | None,
               device: str | None, data: str | None, data_root: Path | None, log_every: int | None = None) -> dict:
    return {f"{role}.train.log_every": log_every, f"{role}.train.steps": steps, f"{role}.train.batch_size": batch, f"{role}.train.lr": lr,
            f"{role}.train.seed": seed, f"{role}.train.device": device, "data.name": data,
            "data.root": str(data_root) if data_root else None}


def train(
    recipe: Recipe = "digits",
    role: Annotated[str, typer.Option("--role", help="teacher or student: which model of the recipe to train.")] = "teacher",
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="Model name (`kdcompress list models`) or backbone shorthand such as r18.")] = None,
    out: Out = None, steps: Steps = None, batch_size: Batch = None, lr: Lr = None, seed: Seed = None,
    device: Device = None, data: DataName = None, data_root: DataRoot = None,
    pretrained: Pretrained = None,
    output_stride: Annotated[Optional[int], typer.Option("--output-stride", help="8 or 16.")] = None,
    set_: Sets = None, resume: Resume = False, force: Force = False, no_progress: NoProgress = False,
    log_every: LogEvery = None,
) -> None:
    """Train a teacher or a plain student (no distillation) on a dataset."""
    if role not in ("teacher", "student"):
        from kdcompress.errors import ConfigError

        raise ConfigError(f"--role must be teacher or student, got {role!r}.")
    explicit = _role_sets(role, steps, batch_size, lr, seed, device, data, data_root, log_every)
    explicit |= {f"{role}.pretrained": (False if pretrained == "none" else pretrained), f"{role}.output_stride": output_stride,
                 "distill.method": "none" if role == "student" else None}
    _run(recipe, role, model, out, set_, explicit, resume, force, no_progress)


def distill(
    teacher: Annotated[Path, typer.Option("--teacher", "-t", help="Teacher checkpoint from `kdcompress train`.")],
    student: Annotated[Optional[str], typer.Option("--student", "-s", help="Student model (`kdcompress list models`) or backbone shorthand such as mbv2.")] = None,
    method: Annotated[Optional[str], typer.Option("--method", help="Distillation method (`kdcompress list methods`).")] = None,
    taps: Annotated[Optional[str], typer.Option("--taps", help="Comma-separated taps to distill (default per method).")] = None,
    recipe: Recipe = "digits", out: Out = None, steps: Steps = None, batch_size: Batch = None, lr: Lr = None,
    seed: Seed = None, device: Device = None, data: DataName = None, data_root: DataRoot = None,
    pretrained: Pretrained = None,
    set_: Sets = None, resume: Resume = False, force: Force = False, no_progress: NoProgress = False,
    log_every: LogEvery = None,
) -> None:
    """Distill a trained teacher into a student with an attention-based method (or a baseline)."""
    from kdcompress.engine.checkpoint import load_model_checkpoint

    meta = load_model_checkpoint(teacher)["meta"]  # fails early on a non-teacher file
    explicit = _role_sets("student", steps, batch_size, lr, seed, device, data, data_root, log_every)
    explicit |= {"student.pretrained": (False if pretrained == "none" else pretrained),
                 "distill.teacher_checkpoint": str(teacher), "distill.method": method, "teacher.model": meta["arch"],
                 "distill.taps": [t.strip() for t in taps.split(",") if t.strip()] if taps else None}
    _run(recipe, "student", student, out, set_, explicit, resume, force, no_progress)
