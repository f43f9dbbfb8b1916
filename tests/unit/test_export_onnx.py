"""ONNX export on small stand-in models: checker, names, ORT parity, dynamic axes, opset rules, runners."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kdcompress.errors import ExportError, KdError, MissingDependencyError
from kdcompress.export.onnx import export_onnx, onnx_opset, onnx_param_count
from kdcompress.export.runners import OrtRunner, TorchRunner
from kdcompress.tasks.segmentation import compare_outputs


class TinySeg(nn.Module):
    """Conv-BN-ReLU encoder at stride 2, image pooling, classifier, bilinear upsampling to input size."""

    def __init__(self, k: int = 5) -> None:
        super().__init__()
        self.enc = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.ReLU())
        self.cls = nn.Conv2d(8, k, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.enc(x)
        y = y + F.adaptive_avg_pool2d(y, 1)
        return F.interpolate(self.cls(y), size=x.shape[-2:], mode="bilinear", align_corners=False)

    def check_input_size(self, size: tuple[int, int]) -> None:
        if size[0] % 2 or size[1] % 2:
            raise KdError(f"Input size {size[0]}x{size[1]} does not fit: multiples of 2.")


def _model() -> TinySeg:
    torch.manual_seed(0)
    m = TinySeg().eval()
    with torch.no_grad():  # non-trivial BN statistics so folding is actually exercised
        m.enc[1].running_mean.uniform_(-0.5, 0.5)
        m.enc[1].running_var.uniform_(0.5, 2.0)
    return m


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory: pytest.TempPathFactory) -> tuple[TinySeg, Path]:
    m = _model()
    path = export_onnx(m, tmp_path_factory.mktemp("onnx") / "tiny.onnx", (32, 48))
    return m, path


def test_export_checks_names_and_parity(tiny_onnx: tuple[TinySeg, Path]) -> None:
    m, path = tiny_onnx
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    assert [i.name for i in proto.graph.input] == ["input"]
    assert [o.name for o in proto.graph.output] == ["logits"]
    assert onnx_opset(proto) == 18
    x = np.random.default_rng(0).standard_normal((1, 3, 32, 48)).astype(np.float32)
    with OrtRunner(path) as ort_runner:
        r = compare_outputs(TorchRunner(m).infer(x), ort_runner.infer(x))
    assert r["max_abs"] < 1e-4 and r["argmax_agreement"] == 1.0


def test_dynamic_batch_runs_batch_1_and_3(tiny_onnx: tuple[TinySeg, Path]) -> None:
    m, path = tiny_onnx
    dims = onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param == "batch" and [d.dim_value for d in dims[1:]] == [3, 32, 48]
    runner, ref = OrtRunner(path), TorchRunner(m)
    for b in (1, 3):
        x = np.random.default_rng(b).standard_normal((b, 3, 32, 48)).astype(np.float32)
        out = runner.infer(x)
        assert out.shape == (b, 5, 32, 48)
        assert compare_outputs(ref.infer(x), out)["max_abs"] < 1e-4


def test_static_batch_rejects_other_batch(tmp_path: Path) -> None:
    path = export_onnx(_model(), tmp_path / "static.onnx", (32, 32), dynamic_batch=False)
    runner = OrtRunner(path)
    assert runner.infer(np.zeros((1, 3, 32, 32), np.float32)).shape == (1, 5, 32, 32)
    with pytest.raises(ExportError, match="shape"):
        runner.infer(np.zeros((2, 3, 32, 32), np.float32))


def test_dynamic_spatial_names_axes(tmp_path: Path) -> None:
    m = _model()
    path = export_onnx(m, tmp_path / "dyn.onnx", (32, 32), dynamic_spatial=True)
    g = onnx.load(str(path)).graph
    assert [d.dim_param or d.dim_value for d in g.input[0].type.tensor_type.shape.dim] == ["batch", 3, "height", "width"]
    assert [d.dim_param or d.dim_value for d in g.output[0].type.tensor_type.shape.dim] == ["batch", 5, "height", "width"]
    x = np.random.default_rng(1).standard_normal((2, 3, 40, 64)).astype(np.float32)
    assert compare_outputs(TorchRunner(m).infer(x), OrtRunner(path).infer(x))["max_abs"] < 1e-4


@pytest.mark.parametrize("opset", [11, 16])
def test_old_opset_rejected(tmp_path: Path, opset: int) -> None:
    with pytest.raises(ExportError, match=r"opset >= 17"):
        export_onnx(_model(), tmp_path / "x.onnx", (32, 32), opset=opset)
    assert not (tmp_path / "x.onnx").exists()


def test_opset_newer_than_onnx_rejected(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="newer than the installed onnx"):
        export_onnx(_model(), tmp_path / "x.onnx", (32, 32), opset=onnx.defs.onnx_opset_version() + 1)


def test_input_size_checked_by_model(tmp_path: Path) -> None:
    with pytest.raises(KdError, match="multiples of 2"):
        export_onnx(_model(), tmp_path / "x.onnx", (33, 32))


def test_exporter_failure_is_one_export_error(tmp_path: Path) -> None:
    class DataDependent(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.sum() > 0:  # data-dependent control flow: torch.export refuses it
                return x
            return -x

    with pytest.raises(ExportError, match=r"torch.onnx.export \(dynamo\) failed"):
        export_onnx(DataDependent(), tmp_path / "x.onnx", (8, 8))
    assert not any(tmp_path.iterdir())  # no half-written file, no temp file


def test_onnx_param_count_matches_torch_without_bn(tmp_path: Path) -> None:
    m = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 1)).eval()
    path = export_onnx(m, tmp_path / "convs.onnx", (16, 16))
    assert onnx_param_count(path) == sum(p.numel() for p in m.parameters())


def test_ort_runner_refuses_missing_provider(tiny_onnx: tuple[TinySeg, Path]) -> None:
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("CUDA EP is available here")
    with pytest.raises(MissingDependencyError, match="CUDAExecutionProvider is not available"):
        OrtRunner(tiny_onnx[1], providers=["cuda"])


def test_ort_runner_reports_unsupported_opset(tmp_path: Path) -> None:
    from onnx import TensorProto, helper

    newest = onnx.defs.onnx_opset_version()
    node = helper.make_node("Relu", ["input"], ["logits"])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 2, 2])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 3, 2, 2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", newest)])
    path = tmp_path / "new.onnx"
    onnx.save(model, str(path))
    try:
        OrtRunner(path)
    except ExportError as e:
        assert "supports ai.onnx up to opset" in str(e) or "could not load" in str(e)
    else:
        pytest.skip(f"this ONNX Runtime runs opset {newest}")


def test_missing_onnx_file(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="does not exist"):
        OrtRunner(tmp_path / "nope.onnx")
