"""Typer command-line interface (installed as ``kdcompress.cli``)."""
