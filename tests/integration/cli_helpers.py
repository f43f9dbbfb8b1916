"""Run the real ``kdcompress`` entry point in-process and capture exit code and output."""

from __future__ import annotations

import sys
from dataclasses import dataclass

import pytest

from kdcompress.cli.app import main


@dataclass
class CliResult:
    code: int
    out: str
    err: str


def run_cli(capsys: pytest.CaptureFixture, *args: str) -> CliResult:
    argv = sys.argv
    sys.argv = ["kdcompress", *map(str, args)]
    try:
        main()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = argv
    cap = capsys.readouterr()
    return CliResult(code, cap.out, cap.err)
