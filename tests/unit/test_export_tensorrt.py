"""TensorRT logic that needs neither TensorRT nor a GPU: missing-dependency errors, profile
validation, the engine/sidecar compatibility check. Real builds are in tests/gpu/test_tensorrt.py."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from kdcompress.errors import ExportError, KdError, MissingDependencyError
from kdcompress.export.tensorrt import (
    TRT_MISSING,
    build_engine,
    check_engine_compat,
    import_tensorrt,
    validate_profile,
)


@pytest.fixture
def no_tensorrt(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # makes `import tensorrt` raise ImportError


def test_missing_tensorrt_message(no_tensorrt: None) -> None:
    with pytest.raises(MissingDependencyError) as ei:
        import_tensorrt()
    assert str(ei.value) == "TensorRT is not installed: pip install 'kdcompress[tensorrt]' (needs an NVIDIA GPU)"
    assert str(ei.value) == TRT_MISSING and ei.value.exit_code == 4


def test_build_engine_and_runner_without_tensorrt(no_tensorrt: None, tmp_path: Path) -> None:
    from kdcompress.export.runners import TrtRunner

    with pytest.raises(MissingDependencyError, match="TensorRT is not installed"):
        build_engine(tmp_path / "m.onnx", tmp_path / "m.engine", "fp16")
    with pytest.raises(MissingDependencyError, match="TensorRT is not installed"):
        TrtRunner(tmp_path / "m.engine")
    with pytest.raises(KdError, match="Unknown TensorRT precision 'bf8'"):
        build_engine(tmp_path / "m.onnx", tmp_path / "m.engine", "bf8")
    assert not (tmp_path / "m.engine").exists()


def test_profile_engine_without_tensorrt(no_tensorrt: None, tmp_path: Path) -> None:
    import torch

    import kdcompress.export  # noqa: F401  (registers the tensorrt profiling backend)
    from kdcompress.profiling import profile_target

    (tmp_path / "m.engine").write_bytes(b"plan")
    with pytest.raises(KdError, match="cuda" if not torch.cuda.is_available() else "TensorRT is not installed"):
        profile_target(tmp_path / "m.engine", device="cuda" if torch.cuda.is_available() else "cpu")


def test_validate_profile_defaults() -> None:
    assert validate_profile([-1, 3, 64, 96]) == ((1, 3, 64, 96), (1, 3, 64, 96), (8, 3, 64, 96))
    assert validate_profile([-1, 3, 64, 96], max_batch=4)[2] == (4, 3, 64, 96)
    assert validate_profile([1, 3, 64, 96]) == ((1, 3, 64, 96),) * 3
    lo, opt, hi = validate_profile([-1, 3, -1, -1], (1, 3, 64, 64), (2, 3, 128, 128), (4, 3, 256, 256))
    assert (lo, opt, hi) == ((1, 3, 64, 64), (2, 3, 128, 128), (4, 3, 256, 256))
    assert validate_profile([-1, 3, -1, -1], (1, 3, 64, 64), None, (4, 3, 256, 256))[1] == (1, 3, 64, 64)


@pytest.mark.parametrize(
    "dims, lo, opt, hi, match",
    [
        ([-1, 3, -1, -1], None, None, None, "dynamic height/width"),
        ([-1, 3, 64, 64], (1, 3, 64, 64), (2, 3, 64, 64), (1, 3, 64, 64), "min <= opt <= max"),
        ([-1, 3, 64, 64], (1, 3, 32, 64), None, None, "static 64"),
        ([-1, 3, 64, 64], (1, 3, 64), None, None, "4 positive integers"),
        ([-1, 3, 64, 64], (0, 3, 64, 64), None, None, "4 positive integers"),
        ([1, 3, 64], None, None, None, "rank 3"),
    ],
)
def test_validate_profile_errors(dims, lo, opt, hi, match) -> None:
    with pytest.raises(ExportError, match=match):
        validate_profile(dims, lo, opt, hi)


def test_engine_compat_check() -> None:
    rec = {"version": "10.3.0", "gpu": "NVIDIA A100-SXM4-80GB"}
    check_engine_compat(rec, "10.3.0", "NVIDIA A100-SXM4-80GB")  # same: fine
    with pytest.raises(ExportError) as ei:
        check_engine_compat(rec, "10.7.0", "NVIDIA A100-SXM4-80GB", "m.engine")
    assert "TensorRT 10.3.0 (this machine has 10.7.0)" in str(ei.value) and "Rebuild" in str(ei.value)
    with pytest.raises(ExportError) as ei:
        check_engine_compat(rec, "10.7.0", "NVIDIA H100 80GB HBM3")
    msg = str(ei.value)
    assert "10.3.0" in msg and "10.7.0" in msg and "A100" in msg and "H100" in msg
    with pytest.raises(ExportError, match="does not record"):
        check_engine_compat({}, "10.7.0", "NVIDIA H100 80GB HBM3")
