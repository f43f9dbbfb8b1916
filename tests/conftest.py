"""Shared fixtures: a per-session dataset cache and skip logic for gpu / tensorrt markers."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def _cache_dir(tmp_path_factory: pytest.TempPathFactory) -> None:
    # Generated datasets go to a per-session cache so tests never touch ~/.cache.
    if not os.environ.get("KDCOMPRESS_TEST_KEEP_CACHE"):
        os.environ["KDCOMPRESS_CACHE"] = str(tmp_path_factory.mktemp("kdcache"))
    torch.set_num_threads(min(2, torch.get_num_threads()))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    no_cuda = pytest.mark.skip(reason="needs a CUDA GPU")
    no_trt = pytest.mark.skip(reason="needs TensorRT (pip install 'kdcompress[tensorrt]') and a CUDA GPU")
    has_trt = importlib.util.find_spec("tensorrt") is not None and torch.cuda.is_available()
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(no_cuda)
        if "tensorrt" in item.keywords and not has_trt:
            item.add_marker(no_trt)
