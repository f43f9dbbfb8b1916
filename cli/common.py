"""Option aliases and helpers shared by the commands; heavy imports stay inside commands."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console

from kdcompress.errors import ConfigError

console = Console()
err_console = Console(stderr=True)

Recipe = Annotated[str, typer.Option("--recipe", "-r", help="Built-in recipe name or path to a YAML recipe.")]
Out = Annotated[Optional[Path], typer.Option("--out", "-o", help="Run folder (default runs/<name>).")]
Sets = Annotated[Optional[list[str]], typer.Option("--set", help="Override a recipe key: --set train.lr=0.01 (repeatable).")]
Device = Annotated[Optional[str], typer.Option("--device", help="auto, cpu, cuda or cuda:N.")]
Json = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON instead of tables.")]
NoProgress = Annotated[bool, typer.Option("--no-progress", help="Hide progress bars.")]
DataName = Annotated[Optional[str], typer.Option("--data", help="Dataset name (`kdcompress list datasets`).")]
DataRoot = Annotated[Optional[Path], typer.Option("--data-root", help="Dataset folder on disk.")]


def parse_size(text: str) -> tuple[int, int]:
    """'512x1024' -> (512, 1024) as H, W; '96' -> (96, 96)."""
    try:
        parts = [int(p) for p in text.lower().replace("×", "x").split("x")]
    except ValueError:
        raise ConfigError(f"Size '{text}' must look like HxW, e.g. 512x1024.") from None
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2 or min(parts) <= 0:
        raise ConfigError(f"Size '{text}' must look like HxW with positive numbers, e.g. 512x1024.")
    return parts[0], parts[1]


def overrides(sets: list[str] | None, **explicit: Any) -> list[str] | dict[str, Any]:
    """Merge ``--set`` items with explicit options (explicit ones win); ``method.x`` means ``distill.hparams.x``."""
    from kdcompress.config import _split

    out: dict[str, Any] = {}
    for item in sets or []:
        k, v = _split(item)
        if k.startswith("method."):
            k = "distill.hparams." + k[len("method."):]
        out[k] = v
    out.update({k: v for k, v in explicit.items() if v is not None})
    return out


def print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")
