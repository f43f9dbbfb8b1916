"""TensorRT 10.x / 11.x engines end to end (needs TensorRT and a CUDA GPU; skipped cleanly otherwise).

Strongly typed builds on both majors: fp16 from the mixed-precision ONNX, int8 from the verified
symmetric Q/DQ ONNX (no BuilderFlag precision flags, no implicit calibration)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.tensorrt,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
trt = pytest.importorskip("tensorrt", reason="TensorRT is not installed: pip install 'kdcompress[tensorrt]'")

import kdcompress.models  # noqa: E402
from kdcompress.engine.checkpoint import save_model_checkpoint  # noqa: E402
from kdcompress.errors import ExportError  # noqa: E402
from kdcompress.export import TorchRunner, TrtRunner, export_checkpoint  # noqa: E402
from kdcompress.export.metadata import read_sidecar, sidecar_path, write_sidecar  # noqa: E402
from kdcompress.export.onnx import export_onnx  # noqa: E402
from kdcompress.export.ort_quant import check_trt_qdq  # noqa: E402
from kdcompress.export.tensorrt import TensorRTCompatWarning, build_engine, current_gpu, load_engine  # noqa: E402
from kdcompress.tasks.segmentation import compare_outputs  # noqa: E402

META = {"num_classes": 11, "output_stride": None, "class_names": ["background"] + [str(d) for d in range(10)],
        "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "input_size": [64, 64], "ignore_index": 255,
        "dataset": "digits", "data_options": {"image_size": 64, "num_train": 40, "num_val": 16}, "data_root": None}


class TinySeg(nn.Module):
    def __init__(self, num_classes: int = 11) -> None:
        super().__init__()
        self.arch = "tiny-test"
        self.enc = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.BatchNorm2d(16), nn.ReLU(),
                                 nn.Conv2d(16, 16, 3, 1, 1), nn.BatchNorm2d(16), nn.ReLU())
        self.cls = nn.Conv2d(16, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(self.cls(self.enc(x)), size=x.shape[-2:], mode="bilinear", align_corners=False)

    def check_input_size(self, size: tuple[int, int]) -> None:
        pass


@pytest.fixture
def tiny_ckpt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    real = kdcompress.models.build_model

    def build(name, num_classes, output_stride=None, pretrained=False):
        return TinySeg(num_classes) if name == "tiny-test" else real(name, num_classes, output_stride, pretrained)

    monkeypatch.setattr(kdcompress.models, "build_model", build)
    torch.manual_seed(0)
    return save_model_checkpoint(tmp_path / "tiny.pt", TinySeg().eval(), {"arch": "tiny-test", **META})


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_export_engine_verified(tiny_ckpt: Path, precision: str) -> None:
    r = export_checkpoint(tiny_ckpt, "tensorrt", precision=precision, verify_images=4, progress=False,
                          workspace_mb=512)
    assert r.artifact.name == f"tiny.{precision}.engine" and r.artifact.is_file()
    assert r.parity["passed"] and r.parity["argmax_agreement"] >= 0.99
    side = read_sidecar(r.artifact)
    rec = side["tensorrt"]
    assert rec["version"] == trt.__version__ and rec["major"] in (10, 11)
    assert rec["gpu"] == torch.cuda.get_device_name()
    assert rec["compute_capability"] == current_gpu()["compute_capability"]
    assert rec["strongly_typed"] is True and rec["version_compatible"] is False
    assert rec["hardware_compatibility_level"] == "NONE"
    assert side["precision"] == precision and rec["profile"]["max"][0] == 8
    assert rec["allowed_precisions"] == (["fp32"] if precision == "fp32" else ["fp16", "fp32"])
    assert r.artifact.read_bytes()[:1] != b"{"  # plain plan, no JSON header: trtexec can load it
    runner = TrtRunner(r.artifact)
    ref = TorchRunner(_load(tiny_ckpt), "cuda")
    for b in (1, 3):
        x = np.random.default_rng(b).standard_normal((b, 3, 64, 64)).astype(np.float32)
        out = runner.infer(x)
        assert out.shape == (b, 11, 64, 64)
        assert compare_outputs(ref.infer(x), out)["argmax_agreement"] >= 0.99
    runner.close()


def _load(ckpt: Path) -> nn.Module:
    m = TinySeg()
    m.load_state_dict(torch.load(ckpt, weights_only=True)["state_dict"])
    return m.eval()


def test_int8_engine_from_verified_qdq_onnx(tiny_ckpt: Path) -> None:
    r = export_checkpoint(tiny_ckpt, "tensorrt", precision="int8", verify_images=4, calib_images=16,
                          progress=False, workspace_mb=512)
    cache = r.artifact.with_name(r.artifact.name + ".calib")  # now the verified Q/DQ ONNX, not a TensorRT cache
    assert cache.is_file() and check_trt_qdq(cache) == []
    assert r.parity["argmax_agreement"] >= 0.95 and r.drop <= 0.03
    qdq = read_sidecar(r.artifact)["tensorrt"]["qdq"]
    assert qdq["graph_check"]["passed"] and qdq["verification"]["passed"]
    assert qdq["verification"]["images_from"].startswith("validation split")  # mIoU checked in ORT before the build
    assert qdq["verification"]["miou_drop"] <= 0.03
    assert read_sidecar(r.artifact)["tensorrt"]["allowed_precisions"] == ["int8", "fp32"]
    # A second build reuses the Q/DQ cache: no calibration images needed.
    out = tiny_ckpt.parent / "again.engine"
    _, info = build_engine(r.onnx_fp32, out, "int8", calib_images=None, calib_cache=cache, workspace_mb=512)
    assert out.is_file() and info["calibration_images"] == 0 and info["qdq"]["reused"]


def test_engine_from_other_version_or_gpu_is_refused(tiny_ckpt: Path) -> None:
    r = export_checkpoint(tiny_ckpt, "tensorrt", precision="fp16", verify_images=2, progress=False,
                          workspace_mb=512)
    good = read_sidecar(r.artifact)
    side = json.loads(json.dumps(good))
    side["tensorrt"].update(version="9.0.0", gpu="Some Other GPU", compute_capability="1.0")
    write_sidecar(r.artifact, side)
    with pytest.raises(ExportError) as ei:
        load_engine(r.artifact)
    msg = str(ei.value)
    assert "9.0.0" in msg and trt.__version__ in msg and "Some Other GPU" in msg and torch.cuda.get_device_name() in msg
    assert "compute capability 1.0" in msg
    # another GPU name with the same compute capability: loads, with a warning
    side = json.loads(json.dumps(good))
    side["tensorrt"]["gpu"] = "Some Other GPU"
    write_sidecar(r.artifact, side)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        engine, _runtime = load_engine(r.artifact)
    assert engine is not None and any(issubclass(x.category, TensorRTCompatWarning) for x in w)
    # a plan TensorRT cannot deserialize: one line, never None further down
    r.artifact.write_bytes(b"\0" * 4096)
    write_sidecar(r.artifact, good)
    with pytest.raises(ExportError, match="built by another TensorRT version or for another GPU, or corrupt"):
        load_engine(r.artifact)


def test_timing_cache_and_dynamic_shapes(tmp_path: Path) -> None:
    m = TinySeg().eval()
    onnx_path = export_onnx(m, tmp_path / "dyn.onnx", (64, 64), dynamic_spatial=True)
    tc = tmp_path / "timing.cache"
    engine = tmp_path / "dyn.engine"
    shapes = dict(min_shape=(1, 3, 32, 32), opt_shape=(1, 3, 64, 64), max_shape=(2, 3, 128, 128))
    _, info = build_engine(onnx_path, engine, "fp32", workspace_mb=512, timing_cache=tc, **shapes)
    keyed = Path(info["timing_cache"])  # keyed by TensorRT version + compute capability
    cc = current_gpu()["compute_capability"].replace(".", "")
    assert keyed.name == f"timing.trt{trt.__version__}-sm{cc}.cache" and keyed.stat().st_size > 0
    assert info["timing_cache_status"] == "new" and not tc.exists()
    _, again = build_engine(onnx_path, tmp_path / "dyn2.engine", "fp32", workspace_mb=512, timing_cache=tc, **shapes)
    assert again["timing_cache_status"] == "loaded"
    keyed.write_bytes(b"not a timing cache")
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        _, bad = build_engine(onnx_path, tmp_path / "dyn3.engine", "fp32", workspace_mb=512, timing_cache=tc, **shapes)
    assert bad["timing_cache_status"].startswith("rejected") and any(issubclass(x.category, TensorRTCompatWarning) for x in w)
    write_sidecar(engine, {"format": "kdcompress.artifact/1", "tensorrt": info})
    runner, ref = TrtRunner(engine), TorchRunner(m, "cuda")
    for shape in ((1, 3, 32, 32), (2, 3, 128, 96)):
        x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
        assert compare_outputs(ref.infer(x), runner.infer(x))["max_abs"] < 1e-2
    with pytest.raises(ExportError, match="outside the engine's optimisation profile"):
        runner.infer(np.zeros((1, 3, 256, 256), np.float32))


def test_profile_engine(tiny_ckpt: Path) -> None:
    from kdcompress.profiling import profile_target

    r = export_checkpoint(tiny_ckpt, "tensorrt", precision="fp16", verify_images=2, progress=False,
                          workspace_mb=512)
    row = profile_target(r.artifact, input_size=(64, 64), device="cuda", warmup=2, iters=10)
    assert row["backend"] == "tensorrt" and row["latency_ms"]["median_ms"] > 0 and row["memory_mb"] > 0
    assert row["precision"] == "fp16" and row["env"]["device_name"] == torch.cuda.get_device_name()
    json.dumps(row)


def test_real_student_fp16(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = kdcompress.models.build_model("deeplabv3plus-mbv2", num_classes=11).eval()
    ckpt = save_model_checkpoint(tmp_path / "mbv2.pt", model, {"arch": "deeplabv3plus-mbv2", **META})
    r = export_checkpoint(ckpt, "tensorrt", precision="fp16", verify_images=4, progress=False)
    assert r.parity["argmax_agreement"] >= 0.99 and r.drop <= 0.01
    assert sidecar_path(r.artifact).is_file()


def test_data_dependent_output_is_refused(tmp_path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper

    nodes = [helper.make_node("Constant", [], ["zero"], value=helper.make_tensor("z", TensorProto.FLOAT, [], [0.0])),
             helper.make_node("Greater", ["input", "zero"], ["mask"]),
             helper.make_node("NonZero", ["mask"], ["logits"])]
    graph = helper.make_graph(nodes, "nonzero", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("logits", TensorProto.INT64, [4, None])])
    path = tmp_path / "nonzero.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    engine = tmp_path / "nonzero.engine"
    _, info = build_engine(path, engine, "fp32", workspace_mb=256)
    write_sidecar(engine, {"format": "kdcompress.artifact/1", "tensorrt": info})
    runner = TrtRunner(engine)
    with pytest.raises(ExportError, match="data-dependent shape"):
        runner.infer(np.ones((1, 3, 8, 8), np.float32))
    runner.close()
