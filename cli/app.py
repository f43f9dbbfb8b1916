"""The ``kdcompress`` command: thin commands that parse, call one library function, render."""

from __future__ import annotations

import os
import sys

import typer

from kdcompress.cli import deploy as deploy_cmd
from kdcompress.cli import evaluate as evaluate_cmd
from kdcompress.cli import pipeline as pipeline_cmd
from kdcompress.cli import train as train_cmd
from kdcompress.cli import visualize as visualize_cmd
from kdcompress.cli import zoo as zoo_cmd

app = typer.Typer(
    name="kdcompress",
    help="Distill segmentation teachers into small students and ship them as verified artifacts.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.command("train")(train_cmd.train)
app.command("distill")(train_cmd.distill)
app.command("evaluate")(evaluate_cmd.evaluate)
app.command("export")(deploy_cmd.export)
app.command("profile")(deploy_cmd.profile)
app.command("pipeline")(pipeline_cmd.pipeline)
app.command("models")(zoo_cmd.models)
app.command("taps")(zoo_cmd.taps)
app.command("list")(zoo_cmd.list_)
app.add_typer(visualize_cmd.app, name="visualize")


def main() -> None:
    """Entry point: KdError -> one red line and its exit code (traceback with KDCOMPRESS_DEBUG=1)."""
    from kdcompress.errors import KdError

    try:
        app()
    except KdError as e:
        if os.environ.get("KDCOMPRESS_DEBUG"):
            raise
        from rich.markup import escape

        from kdcompress.cli.common import err_console

        # escaped: messages quote things like pip install 'kdcompress[tensorrt]', which is not markup
        err_console.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
        err_console.print("[dim]set KDCOMPRESS_DEBUG=1 for the traceback[/]", highlight=False)
        sys.exit(e.exit_code)


if __name__ == "__main__":
    main()
