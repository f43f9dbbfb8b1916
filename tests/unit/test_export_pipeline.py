"""export_checkpoint end to end on the built-in digits data (64x64, 16 val / 40 train images).

One real zoo student (deeplabv3plus-mbv2) is exported once per module to ONNX and ORT INT8;
the error paths use a tiny stand-in architecture so they stay fast.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kdcompress.models
from kdcompress.engine.checkpoint import save_model_checkpoint
from kdcompress.errors import CheckpointError, ExportError, KdError, MissingDependencyError
from kdcompress.export import ExportResult, OrtRunner, TorchRunner, export_checkpoint
from kdcompress.export.metadata import read_sidecar, sidecar_path
from kdcompress.export.ort_quant import calibration_images, quantize_int8
from kdcompress.tasks.segmentation import compare_outputs

DIGITS_OPTS = {"image_size": 64, "num_train": 40, "num_val": 16}
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def _meta(arch: str) -> dict:
    return {"arch": arch, "num_classes": 11, "output_stride": None,
            "class_names": ["background"] + [str(d) for d in range(10)], "mean": MEAN, "std": STD,
            "input_size": [64, 64], "ignore_index": 255, "dataset": "digits", "data_options": dict(DIGITS_OPTS),
            "data_root": None}


@pytest.fixture(scope="module")
def zoo_exports(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Real student, random init (fixed seed): fp32 ONNX then INT8 reusing it."""
    d = tmp_path_factory.mktemp("zoo")
    torch.manual_seed(0)
    model = kdcompress.models.build_model("deeplabv3plus-mbv2", num_classes=11).eval()
    ckpt = save_model_checkpoint(d / "model.pt", model, _meta("deeplabv3plus-mbv2"))
    fp32 = export_checkpoint(ckpt, "onnx", verify_images=3, max_eval_images=8, progress=False)
    int8 = export_checkpoint(ckpt, "ort-int8", verify_images=3, max_eval_images=8, calib_images=8, progress=False)
    return {"dir": d, "ckpt": ckpt, "model": model, "fp32": fp32, "int8": int8}


def test_fp32_onnx_parity_on_real_student(zoo_exports: dict) -> None:
    r: ExportResult = zoo_exports["fp32"]
    assert r.artifact == zoo_exports["dir"] / "model.onnx" and r.artifact.is_file()
    onnx.checker.check_model(onnx.load(str(r.artifact)), full_check=True)
    assert r.parity["passed"] and r.parity["images"] == 3 and r.onnx_parity is r.parity
    assert r.parity["max_abs"] <= 1e-3 and r.parity["argmax_agreement"] >= 0.999
    assert r.eval_images == 8 and r.drop is not None and abs(r.drop) <= 0.005
    assert {"export_onnx", "verify_onnx", "miou_torch", "miou_onnx"} <= set(r.timings)


def test_evaluate_and_export_score_the_same_images(zoo_exports: dict) -> None:
    """One evaluation path: `evaluate` and export verification give the same PyTorch mIoU on the same images."""
    from kdcompress.engine.evaluation import evaluate_checkpoint

    r: ExportResult = zoo_exports["fp32"]
    for batch_size in (1, 8):
        ev = evaluate_checkpoint(zoo_exports["ckpt"], max_images=8, batch_size=batch_size, device="cpu", progress=False)
        assert ev["images"] == r.eval_images == 8 and ev["task"] == "segmentation"
        assert ev["mIoU"] == pytest.approx(r.miou_torch, abs=1e-6)
    side = read_sidecar(r.artifact)
    assert side["task"] == "segmentation" and side["parity"]["miou_torch"] == pytest.approx(ev["mIoU"], abs=1e-6)


def test_dynamic_batch_on_real_student(zoo_exports: dict) -> None:
    runner, ref = OrtRunner(zoo_exports["fp32"].artifact), TorchRunner(zoo_exports["model"])
    for b in (1, 3):
        x = np.random.default_rng(b).standard_normal((b, 3, 64, 64)).astype(np.float32)
        out = runner.infer(x)
        assert out.shape == (b, 11, 64, 64)
        assert compare_outputs(ref.infer(x), out)["max_abs"] <= 1e-3


def test_sidecar_contents(zoo_exports: dict) -> None:
    r: ExportResult = zoo_exports["fp32"]
    assert r.sidecar == sidecar_path(r.artifact) == r.artifact.with_name("model.onnx.json")
    side = json.loads(r.sidecar.read_text())
    assert side == read_sidecar(r.artifact)
    assert side["class_names"][0] == "background" and len(side["class_names"]) == 11
    assert side["input_size"] == [64, 64] and side["input"]["name"] == "input" and side["output"]["name"] == "logits"
    assert side["input"]["shape"] == ["batch", 3, 64, 64]
    assert side["dynamic_axes"] == {"input": {"0": "batch"}, "logits": {"0": "batch"}}
    assert side["normalization"] == {"mean": MEAN, "std": STD}
    assert side["precision"] == "fp32" and side["opset"] == 18 and side["kind"] == "onnx"
    for pkg in ("torch", "onnx", "onnxruntime"):
        assert side["versions"][pkg]
    assert side["source_checkpoint"]["sha256"] == hashlib.sha256(zoo_exports["ckpt"].read_bytes()).hexdigest()
    assert side["artifact_sha256"] == hashlib.sha256(r.artifact.read_bytes()).hexdigest()
    assert side["parity"]["passed"] is True and side["parity"]["miou_torch"] == pytest.approx(r.miou_torch)


def test_int8_end_to_end(zoo_exports: dict) -> None:
    r: ExportResult = zoo_exports["int8"]
    assert r.onnx_reused and r.onnx_fp32 == zoo_exports["fp32"].artifact
    assert "miou_torch" not in r.timings  # same checkpoint + same eval images: PyTorch mIoU reused from the sidecar
    assert r.miou_torch == zoo_exports["fp32"].miou_torch
    assert r.artifact.name == "model.int8.onnx" and r.artifact.is_file()
    ops = {n.op_type for n in onnx.load(str(r.artifact)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert 0.95 <= r.parity["argmax_agreement"] <= 1.0 and r.parity["passed"]
    assert r.onnx_parity == zoo_exports["fp32"].parity
    assert r.drop == pytest.approx(r.miou_torch - r.miou_artifact) and r.drop <= 0.03
    assert not hasattr(r, "speed")  # timing lives in profiling only
    side = read_sidecar(r.artifact)
    assert side["precision"] == "int8" and side["calibration"]["split"] == "train" and side["calibration"]["images"] == 8


def test_int8_finds_verified_onnx_under_another_name(zoo_exports: dict, tmp_path: Path) -> None:
    import shutil

    from kdcompress.export import _find_reusable_onnx
    from kdcompress.export.metadata import sha256_file

    src = zoo_exports["fp32"].artifact
    shutil.copy(src, tmp_path / "student.onnx")
    shutil.copy(sidecar_path(src), tmp_path / "student.onnx.json")
    sha = sha256_file(zoo_exports["ckpt"])
    found = _find_reusable_onnx(tmp_path / "model.onnx", tmp_path / "student.int8.onnx", sha, (64, 64), True, False, 18)
    assert found == tmp_path / "student.onnx"
    for other in [("0" * 64, (64, 64), True, False, 18), (sha, (32, 32), True, False, 18),
                  (sha, (64, 64), False, False, 18), (sha, (64, 64), True, False, 17)]:
        assert _find_reusable_onnx(tmp_path / "model.onnx", tmp_path / "x.int8.onnx", *other) is None
    (tmp_path / "student.onnx").write_bytes(src.read_bytes() + b"tampered")
    assert _find_reusable_onnx(tmp_path / "model.onnx", tmp_path / "x.int8.onnx", sha, (64, 64), True, False, 18) is None


def test_failed_int8_verification_leaves_nothing(zoo_exports: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    real_infer = OrtRunner.infer

    def noisy(self, x):
        out = real_infer(self, x)
        if "noisy" in self.path.name:  # the staged file (.noisy.staging.onnx) is what gets verified
            out = out + np.random.default_rng(0).normal(0, 10.0, out.shape).astype(np.float32)
        return out

    monkeypatch.setattr(OrtRunner, "infer", noisy)
    out = zoo_exports["dir"] / "noisy.int8.onnx"
    with pytest.raises(ExportError, match=r"argmax_agreement 0\.\d+ < limit 0\.95"):
        export_checkpoint(zoo_exports["ckpt"], "ort-int8", out_path=out, verify_images=1, max_eval_images=8,
                          calib_images=2, progress=False)
    assert not out.exists() and not sidecar_path(out).exists()
    assert zoo_exports["fp32"].artifact.is_file()  # the verified fp32 source is untouched
    assert not list(zoo_exports["dir"].glob(".noisy*"))  # no temp files either


# ---- fast error paths on a tiny stand-in architecture -------------------------------------

class TinySeg(nn.Module):
    def __init__(self, num_classes: int = 11, output_stride: int | None = None, pretrained: bool = False) -> None:
        super().__init__()
        self.arch = "tiny-test"
        self.enc = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.ReLU())
        self.cls = nn.Conv2d(8, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(self.cls(self.enc(x)), size=x.shape[-2:], mode="bilinear", align_corners=False)

    def check_input_size(self, size: tuple[int, int]) -> None:
        if size[0] % 8 or size[1] % 8:
            raise KdError(f"Input size {size[0]}x{size[1]} does not fit tiny-test: multiples of 8.")


@pytest.fixture
def tiny_ckpt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    real = kdcompress.models.build_model

    def build(name: str, num_classes: int, output_stride=None, pretrained=False):
        return TinySeg(num_classes) if name == "tiny-test" else real(name, num_classes, output_stride, pretrained)

    monkeypatch.setattr(kdcompress.models, "build_model", build)
    torch.manual_seed(0)

    def make(**meta_changes):
        meta = {**_meta("tiny-test"), **meta_changes}
        meta = {k: v for k, v in meta.items() if v is not ...}
        return save_model_checkpoint(tmp_path / "tiny.pt", TinySeg().eval(), meta)

    return make


def test_tiny_export_and_fp32_failure_leaves_nothing(tiny_ckpt, monkeypatch: pytest.MonkeyPatch) -> None:
    ckpt = tiny_ckpt()
    ok = export_checkpoint(ckpt, "onnx", verify_images=2, max_eval_images=4, progress=False)
    assert ok.artifact.is_file() and ok.parity["max_abs"] < 1e-4
    ok.artifact.unlink()
    ok.sidecar.unlink()
    real_infer = OrtRunner.infer
    monkeypatch.setattr(OrtRunner, "infer", lambda self, x: real_infer(self, x) + 0.01)
    with pytest.raises(ExportError, match=r"Verification failed .*max_abs 0\.01\d* > limit 0\.001"):
        export_checkpoint(ckpt, "onnx", verify_images=2, max_eval_images=4, progress=False)
    assert sorted(p.name for p in ckpt.parent.iterdir()) == ["tiny.pt"]


def test_failed_re_export_keeps_the_verified_artifact_byte_identical(tiny_ckpt, monkeypatch: pytest.MonkeyPatch) -> None:
    ckpt = tiny_ckpt()
    ok = export_checkpoint(ckpt, "onnx", verify_images=2, max_eval_images=4, progress=False)
    before = {p.name: p.read_bytes() for p in (ok.artifact, ok.sidecar)}
    real_infer = OrtRunner.infer
    monkeypatch.setattr(OrtRunner, "infer", lambda self, x: real_infer(self, x) + 0.01)
    with pytest.raises(ExportError, match="Verification failed"):
        export_checkpoint(ckpt, "onnx", verify_images=2, max_eval_images=4, progress=False)
    assert {p.name: p.read_bytes() for p in (ok.artifact, ok.sidecar)} == before
    assert sorted(p.name for p in ckpt.parent.iterdir()) == ["tiny.onnx", "tiny.onnx.json", "tiny.pt"]
    monkeypatch.setattr(OrtRunner, "infer", real_infer)
    again = export_checkpoint(ckpt, "onnx", verify_images=2, max_eval_images=4, progress=False)
    assert again.artifact == ok.artifact and read_sidecar(ok.artifact)["artifact"] == "tiny.onnx"


def test_miou_drop_limit_enforced(tiny_ckpt) -> None:
    ckpt = tiny_ckpt()
    with pytest.raises(ExportError, match=r"mIoU drop .* > limit -1"):
        export_checkpoint(ckpt, "onnx", verify_images=1, max_eval_images=2, tolerances={"max_miou_drop": -1.0},
                          progress=False)
    assert not (ckpt.parent / "tiny.onnx").exists()


def test_missing_metadata_is_checkpoint_error(tiny_ckpt) -> None:
    with pytest.raises(CheckpointError, match="lacks 'mean'"):
        export_checkpoint(tiny_ckpt(mean=...), "onnx", progress=False)
    with pytest.raises(CheckpointError, match="lacks 'input_size'.*--input-size"):
        export_checkpoint(tiny_ckpt(input_size=...), "onnx", progress=False)


def test_bad_input_size_and_options(tiny_ckpt) -> None:
    ckpt = tiny_ckpt()
    with pytest.raises(KdError, match="multiples of 8"):
        export_checkpoint(ckpt, "onnx", input_size=(60, 64), progress=False)
    with pytest.raises(ExportError, match="Unknown export target 'tflite'"):
        export_checkpoint(ckpt, "tflite", progress=False)
    with pytest.raises(ExportError, match="Precision 'fp16' is not available for --to onnx"):
        export_checkpoint(ckpt, "onnx", precision="fp16", progress=False)
    with pytest.raises(ExportError, match="opset >= 17"):
        export_checkpoint(ckpt, "onnx", opset=16, progress=False)
    with pytest.raises(ExportError, match="calibration set is empty"):
        export_checkpoint(ckpt, "ort-int8", calib_images=0, progress=False)
    assert sorted(p.name for p in ckpt.parent.iterdir()) == ["tiny.pt"]


def test_empty_calibration_set(tmp_path: Path) -> None:
    class Empty:
        def __len__(self) -> int:
            return 0

    with pytest.raises(ExportError, match="calibration set is empty"):
        calibration_images(Empty(), 8, (64, 64))
    with pytest.raises(ExportError, match="calibration set is empty"):
        quantize_int8(tmp_path / "in.onnx", tmp_path / "out.onnx", [])
    assert not (tmp_path / "out.onnx").exists()


def test_tensorrt_without_tensorrt_fails_fast(tiny_ckpt) -> None:
    import importlib.util

    if importlib.util.find_spec("tensorrt") is not None and torch.cuda.is_available():
        pytest.skip("TensorRT is available here")
    ckpt = tiny_ckpt()
    with pytest.raises(MissingDependencyError) as ei:
        export_checkpoint(ckpt, "tensorrt", progress=False)
    assert ei.value.exit_code == 4
    assert sorted(p.name for p in ckpt.parent.iterdir()) == ["tiny.pt"]  # nothing exported first


def test_int8_on_tiny_model_with_varied_predictions(tiny_ckpt) -> None:
    """Random zoo students predict one class everywhere (activations vanish with untrained BN
    statistics), which makes argmax agreement trivial; this shallow model's predictions vary per pixel."""
    ckpt = tiny_ckpt()
    r = export_checkpoint(ckpt, "ort-int8", verify_images=4, max_eval_images=8, calib_images=8, progress=False)
    x = np.random.default_rng(0).standard_normal((1, 3, 64, 64)).astype(np.float32)
    pred = OrtRunner(r.onnx_fp32).infer(x).argmax(1)
    assert len(np.unique(pred)) >= 3
    assert 0.95 <= r.parity["argmax_agreement"] < 1.0  # int8 changes some pixels, within the default limit
    assert r.drop == pytest.approx(r.miou_torch - r.miou_artifact) and r.drop <= 0.03
