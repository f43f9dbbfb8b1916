"""The dependency direction cli -> pipeline -> export -> core, checked on every import statement."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# source folder -> the kdcompress subpackages it must never import (the layers above it)
FORBIDDEN = {
    "kdcompress": ("kdcompress.cli", "kdcompress.pipeline", "kdcompress.export"),
    "export": ("kdcompress.cli", "kdcompress.pipeline"),
    "pipeline": ("kdcompress.cli",),
}


def imports(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
    return names


@pytest.mark.parametrize("folder", list(FORBIDDEN))
def test_no_layer_imports_a_layer_above_it(folder: str) -> None:
    files = [p for p in sorted((ROOT / folder).rglob("*.py")) if p.name != "__main__.py"]  # the program entry
    bad = [f"{p.relative_to(ROOT)} imports {name}" for p in files for name in imports(p)
           if name.startswith(FORBIDDEN[folder])]
    assert not bad, bad
