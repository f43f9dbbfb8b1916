"""Static cost (params, FLOPs conventions), latency statistics, memory probes and profile_target rows."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from kdcompress.errors import KdError
from kdcompress.profiling import profile_many, profile_target, render_table
from kdcompress.profiling.latency import CpuPeakMemory, environment, fps_of, measure_latency, summarize
from kdcompress.profiling.static import count_flops, count_params, onnx_param_count


def test_flops_of_one_conv_is_hand_computed() -> None:
    conv = nn.Conv2d(3, 8, kernel_size=3, padding=1)
    # MACs = C_out * H_out * W_out * C_in * k * k = 8 * 16 * 20 * 3 * 3 * 3; FlopCounterMode counts 2 per MAC.
    macs = 8 * 16 * 20 * 3 * 3 * 3
    for use_meta in (True, False):
        r = count_flops(conv, (16, 20), use_meta=use_meta)
        assert r["flops"] == 2 * macs
        assert r["gflops"] == pytest.approx(2 * macs / 1e9) and r["gmacs"] == pytest.approx(macs / 1e9)
    assert count_flops(conv, (16, 20), batch=3)["flops"] == 3 * 2 * macs
    assert "multiply-accumulate" in r["convention"]


def test_count_params_and_meta_copy_leaves_model_intact() -> None:
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    assert count_params(m) == 3 * 4 * 9 + 4 + 4 + 4  # BN running stats are buffers, not parameters
    count_flops(m, (8, 8))
    assert next(m.parameters()).device.type == "cpu" and m.training


def test_summarize_and_measure_latency() -> None:
    s = summarize(list(range(1, 101)))
    assert s["median_ms"] == pytest.approx(50.5) and s["p90_ms"] == pytest.approx(90.1) and s["p99_ms"] == pytest.approx(99.01)
    assert fps_of({"median_ms": 20.0}, batch=2) == pytest.approx(100.0)
    calls = []
    lat = measure_latency(lambda: calls.append(1), warmup=2, iters=5)
    assert len(calls) == 7 and lat["iters"] == 5 and lat["warmup"] == 2 and lat["median_ms"] >= 0
    with pytest.raises(KdError):
        measure_latency(lambda: None, iters=0)


def test_cpu_peak_memory_sees_a_transient_allocation() -> None:
    with CpuPeakMemory() as mm:
        a = np.ones(64 * 2**20 // 8)  # 64 MiB, touched, then freed before the block ends
        del a
    assert mm.peak_delta >= 48 * 2**20, mm.method
    assert mm.method


def test_environment_record() -> None:
    env = environment("cpu", threads=2)
    for key in ("cpu_model", "torch", "onnxruntime", "torch_threads", "device_name"):
        assert env[key] is not None
    assert env["torch_threads"] == 2


def test_profile_model_name() -> None:
    from kdcompress.models import build_model

    row = profile_target("deeplabv3plus-mbv2", input_size=(64, 64), num_classes=11, warmup=1, iters=3, threads=1)
    ref = build_model("deeplabv3plus-mbv2", num_classes=11)
    assert row["params"] == sum(p.numel() for p in ref.parameters())
    assert row["gflops"] == pytest.approx(2 * row["gmacs"]) and row["gmacs"] > 0
    assert row["latency_ms"]["median_ms"] > 0 and row["latency_ms"]["iters"] == 3
    assert row["latency_ms"]["p90_ms"] >= row["latency_ms"]["median_ms"]
    assert row["fps"] == pytest.approx(1000.0 / row["latency_ms"]["median_ms"])
    assert row["memory_mb"] >= row["memory"]["weights_mb"] > 0
    assert row["threads"] == 1 and row["env"]["torch_threads"] == 1
    assert row["backend"] == "torch" and row["device"] == "cpu"
    json.dumps(row)  # rows are saved as JSON by the CLI / benchmarks


@pytest.fixture(scope="module")
def conv_onnx(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, Path]:
    from kdcompress.export.onnx import export_onnx

    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 5, 1)).eval()
    return m, export_onnx(m, tmp_path_factory.mktemp("prof") / "convs.onnx", (32, 32))


def test_profile_onnx_file(conv_onnx: tuple[nn.Module, Path]) -> None:
    m, path = conv_onnx
    row = profile_target(path, input_size=(32, 32), batch=2, warmup=1, iters=4, threads=1)
    assert row["backend"] == "ort" and row["kind"] == "onnx"
    assert row["params"] == onnx_param_count(path) == sum(p.numel() for p in m.parameters())
    assert row["flops"] is None and row["gmacs"] is None  # no sidecar naming a source architecture
    assert row["latency_ms"]["median_ms"] > 0 and row["fps"] == pytest.approx(2000.0 / row["latency_ms"]["median_ms"])
    assert row["ort_providers"][0] == "CPUExecutionProvider" and row["ort_intra_op_threads"] == 1
    rows = profile_many([path, path], input_size=(32, 32), warmup=0, iters=2)
    assert len(rows) == 2
    table = render_table([row] + rows)
    assert table.row_count == 3 and [c.header for c in table.columns][:4] == ["Model", "Params (M)", "GMACs", "GFLOPs"]


def test_profile_onnx_flops_from_sidecar_architecture(conv_onnx: tuple[nn.Module, Path], tmp_path: Path) -> None:
    import shutil

    path = tmp_path / "student.onnx"
    shutil.copy(conv_onnx[1], path)
    (tmp_path / "student.onnx.json").write_text(json.dumps({"arch": "deeplabv3-mbv2", "num_classes": 5}))
    row = profile_target(path, input_size=(32, 32), warmup=0, iters=1)
    direct = count_flops(__import__("kdcompress.models", fromlist=["build_model"]).build_model("deeplabv3-mbv2", 5), (32, 32))
    assert row["flops"] == direct["flops"] and row["model"] == "deeplabv3-mbv2"


def test_bad_targets(tmp_path: Path) -> None:
    with pytest.raises(KdError, match="does not exist"):
        profile_target(tmp_path / "missing.onnx")
    (tmp_path / "weights.pkl").write_bytes(b"x")
    with pytest.raises(KdError, match=r"expected a model name .* or a file ending in"):
        profile_target(tmp_path / "weights.pkl")
    with pytest.raises(KdError, match="Unknown model"):
        profile_target("deeplabv9-r7")
    with pytest.raises(KdError, match="cannot run a model target"):
        profile_target("deeplabv3plus-mbv2", backend="ort")
    with pytest.raises(KdError, match="Unknown device"):
        profile_target("deeplabv3plus-mbv2", device="tpu")
    with pytest.raises(KdError, match="smaller than the model's output stride 16"):
        profile_target("deeplabv3plus-mbv2", input_size=(8, 64), iters=1)


def test_pytorch_profiling_accepts_any_runnable_size() -> None:
    """PSPNet at the papers' 512x1024 (not a multiple of 48): PyTorch runs it; only export refuses it."""
    from kdcompress.profiling import profile_target

    row = profile_target("pspnet-r18", input_size=(64, 80), iters=1, warmup=0, num_classes=19)
    assert row["params"] > 0 and row["latency_ms"]["median_ms"] > 0
