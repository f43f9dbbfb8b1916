"""Installed package versions without importing the packages (for sidecars and environment records)."""

from __future__ import annotations

import re

#: Distributions that carry the ``tensorrt`` module or its libraries: ``tensorrt``, ``tensorrt-cu12``,
#: ``tensorrt-cu13``, ``tensorrt-cu11`` and their ``-bindings``/``-libs`` parts (names normalised per
#: PEP 503, so ``tensorrt_cu12`` matches too). ``tensorrt-llm``, ``tensorrt-lean``, ``tensorrt-dispatch``
#: and ``tensorrt-rtx`` are other products with other version numbers and are ignored.
_TRT_DIST = re.compile(r"^tensorrt(-cu\d+)?(-bindings|-libs)?$")


def package_version(name: str) -> str | None:
    """Installed version of a distribution without importing it (importing TensorRT takes seconds)."""
    from importlib import metadata as im

    for dist in dict.fromkeys((name, name.replace("-", "_"))):
        try:
            return im.version(dist)
        except im.PackageNotFoundError:
            continue
    return None


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def tensorrt_distributions() -> dict[str, str]:
    """{normalised distribution name: version} of every installed TensorRT distribution."""
    from importlib import metadata as im

    found: dict[str, str] = {}
    for dist in im.distributions():
        name = dist.metadata.get("Name") if dist.metadata is not None else None
        if not name:
            continue
        norm = _normalize(name)
        if norm.startswith("tensorrt") and _TRT_DIST.match(norm) and dist.version:
            found.setdefault(norm, str(dist.version))
    return found


def trt_version_installed() -> str | None:
    """TensorRT version without importing it (None when absent).

    Prefers the distribution that ships the ``tensorrt`` module (``tensorrt-cuNN-bindings``, or the
    ``tensorrt`` wheel itself), then ``tensorrt-cuNN``, then ``tensorrt``, then the libraries.
    """
    found = tensorrt_distributions()
    if not found:
        return None

    def rank(name: str) -> tuple[int, str]:
        if name.endswith("-bindings"):
            return (0, name)
        if name == "tensorrt":
            return (2, name)
        if name.endswith("-libs"):
            return (3, name)
        return (1, name)

    return found[min(found, key=rank)]
