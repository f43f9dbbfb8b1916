"""TensorRT logic that needs neither TensorRT nor a GPU: missing-dependency errors, the version guard
(with a fake ``tensorrt`` module that only has ``__version__``), version lookup over every TensorRT
distribution name, profile validation, the engine/sidecar compatibility rules and the timing
cache fallback. Real builds are in tests/gpu/test_tensorrt.py; the Q/DQ ONNX and the TensorRT API
list are checked in tests/unit/test_trt_qdq.py."""

from __future__ import annotations

import sys
import types
import warnings
from pathlib import Path

import pytest

from kdcompress.errors import ExportError, KdError, MissingDependencyError
from kdcompress.export.tensorrt import (
    TRT_MISSING,
    TensorRTCompatWarning,
    _attach_timing_cache,
    build_engine,
    check_engine_compat,
    import_tensorrt,
    tensorrt_distributions,
    timing_cache_path,
    trt_version_installed,
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


A100 = {"name": "NVIDIA A100-SXM4-80GB", "compute_capability": "8.0"}
H100 = {"name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}


def test_engine_compat_check() -> None:
    rec = {"version": "10.3.0", "gpu": "NVIDIA A100-SXM4-80GB", "compute_capability": "8.0"}
    assert check_engine_compat(rec, "10.3.0", A100) == []  # same: fine, no warning
    with pytest.raises(ExportError) as ei:
        check_engine_compat(rec, "10.7.0", A100, "m.engine")
    assert "TensorRT 10.3.0 (this machine has 10.7.0)" in str(ei.value) and "Rebuild" in str(ei.value)
    with pytest.raises(ExportError) as ei:
        check_engine_compat(rec, "10.7.0", H100)
    msg = str(ei.value)
    assert "10.3.0" in msg and "10.7.0" in msg and "A100" in msg and "H100" in msg
    assert "compute capability 8.0" in msg and "9.0" in msg and "\n" not in msg
    with pytest.raises(ExportError, match="compute capability 8.0 .* is 9.0"):
        check_engine_compat(rec, "10.3.0", H100)
    with pytest.raises(ExportError, match="does not record"):
        check_engine_compat({}, "10.7.0", H100)
    with pytest.raises(ExportError, match="does not record the compute capability"):
        check_engine_compat({"version": "10.3.0", "gpu": "NVIDIA A100-SXM4-80GB"}, "10.3.0", A100)


def test_engine_compat_same_compute_capability_other_gpu_only_warns() -> None:
    rec = {"version": "11.1.0", "gpu": "NVIDIA A100-SXM4-80GB", "compute_capability": "8.0"}
    notes = check_engine_compat(rec, "11.1.0", {"name": "NVIDIA A100-PCIE-40GB", "compute_capability": "8.0"})
    assert len(notes) == 1 and "A100-SXM4-80GB" in notes[0] and "A100-PCIE-40GB" in notes[0]


def test_engine_compat_version_and_hardware_compatible_plans() -> None:
    vc = {"version": "10.3.0", "gpu": "A100", "compute_capability": "8.0", "version_compatible": True}
    assert check_engine_compat(vc, "10.7.0", A100)  # newer runtime, same major: a warning, not an error
    assert check_engine_compat(vc, "11.1.0", A100)  # TensorRT 10 version-compatible plans run on 11
    with pytest.raises(ExportError, match="TensorRT 10.3.0"):
        check_engine_compat(vc, "10.2.0", A100)  # never on an older runtime
    with pytest.raises(ExportError, match="TensorRT 11.1.0"):
        check_engine_compat({**vc, "version": "11.1.0"}, "10.7.0", A100)
    hw = {"version": "10.3.0", "gpu": "A100", "compute_capability": "8.0", "hardware_compatibility_level": "AMPERE_PLUS"}
    assert check_engine_compat(hw, "10.3.0", H100)  # Ampere+ plan on Hopper: allowed, warned
    with pytest.raises(ExportError, match="compute capability 8.0"):
        check_engine_compat(hw, "10.3.0", {"name": "Tesla T4", "compute_capability": "7.5"})


# ---- (c) the version guard: a fake tensorrt module with only __version__ ----------------------

def _fake_trt(monkeypatch: pytest.MonkeyPatch, version: str | None) -> None:
    mod = types.ModuleType("tensorrt")
    if version is not None:
        mod.__version__ = version  # nothing else: the guard must not touch any other attribute
    monkeypatch.setitem(sys.modules, "tensorrt", mod)


@pytest.mark.parametrize("version", ["9.0.0", "12.0.0", "8.6.1.post1"])
def test_version_guard_refuses_unsupported_major(monkeypatch: pytest.MonkeyPatch, version: str) -> None:
    _fake_trt(monkeypatch, version)
    with pytest.raises(MissingDependencyError) as ei:
        import_tensorrt()
    msg = str(ei.value)
    assert ei.value.exit_code == 4 and "\n" not in msg
    assert f"TensorRT {version} is installed" in msg and "10.x and 11.x" in msg and "tensorrt>=10.0,<12" in msg


def test_version_guard_accepts_10_and_11(monkeypatch: pytest.MonkeyPatch) -> None:
    for version in ("10.0.1", "10.16.0", "11.1.0"):
        _fake_trt(monkeypatch, version)
        assert import_tensorrt().__version__ == version


def test_version_guard_without_version(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_trt(monkeypatch, None)
    with pytest.raises(MissingDependencyError, match="without __version__ is installed") as ei:
        import_tensorrt()
    assert ei.value.exit_code == 4


def test_build_engine_refuses_unsupported_major_before_any_work(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _fake_trt(monkeypatch, "12.0.0")
    with pytest.raises(MissingDependencyError, match="TensorRT 12.0.0"):
        build_engine(tmp_path / "m.onnx", tmp_path / "m.engine", "int8")
    assert not list(tmp_path.iterdir())


# ---- (d) the CLI without TensorRT -------------------------------------------------------------

def test_cli_export_tensorrt_without_tensorrt(no_tensorrt: None, capsys: pytest.CaptureFixture,
                                              monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from tests.integration.cli_helpers import run_cli

    monkeypatch.delenv("KDCOMPRESS_DEBUG", raising=False)
    res = run_cli(capsys, "export", tmp_path / "student.pt", "--to", "tensorrt", "--precision", "int8")
    assert res.code == 4
    lines = [ln for ln in res.err.splitlines() if ln.strip()]
    assert lines[0] == f"error: {TRT_MISSING}"
    assert len(lines) == 2 and "KDCOMPRESS_DEBUG" in lines[1]
    assert not list(tmp_path.iterdir())


# ---- installed version over every distribution name ------------------------------------------

class _Dist:
    def __init__(self, name: str, version: str) -> None:
        self.metadata = {"Name": name}
        self.version = version


@pytest.mark.parametrize("dists, expected", [
    ([("tensorrt", "10.3.0")], "10.3.0"),
    ([("tensorrt-cu12", "10.7.0"), ("tensorrt_cu12_bindings", "10.7.0"), ("tensorrt_cu12_libs", "10.7.0")], "10.7.0"),
    ([("tensorrt_cu13", "11.1.0")], "11.1.0"),
    ([("tensorrt-cu11", "10.0.1")], "10.0.1"),
    ([("TensorRT_CU12", "10.9.0")], "10.9.0"),
    ([("tensorrt", "10.8.0"), ("tensorrt-cu12-bindings", "10.8.0.43")], "10.8.0.43"),
    ([("tensorrt-llm", "0.17.0"), ("tensorrt-lean", "10.3.0"), ("numpy", "2.0")], None),
    ([], None),
])
def test_trt_version_installed_any_distribution_name(monkeypatch: pytest.MonkeyPatch, dists, expected) -> None:
    from importlib import metadata as im

    monkeypatch.setattr(im, "distributions", lambda: [_Dist(n, v) for n, v in dists])
    assert trt_version_installed() == expected
    assert all(k.startswith("tensorrt") and "_" not in k for k in tensorrt_distributions())


# ---- timing cache: keyed by TensorRT version + compute capability, rejected -> fresh ----------

def test_timing_cache_path_is_keyed() -> None:
    assert timing_cache_path("runs/timing.cache", "10.3.0", "8.6") == Path("runs/timing.trt10.3.0-sm86.cache")
    assert timing_cache_path("runs/tc", "11.1.0", "9.0") == Path("runs/tc.trt11.1.0-sm90")
    assert timing_cache_path("t.cache", "10.3.0", "8.6") != timing_cache_path("t.cache", "10.3.0", "8.9")


class _FakeConfig:
    """create_timing_cache / set_timing_cache as the TensorRT bindings behave (bytes in, bool out)."""

    def __init__(self, reject_blob: bool = False, mismatch: bool = False) -> None:
        self.reject_blob, self.mismatch, self.set_calls = reject_blob, mismatch, []

    def create_timing_cache(self, blob: bytes) -> object:
        if blob and self.reject_blob:
            raise RuntimeError("invalid timing cache")
        return ("cache", bytes(blob))

    def set_timing_cache(self, cache: object, ignore_mismatch: bool) -> bool:
        self.set_calls.append((cache, ignore_mismatch))
        return not (self.mismatch and cache[1])  # type: ignore[index]


@pytest.mark.parametrize("cfg, status", [
    (_FakeConfig(), "loaded"),
    (_FakeConfig(reject_blob=True), "rejected (unreadable), rebuilt"),
    (_FakeConfig(mismatch=True), "rejected (mismatch), rebuilt"),
])
def test_rejected_timing_cache_falls_back_to_fresh(tmp_path: Path, cfg: _FakeConfig, status: str) -> None:
    path = tmp_path / "timing.trt10.3.0-sm86.cache"
    path.write_bytes(b"old timings")
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        assert _attach_timing_cache(cfg, path) == status
    assert all(ignore is False for _, ignore in cfg.set_calls)
    assert cfg.set_calls[-1][0] == (("cache", b"old timings") if status == "loaded" else ("cache", b""))
    assert bool(w) == (status != "loaded") and all(issubclass(x.category, TensorRTCompatWarning) for x in w)
    assert _attach_timing_cache(_FakeConfig(), tmp_path / "missing.cache") == "new"
