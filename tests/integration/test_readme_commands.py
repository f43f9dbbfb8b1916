"""The README's commands exist as written: every ``kdcompress`` line of its bash blocks parses with
the real CLI (command, options, option types), and the ones that fit the CPU budget run."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import typer

from kdcompress.cli.app import app
from tests.integration.cli_helpers import run_cli

README = Path(__file__).resolve().parents[2] / "README.md"
RUN_AS_WRITTEN = {"models", "taps", "list"}  # seconds on a CPU; the others train, export or profile at paper sizes


def readme_commands() -> list[list[str]]:
    """Argument lists after ``kdcompress`` (or ``-m kdcompress``) from every bash block of the README."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            for part in line.split("&&"):
                words = shlex.split(part, comments=True)
                for i, w in enumerate(words):
                    if w.endswith("kdcompress") and (i == 0 or words[i - 1] == "-m" or "/" in w):
                        out.append(words[i + 1:])
                        break
    return out


COMMANDS = readme_commands()


def test_readme_has_commands() -> None:
    assert len(COMMANDS) >= 15 and any(c[:1] == ["pipeline"] for c in COMMANDS)


def pending(ctx) -> list[str]:
    """Words a context left for a subcommand (``_protected_args`` in click >= 8.2, ``protected_args`` before)."""
    protected = getattr(ctx, "_protected_args", None)
    if protected is None:
        protected = getattr(ctx, "protected_args", [])
    return list(protected) + list(ctx.args)


@pytest.mark.parametrize("args", COMMANDS, ids=[" ".join(c)[:60] for c in COMMANDS])
def test_readme_command_parses(args: list[str]) -> None:
    cmd = typer.main.get_command(app)  # typer's own click: used through its command objects only
    ctx = cmd.make_context("kdcompress", list(args), resilient_parsing=False)
    rest = pending(ctx)
    while hasattr(cmd, "resolve_command"):  # a group: walk down to the leaf command, parsing at each level
        name, cmd, rest = cmd.resolve_command(ctx, rest)
        assert cmd is not None, f"unknown command {name!r} in README: {args}"
        ctx = cmd.make_context(name, rest, parent=ctx)
        rest = pending(ctx)
    assert not rest, f"unparsed words {rest} in README command {args}"


@pytest.mark.parametrize("args", [c for c in COMMANDS if c[:1] and c[0] in RUN_AS_WRITTEN] or [["models"]])
def test_cheap_readme_commands_run_as_written(args: list[str], capsys: pytest.CaptureFixture) -> None:
    res = run_cli(capsys, *args)
    assert res.code == 0, res.err


def test_inline_command_mentions_exist() -> None:
    """Prose and help texts name commands too (`kdcompress list recipes`); each named command must exist."""
    commands = set(typer.main.get_command(app).commands)
    assert {"pipeline", "list"} <= commands
    root = README.parent
    texts = [README.read_text()] + [p.read_text() for p in sorted((root / "cli").glob("*.py"))]
    named = {m for t in texts for m in re.findall(r"`kdcompress ([a-z][a-z-]*)", t)}
    assert named, "no inline command found: the pattern no longer matches the README"
    assert not named - commands, f"unknown commands named: {sorted(named - commands)}"
