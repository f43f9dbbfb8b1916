"""A normal wheel install ships kdcompress.cli, kdcompress.export and the presets (not only -e)."""

from __future__ import annotations

import subprocess
import sys
import zipfile

import pytest
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_wheel_contains_and_imports_cli(tmp_path: Path) -> None:
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path / "w"), str(ROOT)],
                   check=True, capture_output=True, timeout=300)
    wheel = next((tmp_path / "w").glob("kdcompress-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"kdcompress/cli/app.py", "kdcompress/export/__init__.py", "kdcompress/pipeline/__init__.py",
            "kdcompress/profiles/recipes/digits.yaml"} <= names
    assert not any(n.startswith(("cli/", "export/", "pipeline/", "tests/")) for n in names), "generic top-level packages leaked"
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    code = ("import kdcompress, kdcompress.cli.app, kdcompress.export, kdcompress.pipeline; "
            "from kdcompress.config import list_presets; print(kdcompress.__file__); print(list_presets('recipes'))")
    out = subprocess.run([sys.executable, "-c", code], env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"},
                         capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert str(target) in out.stdout and "digits" in out.stdout
