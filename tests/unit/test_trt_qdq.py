"""TensorRT-facing checks that need neither TensorRT nor a GPU.

* the INT8 Q/DQ ONNX made for TensorRT (ONNX Runtime ``quantize_static``, symmetric) passes the
  graph check and matches the fp32 ONNX in ONNX Runtime; the CPU (``ort-int8``) model does not;
* the Q/DQ cache is reused only when it still fits;
* the fp16 mixed-precision ONNX keeps fp32 I/O and runs;
* every ``tensorrt`` attribute export/tensorrt.py and export/runners.py use is in the checked list
  of :mod:`kdcompress.export.trt_api`, and nothing removed in TensorRT 11 is used.
"""

from __future__ import annotations

import ast
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kdcompress.errors import ExportError
from kdcompress.export.onnx import export_onnx
from kdcompress.export.ort_quant import check_trt_qdq, quantize_int8, quantize_int8_trt, verify_int8_onnx
from kdcompress.export.runners import OrtRunner
from kdcompress.tasks.segmentation import compare_outputs

SIZE = (32, 32)


class TinySeg(nn.Module):
    def __init__(self, num_classes: int = 5) -> None:
        super().__init__()
        self.enc = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.BatchNorm2d(16), nn.ReLU(),
                                 nn.Conv2d(16, 16, 3, 1, 1), nn.BatchNorm2d(16), nn.ReLU())
        self.cls = nn.Conv2d(16, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(self.cls(self.enc(x)), size=x.shape[-2:], mode="bilinear", align_corners=False)


def _images(seed: int, n: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((1, 3, *SIZE)).astype(np.float32) for _ in range(n)]


@pytest.fixture(scope="module")
def fp32_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model = TinySeg().eval()
    with torch.no_grad():  # non-trivial BN statistics, so folding and ranges matter
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
        model.cls.weight.mul_(4.0)  # logits with real margins between classes
    return export_onnx(model, tmp_path_factory.mktemp("qdq") / "tiny.onnx", SIZE, dynamic_batch=True)


@pytest.fixture(scope="module")
def qdq_models(fp32_onnx: Path) -> dict[str, Path]:
    calib = _images(1, 8)
    d = fp32_onnx.parent
    return {"trt": quantize_int8_trt(fp32_onnx, d / "tiny.trt.int8.onnx", calib),
            "ort": quantize_int8(fp32_onnx, d / "tiny.ort.int8.onnx", calib)}


def _parity(fp32: Path, cand: Path, level: str = "all") -> dict[str, float]:
    worst, agree = 0.0, []
    with OrtRunner(fp32) as ref, OrtRunner(cand, optimization_level=level) as run:
        for x in _images(2, 6):
            r = compare_outputs(ref.infer(x), run.infer(x))
            worst = max(worst, r["max_rel"])
            agree.append(r["argmax_agreement"])
    return {"max_rel": worst, "argmax_agreement": float(np.mean(agree))}


# ---- (a) the Q/DQ graph TensorRT builds ------------------------------------------------------

def test_trt_qdq_graph_is_tensorrt_compatible(fp32_onnx: Path, qdq_models: dict[str, Path]) -> None:
    import onnx
    from onnx import TensorProto, numpy_helper

    path = qdq_models["trt"]
    assert check_trt_qdq(path) == []
    model = onnx.load(str(path))
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    ops = {n.op_type for n in g.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert not any(op.startswith("QLinear") or op.endswith("Integer") for op in ops)
    qdq = [n for n in g.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    for n in qdq:
        assert n.domain in ("", "ai.onnx")
        zp = inits[n.input[2]]
        assert zp.data_type == TensorProto.INT8, n.name
        assert not numpy_helper.to_array(zp).any(), f"{n.name}: zero point not 0"
    # no UINT8 anywhere: initializers, graph I/O, inferred value types
    inferred = onnx.shape_inference.infer_shapes(model).graph
    assert all(t.data_type != TensorProto.UINT8 for t in g.initializer)
    assert all(v.type.tensor_type.elem_type != TensorProto.UINT8
               for v in list(inferred.input) + list(inferred.output) + list(inferred.value_info))
    # conv weights: int8 in [-127, 127] with one scale per output channel; biases stay float32
    producer = {o: n for n in g.node for o in n.output}
    convs = [n for n in g.node if n.op_type == "Conv"]
    assert len(convs) == 3
    for conv in convs:
        dq = producer[conv.input[1]]
        assert dq.op_type == "DequantizeLinear"
        w = numpy_helper.to_array(inits[dq.input[0]])
        assert w.dtype == np.int8 and w.min() >= -127
        assert numpy_helper.to_array(inits[dq.input[1]]).shape == (w.shape[0],)
        assert len(conv.input) == 3 and conv.input[2] in inits, "bias must be a float initializer"
        assert inits[conv.input[2]].data_type == TensorProto.FLOAT
    # activations per tensor
    for n in g.node:
        if n.op_type == "QuantizeLinear":
            assert numpy_helper.to_array(inits[n.input[1]]).size == 1


def test_trt_qdq_parity_in_onnxruntime(fp32_onnx: Path, qdq_models: dict[str, Path]) -> None:
    # as prepare_int8_qdq verifies it: Q/DQ simulated in float ("basic"), not ORT's int8 kernels, whose
    # non-VNNI (AVX2) path saturates (0.883 there) and says nothing about TensorRT
    sym = _parity(fp32_onnx, qdq_models["trt"], level="basic")
    asym = _parity(fp32_onnx, qdq_models["ort"])
    # the int8 default tolerance (0.95 argmax agreement); measured ~0.973, max_rel ~0.067 (ORT 1.31)
    assert sym["argmax_agreement"] >= 0.95, sym
    assert sym["max_rel"] <= 0.15, sym
    # symmetric activations cost a little resolution vs uint8 asymmetric (~0.98), never a different model
    assert sym["argmax_agreement"] >= asym["argmax_agreement"] - 0.03, (sym, asym)


def test_check_trt_qdq_flags_the_cpu_int8_model(qdq_models: dict[str, Path], fp32_onnx: Path) -> None:
    problems = check_trt_qdq(qdq_models["ort"])  # uint8 asymmetric activations + int32 quantized biases
    text = "\n".join(problems)
    assert "UINT8" in text and "zero point" in text and "quantized bias" in text
    assert all("\n" not in p for p in problems)
    assert any("no QuantizeLinear/DequantizeLinear" in p for p in check_trt_qdq(fp32_onnx))


def test_verify_int8_onnx_without_sidecar_uses_calibration_images(fp32_onnx: Path, qdq_models: dict[str, Path]) -> None:
    rep = verify_int8_onnx(qdq_models["trt"], fp32_onnx, _images(3, 4))
    assert rep["passed"] and rep["images"] == 4 and "calibration images" in rep["images_from"]
    with pytest.raises(ExportError, match="no images"):
        verify_int8_onnx(qdq_models["trt"], fp32_onnx, [])


def test_int8_qdq_cache_is_verified_and_reused(fp32_onnx: Path, tmp_path: Path) -> None:
    from kdcompress.export.tensorrt import QDQ_META_KEY, prepare_int8_qdq

    cache = tmp_path / "tiny.int8.engine.calib"
    path, rec = prepare_int8_qdq(fp32_onnx, _images(1, 6), cache, tmp_path)
    assert cache.is_file() and path.is_file() and not rec["reused"]
    assert rec["graph_check"]["passed"] and rec["verification"]["passed"] and rec["calibration_images"] == 6
    assert check_trt_qdq(cache) == []
    import onnx

    assert any(p.key == QDQ_META_KEY for p in onnx.load(str(cache)).metadata_props)
    # reused without images when it was made from this fp32 ONNX with the same tolerances
    _, again = prepare_int8_qdq(fp32_onnx, [], cache, tmp_path)
    assert again["reused"] and again["source_onnx_sha256"] == rec["source_onnx_sha256"]
    # other tolerances -> needs images to re-verify
    with pytest.raises(ExportError, match="other tolerances"):
        prepare_int8_qdq(fp32_onnx, [], cache, tmp_path, tolerances={"min_argmax_agreement": 0.99})
    # a TensorRT 10 calibration cache from an older kdcompress: refused without images, replaced with them
    legacy = tmp_path / "old.calib"
    legacy.write_bytes(b"TRT-100300-EntropyCalibration2\ninput: 3c010a14\n")
    with pytest.raises(ExportError, match="older kdcompress"):
        prepare_int8_qdq(fp32_onnx, [], legacy, tmp_path)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        _, fresh = prepare_int8_qdq(fp32_onnx, _images(1, 4), legacy, tmp_path)
    assert not fresh["reused"] and check_trt_qdq(legacy) == [] and any("re-quantising" in str(x.message) for x in w)
    with pytest.raises(ExportError, match="calibration set is empty"):
        prepare_int8_qdq(fp32_onnx, [], None, tmp_path)


def test_fp16_onnx_keeps_fp32_io(fp32_onnx: Path, tmp_path: Path) -> None:
    import onnx
    from onnx import TensorProto

    from kdcompress.export.tensorrt import convert_fp16_onnx

    out, converter = convert_fp16_onnx(fp32_onnx, tmp_path / "tiny.fp16.onnx")
    assert "convert_float_to_float16" in converter
    g = onnx.load(str(out)).graph
    assert [i.type.tensor_type.elem_type for i in g.input] == [TensorProto.FLOAT]
    assert [o.type.tensor_type.elem_type for o in g.output] == [TensorProto.FLOAT]
    inits = {t.name: t for t in g.initializer}
    conv_w = [inits[n.input[1]] for n in g.node if n.op_type == "Conv"]
    assert conv_w and all(t.data_type == TensorProto.FLOAT16 for t in conv_w)
    assert sum(n.op_type == "Cast" for n in g.node) >= 2
    seen = {i.name for i in g.input} | set(inits) | {""}
    for n in g.node:  # topologically sorted (the converter appends its Casts last)
        assert all(i in seen for i in n.input), n.name
        seen.update(n.output)
    try:
        run16 = OrtRunner(out)
    except Exception as e:  # some ORT CPU builds lack fp16 kernels; the structure above is what TensorRT needs
        pytest.skip(f"ONNX Runtime CPU cannot run fp16 here: {str(e)[:80]}")
    with run16, OrtRunner(fp32_onnx) as ref:
        for x in _images(4, 2):
            r = compare_outputs(ref.infer(x), run16.infer(x))
            assert r["argmax_agreement"] >= 0.99 and r["max_rel"] < 0.01


# ---- (b) the TensorRT API the code uses ------------------------------------------------------

ROOT = Path(__file__).resolve().parents[2]
TRT_FILES = [ROOT / "export" / "tensorrt.py", ROOT / "export" / "runners.py"]


def _dotted(node: ast.AST) -> str | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    return None


def _docstrings(tree: ast.AST) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                ids.add(id(first.value))
    return ids


def _trt_uses(path: Path) -> tuple[set[str], set[str], list[str]]:
    """(trt.<chain> uses, <TensorRT object>.<member> uses, identifiers + non-doc strings) of one file."""
    from kdcompress.export.trt_api import TRT_OBJECTS

    tree = ast.parse(path.read_text())
    module_uses: set[str] = set()
    member_uses: set[str] = set()
    parents = {id(c): p for p in ast.walk(tree) for c in ast.iter_child_nodes(p)}
    words: list[str] = []
    docs = _docstrings(tree)
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            words.append(node.attr)
            if isinstance(parents.get(id(node)), ast.Attribute):
                continue  # only the outermost chain: trt.Logger.VERBOSE, not trt.Logger
            chain = _dotted(node)
            if chain is None:
                continue
            for prefix in ("self.trt.", "trt."):
                if chain.startswith(prefix):
                    module_uses.add(chain[len(prefix):])
                    break
            else:
                obj, _, member = chain.rpartition(".")
                if obj in TRT_OBJECTS:
                    member_uses.add(f"{TRT_OBJECTS[obj]}.{member}")
        elif isinstance(node, ast.Name):
            words.append(node.id)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
            words.append(node.value)
    return module_uses, member_uses, words


@pytest.mark.parametrize("path", TRT_FILES, ids=lambda p: p.name)
def test_every_tensorrt_name_used_is_confirmed(path: Path) -> None:
    from kdcompress.export.trt_api import TRT_API

    module_uses, member_uses, _ = _trt_uses(path)
    assert module_uses, "the AST walk found no trt.<name> use: the test is broken"
    unknown = sorted((module_uses | member_uses) - set(TRT_API))
    assert not unknown, f"{path.name} uses TensorRT names not confirmed in export/trt_api.py: {unknown}"


@pytest.mark.parametrize("path", TRT_FILES, ids=lambda p: p.name)
def test_no_api_removed_in_tensorrt_11(path: Path) -> None:
    from kdcompress.export.trt_api import REMOVED_IN_11

    module_uses, member_uses, words = _trt_uses(path)
    used = module_uses | member_uses | set(words)
    for name in REMOVED_IN_11:
        leaf = name.split(".")[-1]
        assert name not in module_uses, f"{path.name} uses trt.{name} (removed in TensorRT 11)"
        if "." not in name:  # class / attribute names: must not appear as identifier, attribute or string
            assert leaf not in used, f"{path.name} uses '{leaf}' (removed in TensorRT 11 or not a TensorRT name)"
    for flag in ("FP16", "INT8", "BF16", "FP8"):
        assert f"BuilderFlag.{flag}" not in module_uses


def test_trt_api_list_is_well_formed() -> None:
    from kdcompress.export import trt_api

    assert trt_api.SUPPORTED_MAJORS == (10, 11) and trt_api.SUPPORTED_SPEC == "tensorrt>=10.0,<12"
    assert all(isinstance(v, str) and v for v in trt_api.TRT_API.values())
    assert not set(trt_api.TRT_API) & set(trt_api.REMOVED_IN_11)
    assert "bfloat16" in trt_api.TRT_API and "bf16" not in trt_api.TRT_API
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert f'tensorrt = ["{trt_api.SUPPORTED_SPEC}"]' in pyproject  # the extra pins what the code supports
