"""Detector export with post-processing: PyTorch wrapper == torchvision eval output, ORT == wrapper, atomic writes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from kdcompress.errors import ExportError, KdError
from kdcompress.export.det_postprocess import ExportableDetector, export_detector_onnx
from kdcompress.models import build_model

SIZE = (96, 128)
CLASSES = 4


def _model(arch: str, seed: int = 0) -> torch.nn.Module:
    """Random weights, but scores spread across the threshold so post-processing has real work to do.

    Random heads give near-uniform scores below ``score_thresh`` and near-ties (whose order is
    arbitrary); per-class biases lift some scores over it and scaled weights separate them.
    """
    torch.manual_seed(seed)
    m = build_model(arch, num_classes=CLASSES).eval()
    det = m.detector
    with torch.no_grad():
        if arch.startswith("fasterrcnn"):
            cls = det.roi_heads.box_predictor.cls_score  # background-heavy: some images keep < D detections
            cls.weight.mul_(2.0)
            cls.bias.copy_(torch.tensor([3.35, 0.1, -0.1, 0.0]))
        else:
            cls = det.head.classification_head.cls_logits
            cls.weight.mul_(5.0)
            cls.bias.copy_(torch.tensor([-2.5, -1.5, -0.5, 0.5]).repeat(cls.bias.numel() // CLASSES))
    return m


def _limit(m: torch.nn.Module) -> int:
    det = m.detector
    return int(det.roi_heads.detections_per_img if hasattr(det, "roi_heads") else det.detections_per_img)


def _images(batch: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, *SIZE, generator=g)


@pytest.mark.parametrize("arch", ["retinanet-r18", "fcos-r18", "fasterrcnn-r18"])
def test_wrapper_equals_torchvision_postprocess(arch: str) -> None:
    m = _model(arch)
    x = _images(2)
    wrapper = ExportableDetector(m, max_detections=_limit(m)).eval()
    with torch.no_grad():
        ref = m(x)
        boxes, scores, labels, num = wrapper(x)
    assert boxes.shape == (2, _limit(m), 4) and labels.dtype == torch.int64 and num.dtype == torch.int64
    compared = 0
    for i, r in enumerate(ref):
        n = int(num[i])
        assert n == len(r["boxes"])
        torch.testing.assert_close(boxes[i, :n], r["boxes"], atol=1e-4, rtol=0)
        torch.testing.assert_close(scores[i, :n], r["scores"], atol=1e-6, rtol=0)
        assert torch.equal(labels[i, :n], r["labels"])
        assert not boxes[i, n:].any() and not scores[i, n:].any() and not labels[i, n:].any()
        assert bool((scores[i, :n].diff() <= 0).all())
        compared += n
    assert compared > 20


def test_max_detections_truncates_to_the_first_rows() -> None:
    m = _model("retinanet-r18")  # torchvision keeps up to 300 here
    x = _images(1)
    with torch.no_grad():
        ref = m(x)[0]
        boxes, scores, labels, num = ExportableDetector(m, max_detections=10)(x)
    assert len(ref["boxes"]) > 10 and int(num[0]) == 10
    torch.testing.assert_close(boxes[0], ref["boxes"][:10], atol=1e-4, rtol=0)
    assert torch.equal(labels[0], ref["labels"][:10])


def _ort(path: Path, x: torch.Tensor) -> list[np.ndarray]:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["input"]
    return sess.run(None, {"input": x.numpy()})


@pytest.mark.parametrize("arch,batch", [("retinanet-r18", 1), ("fcos-r18", 2), ("fasterrcnn-r18", 1)])
def test_onnx_matches_wrapper(arch: str, batch: int, tmp_path: Path) -> None:
    m = _model(arch)
    path = tmp_path / f"{arch}.onnx"
    names = export_detector_onnx(m, path, SIZE, batch=batch)
    assert names == ["boxes", "scores", "labels", "num_detections"]
    proto = onnx.load(str(path))
    assert [o.name for o in proto.graph.output] == names
    assert "NonMaxSuppression" in {n.op_type for n in proto.graph.node}
    assert [d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim] == [batch, 3, *SIZE]
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no temp file left behind

    x = _images(batch, seed=7)  # not the export's example input
    with torch.no_grad():
        ref = ExportableDetector(m)(x)
    out = _ort(path, x)
    assert [o.shape for o in out] == [tuple(r.shape) for r in ref]
    assert out[2].dtype == np.int64 and out[3].dtype == np.int64
    np.testing.assert_array_equal(out[3], ref[3].numpy())
    assert int(out[3].sum()) > 10
    np.testing.assert_array_equal(out[2], ref[2].numpy())
    np.testing.assert_allclose(out[0], ref[0].numpy(), atol=1e-3, rtol=0)
    np.testing.assert_allclose(out[1], ref[1].numpy(), atol=1e-5, rtol=0)


def test_raw_export_matches_heads(tmp_path: Path) -> None:
    m = _model("fcos-r18")
    path = tmp_path / "raw.onnx"
    names = export_detector_onnx(m, path, SIZE, raw=True)
    assert names == ["cls_logits", "bbox_regression", "bbox_ctrness"]
    assert "NonMaxSuppression" not in {n.op_type for n in onnx.load(str(path)).graph.node}
    x = _images(1, seed=3)
    with torch.no_grad():
        head = m.detector.head(list(m.features(x).values()))
    for name, got in zip(names, _ort(path, x)):
        np.testing.assert_allclose(got, head[name].numpy(), atol=1e-4, rtol=0)


def _fake_export(contents: bytes, fail: bool):
    """A stand-in for torch.onnx.export that writes ``contents`` to the target, then optionally dies."""
    def export(model, args, f, **kwargs):  # noqa: ANN001, ANN202
        Path(f).write_bytes(contents)
        if fail:
            raise RuntimeError("exporter crashed half-way")
    return export


@pytest.mark.parametrize("contents,fail", [(b"half an onnx", True), (b"not an onnx graph", False)])
def test_failed_export_leaves_existing_file(contents: bytes, fail: bool, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    m = _model("retinanet-r18")
    path = tmp_path / "det.onnx"
    path.write_bytes(b"previous artifact")
    monkeypatch.setattr(torch.onnx, "export", _fake_export(contents, fail))
    with pytest.raises(ExportError, match="failed|invalid"):
        export_detector_onnx(m, path, SIZE)
    assert path.read_bytes() == b"previous artifact"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["det.onnx"]
    assert m.training is False


def test_bad_requests_fail_before_writing(tmp_path: Path) -> None:
    m = _model("retinanet-r18")
    path = tmp_path / "det.onnx"
    with pytest.raises(ExportError, match="opset"):
        export_detector_onnx(m, path, SIZE, opset=10)
    with pytest.raises(KdError, match="multiples of 32"):
        export_detector_onnx(m, path, (100, 100))
    with pytest.raises(ExportError, match="max_detections"):
        ExportableDetector(m, max_detections=0)
    assert not any(tmp_path.iterdir())
