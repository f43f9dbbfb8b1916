"""ONNX Runtime static INT8 quantisation (QDQ, per-channel weights) calibrated on training images.

Calibration uses the *training* split so the validation split used to judge the result never
influences the quantisation ranges. Images go through the val transform (normalisation only)
and are resized to the export input size, i.e. exactly what the deployed model sees.
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from kdcompress.errors import ExportError, KdError

CALIBRATION_METHODS = ("minmax", "entropy", "percentile")


def _calibration_reader_class() -> type:
    from onnxruntime.quantization import CalibrationDataReader

    class ImageCalibrationReader(CalibrationDataReader):
        """Feeds one normalised 1 x 3 x H x W image per call; ``rewind`` restarts (ORT may read twice)."""

        def __init__(self, images: Sequence[np.ndarray], input_name: str = "input") -> None:
            self.images = [np.ascontiguousarray(im[None] if im.ndim == 3 else im, dtype=np.float32) for im in images]
            self.input_name = input_name
            self._pos = 0

        def get_next(self) -> dict[str, np.ndarray] | None:
            if self._pos >= len(self.images):
                return None
            self._pos += 1
            return {self.input_name: self.images[self._pos - 1]}

        def rewind(self) -> None:
            self._pos = 0

        def __len__(self) -> int:
            return len(self.images)

    return ImageCalibrationReader


def make_calibration_reader(images: Sequence[np.ndarray], input_name: str = "input") -> Any:
    """A ``CalibrationDataReader`` over in-memory images (built lazily: onnxruntime is optional at import)."""
    return _calibration_reader_class()(images, input_name)


def calibration_images(dataset: Any, n: int, size: tuple[int, int] | None = None) -> list[np.ndarray]:
    """``n`` evenly spread, normalised images of ``dataset`` resized to ``size`` (1 x 3 x H x W)."""
    import torch
    import torch.nn.functional as F

    from kdcompress.export.verify import images_of

    if n is None or n <= 0:
        raise ExportError(f"calibration set is empty: --calib-images must be >= 1 (got {n}).")
    imgs = []
    for img in images_of(dataset, n):
        if size is not None and tuple(img.shape[-2:]) != tuple(size):  # labels are not needed to calibrate
            img = F.interpolate(torch.from_numpy(img), size=tuple(size), mode="bilinear", align_corners=False).numpy()
        imgs.append(img)
    if not imgs:
        raise ExportError("calibration set is empty: the training split has no images. "
                          "Point --data-root at the dataset the model was trained on.")
    return imgs


def quantize_int8(
    fp32_onnx: str | Path,
    out_path: str | Path,
    calib_images: Sequence[np.ndarray] | Iterable[np.ndarray],
    per_channel: bool = True,
    calibrate_method: str = "minmax",
    activation_type: str = "quint8",
    reduce_range: bool | None = None,
    op_types: Sequence[str] | None = None,
) -> Path:
    """Static QDQ INT8 model of ``fp32_onnx`` for ONNX Runtime (CPU), written atomically to ``out_path``.

    ``op_types`` limits which operators are quantised (None: ORT's default set); a detector keeps its
    post-processing (box decoding, top-k, NMS) in fp32 by quantising only Conv/Gemm/MatMul.

    ``quant_pre_process`` (symbolic shape inference + ORT graph optimisation) runs first, as ORT
    recommends, so BN-folded convs and fused patterns are what gets quantised. Activations are
    uint8 (asymmetric) / weights int8 per output channel: the U8S8 combination ORT's x86 kernels
    are fast at. Not for TensorRT, which needs symmetric int8 everywhere: see
    :func:`quantize_int8_trt`.

    ``reduce_range`` (7-bit weights) defaults to on where the CPU has no VNNI (AVX2-only x86):
    there ORT's U8S8 kernels sum pairs of u8×s8 products in int16, which saturates with full
    8-bit weights (ORT's ``quantize_static`` docs). Measured on a Zen 2 EPYC: argmax agreement
    0.926 with 8-bit weights against the 0.95 limit on the tiny test model.
    """
    acts = {"quint8": "QUInt8", "qint8": "QInt8"}
    if activation_type not in acts:
        raise KdError(f"Unknown activation type '{activation_type}'. Available: {', '.join(acts)}")
    return _quantize_static(fp32_onnx, out_path, calib_images, per_channel=per_channel,
                            calibrate_method=calibrate_method, activation_type=acts[activation_type], extra_options=None,
                            reduce_range=(not cpu_has_vnni()) if reduce_range is None else reduce_range,
                            op_types=op_types)


def cpu_has_vnni() -> bool:
    """Whether this x86 CPU has VNNI (AVX512-VNNI or AVX-VNNI); True on other architectures."""
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64", "i686", "x86"):
        return True
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return True  # unknown (not Linux): keep full-range weights
    return "avx512_vnni" in flags or "avx_vnni" in flags


#: ``quantize_static`` options that give a TensorRT explicit-quantization graph (names as in
#: onnxruntime/quantization/quantize.py ``quantize_static`` docstring, ORT 1.18 - 1.31):
#: zero points 0 for activations and weights, biases left in float (TensorRT fuses them itself).
TRT_QDQ_EXTRA_OPTIONS: dict[str, Any] = {"ActivationSymmetric": True, "WeightSymmetric": True, "QuantizeBias": False}


def quantize_int8_trt(
    fp32_onnx: str | Path,
    out_path: str | Path,
    calib_images: Sequence[np.ndarray] | Iterable[np.ndarray],
    calibrate_method: str = "minmax",
) -> Path:
    """Q/DQ INT8 ONNX that TensorRT builds with explicit quantization (10.x and 11.x).

    TensorRT only runs *symmetric* INT8: activations and weights are ``QInt8`` with zero point
    0, weights per output channel (``per_channel=True``, int8 in [-127, 127]) and biases stay
    float. ``QuantFormat.QDQ`` keeps the float ops between QuantizeLinear/DequantizeLinear
    pairs, which is the form TensorRT's ONNX parser turns into INT8 kernels. The result is
    checked with :func:`check_trt_qdq`; a graph TensorRT would mis-build is an ExportError,
    never a file.
    """
    def check(path: Path) -> None:
        problems = check_trt_qdq(path)
        if problems:
            raise ExportError(f"the INT8 Q/DQ ONNX for TensorRT is not TensorRT-compatible ({len(problems)} problem(s)): "
                              f"{problems[0]}. Report this with the model name and onnxruntime version.")

    return _quantize_static(fp32_onnx, out_path, calib_images, per_channel=True, calibrate_method=calibrate_method,
                            activation_type="QInt8", extra_options=dict(TRT_QDQ_EXTRA_OPTIONS), check=check)


def _quantize_static(
    fp32_onnx: str | Path,
    out_path: str | Path,
    calib_images: Sequence[np.ndarray] | Iterable[np.ndarray],
    *,
    per_channel: bool,
    calibrate_method: str,
    activation_type: str,
    extra_options: dict[str, Any] | None,
    check: Any = None,
    reduce_range: bool = False,
    op_types: Sequence[str] | None = None,
) -> Path:
    import onnxruntime  # noqa: F401  (clear error below if missing)
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    images = list(calib_images)
    if not images:
        raise ExportError("calibration set is empty: no training images were found for INT8 calibration. "
                          "Pass --calib-images >= 1 and a --data-root with a training split.")
    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    if calibrate_method not in methods:
        raise KdError(f"Unknown calibration method '{calibrate_method}'. Available: {', '.join(methods)}")
    fp32_onnx = Path(fp32_onnx)
    if not fp32_onnx.is_file():
        raise ExportError(f"'{fp32_onnx}' does not exist: INT8 quantisation needs the fp32 ONNX first.")

    from kdcompress.engine.checkpoint import atomic_write

    with tempfile.TemporaryDirectory(prefix="kd-int8-") as tmp:
        pre = Path(tmp) / "preprocessed.onnx"
        quiet = logging.getLogger()
        old_level = quiet.level
        quiet.setLevel(logging.ERROR)  # quantize_static logs every node at INFO
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                quant_pre_process(str(fp32_onnx), str(pre), skip_symbolic_shape=False)
        except Exception as e:
            quiet.setLevel(old_level)
            raise ExportError(f"ONNX Runtime quant_pre_process failed: {type(e).__name__}: "
                              f"{str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}. Re-export the fp32 ONNX.") from e

        def write(tmp_out: Path) -> None:
            reader = make_calibration_reader(images)
            kwargs: dict[str, Any] = {}
            if extra_options:
                kwargs["extra_options"] = extra_options
            if op_types:
                kwargs["op_types_to_quantize"] = list(op_types)
            try:
                with contextlib.redirect_stdout(io.StringIO()):
                    quantize_static(
                        str(pre), str(tmp_out), reader,
                        quant_format=QuantFormat.QDQ,
                        per_channel=per_channel,
                        activation_type=getattr(QuantType, activation_type),
                        weight_type=QuantType.QInt8,
                        calibrate_method=methods[calibrate_method],
                        reduce_range=reduce_range,
                        **kwargs,
                    )
            except Exception as e:
                raise ExportError(f"ONNX Runtime static quantisation failed: {type(e).__name__}: "
                                  f"{str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}.") from e
            if check is not None:
                check(tmp_out)

        try:
            return atomic_write(Path(out_path), write)
        finally:
            quiet.setLevel(old_level)


# ---- TensorRT Q/DQ graph check ---------------------------------------------------------------

#: Ops of ORT's QOperator format / contrib quantisation: TensorRT's parser has no INT8 kernels for them.
_QOPERATOR_OPS = {"QLinearConv", "QLinearMatMul", "QLinearAdd", "QLinearMul", "QLinearSigmoid", "QLinearLeakyRelu",
                  "QLinearConcat", "QLinearAveragePool", "QLinearGlobalAveragePool", "QLinearReduceMean",
                  "QLinearSoftmax", "QLinearWhere", "QGemm", "QAttention", "ConvInteger", "MatMulInteger",
                  "DynamicQuantizeLinear", "DynamicQuantizeMatMul", "MatMulIntegerToFloat"}
_WEIGHT_INPUT = {"Conv": 1, "ConvTranspose": 1, "Gemm": 1, "MatMul": 1}


def check_trt_qdq(model: Any) -> list[str]:
    """Problems that stop TensorRT from building ``model`` (ONNX path or ModelProto) as explicit INT8.

    Empty list = compatible. Checked: there are Q/DQ nodes, all in the standard ONNX domain
    (no QOperator/contrib ops); every QuantizeLinear/DequantizeLinear has an explicit INT8 zero
    point that is all zeros and a positive finite float scale; no UINT8 tensor anywhere
    (initializers, inputs/outputs, inferred value types, Cast targets); activations are
    quantized per tensor; quantized Conv/ConvTranspose weights are int8 constants in
    [-127, 127] with a per-output-channel scale; Conv/ConvTranspose/Gemm biases are float
    constants, not dequantized int32.
    """
    import onnx
    from onnx import TensorProto, numpy_helper

    if isinstance(model, (str, Path)):
        model = onnx.load(str(model))
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # shape inference is only used to find UINT8 value types
        inferred = model
    g = inferred.graph
    problems: list[str] = []
    inits = {t.name: t for t in g.initializer}
    consts: dict[str, Any] = {}
    for n in g.node:
        if n.op_type == "Constant" and n.output:
            for a in n.attribute:
                if a.name == "value":
                    consts[n.output[0]] = a.t
    tensors = {**consts, **inits}
    producer = {o: n for n in g.node for o in n.output}
    consumers: dict[str, list[Any]] = {}
    for n in g.node:
        for i, name in enumerate(n.input):
            consumers.setdefault(name, []).append((n, i))

    def arr(name: str) -> np.ndarray | None:
        t = tensors.get(name)
        return numpy_helper.to_array(t) if t is not None else None

    opset = next((int(o.version) for o in inferred.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < 13:
        problems.append(f"opset {opset} < 13: per-channel DequantizeLinear (axis) needs opset >= 13")

    qnodes = [n for n in g.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    if not any(n.op_type == "QuantizeLinear" for n in qnodes) or not any(n.op_type == "DequantizeLinear" for n in qnodes):
        problems.append("the graph has no QuantizeLinear/DequantizeLinear pair: it is not quantized")
    for n in g.node:
        if n.op_type in _QOPERATOR_OPS:
            problems.append(f"node '{n.name}' is {n.op_type} (QOperator format); TensorRT needs QuantFormat.QDQ")
        elif n.domain not in ("", "ai.onnx"):
            problems.append(f"node '{n.name}' ({n.op_type}) is in domain '{n.domain}'; TensorRT needs standard ONNX ops")

    for n in qnodes:
        label = f"{n.op_type} '{n.name or n.output[0]}'"
        for a in n.attribute:
            if a.name == "output_dtype" and a.i not in (0, TensorProto.INT8):
                problems.append(f"{label} has output_dtype {TensorProto.DataType.Name(a.i)}; TensorRT needs INT8")
        if len(n.input) < 3 or not n.input[2]:
            problems.append(f"{label} has no zero point (ONNX then defaults to UINT8); TensorRT needs an INT8 zero point of 0")
        else:
            zp_t = tensors.get(n.input[2])
            if zp_t is None:
                problems.append(f"{label}: zero point '{n.input[2]}' is not a constant")
            else:
                if zp_t.data_type != TensorProto.INT8:
                    problems.append(f"{label}: zero point '{n.input[2]}' is {TensorProto.DataType.Name(zp_t.data_type)}, not INT8")
                zp = numpy_helper.to_array(zp_t)
                if np.any(zp != 0):
                    problems.append(f"{label}: zero point '{n.input[2]}' is not all 0 (max |zp| {int(np.abs(zp.astype(np.int64)).max())}); "
                                    f"TensorRT only supports symmetric quantization")
        scale = arr(n.input[1]) if len(n.input) > 1 else None
        if scale is None:
            problems.append(f"{label}: scale is not a constant")
            continue
        if scale.dtype.kind != "f" or not np.all(np.isfinite(scale)) or np.any(scale <= 0):
            problems.append(f"{label}: scale must be positive finite float (got dtype {scale.dtype}, min {float(np.min(scale)) if scale.size else 'n/a'})")
        weight = arr(n.input[0]) if n.op_type == "DequantizeLinear" else None
        if n.op_type == "QuantizeLinear" and scale.size != 1:
            src = producer.get(n.input[0])
            if not (n.input[0] in tensors or (src is not None and src.op_type == "Constant")):
                problems.append(f"{label}: activation scale has {scale.size} values; TensorRT needs per-tensor activation scales")
        if weight is not None:  # a constant being dequantized: a quantized weight (or bias)
            if weight.dtype != np.int8:
                problems.append(f"{label}: quantized constant '{n.input[0]}' is {weight.dtype}, not int8 "
                                f"({'a quantized bias; use QuantizeBias=False' if weight.dtype == np.int32 else 'TensorRT needs int8'})")
                continue
            if weight.size and int(weight.min()) < -127:
                problems.append(f"{label}: weight '{n.input[0]}' uses -128; TensorRT weights must lie in [-127, 127] (symmetric)")
            for cons, idx in consumers.get(n.output[0], []):
                if cons.op_type in ("Conv", "ConvTranspose") and idx == 1 and weight.ndim >= 3:
                    # output-channel axis: 0 for Conv (M x C/g x k x k), 1 for ConvTranspose (C x M/g x k x k)
                    channels = int(weight.shape[0 if cons.op_type == "Conv" else 1])
                    if channels > 1 and scale.size != channels:
                        problems.append(f"{label}: weight of {cons.op_type} '{cons.name}' has {scale.size} scale(s) for "
                                        f"{channels} output channels; TensorRT INT8 convs want per-channel weights (per_channel=True)")

    for n in g.node:
        if n.op_type in ("Conv", "ConvTranspose", "Gemm") and len(n.input) > 2 and n.input[2]:
            b = n.input[2]
            src = producer.get(b)
            if src is not None and src.op_type == "DequantizeLinear":
                problems.append(f"bias '{b}' of {n.op_type} '{n.name}' is quantized (DequantizeLinear of "
                                f"'{src.input[0]}'); TensorRT needs float biases (QuantizeBias=False)")
            else:
                t = tensors.get(b)
                if t is not None and t.data_type not in (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16):
                    problems.append(f"bias '{b}' of {n.op_type} '{n.name}' is {TensorProto.DataType.Name(t.data_type)}, not float")

    uint8 = TensorProto.UINT8
    for t in g.initializer:
        if t.data_type == uint8:
            problems.append(f"initializer '{t.name}' is UINT8; TensorRT needs INT8 (activation_type=QuantType.QInt8)")
    for name, t in consts.items():
        if t.data_type == uint8:
            problems.append(f"Constant '{name}' is UINT8; TensorRT needs INT8")
    for vi in list(g.input) + list(g.output) + list(g.value_info):
        if vi.type.tensor_type.elem_type == uint8:
            problems.append(f"tensor '{vi.name}' is UINT8; TensorRT needs INT8 (activation_type=QuantType.QInt8)")
    for n in g.node:
        if n.op_type == "Cast" and any(a.name == "to" and a.i == uint8 for a in n.attribute):
            problems.append(f"Cast '{n.name}' casts to UINT8; TensorRT needs INT8")
    # one line per problem, no duplicates, stable order
    return list(dict.fromkeys(problems))


# ---- verification of an INT8 ONNX on CPU (before TensorRT builds it) -------------------------

def _val_split_of(side: dict[str, Any] | None) -> tuple[Any, dict[str, Any]] | tuple[None, str]:
    """The validation split a fp32 ONNX was verified on, rebuilt from its sidecar (or None and why)."""
    if not side:
        return None, "the fp32 ONNX has no kdcompress sidecar"
    parity = side.get("parity") or {}
    ec = parity.get("eval_config") or {}
    if not ec or parity.get("miou_torch") is None or not side.get("dataset"):
        return None, "the fp32 ONNX sidecar records no evaluation set / PyTorch mIoU"
    from kdcompress.data import build_dataset, val_transform
    from kdcompress.engine.evaluate import Resized
    from kdcompress.tasks import task_for

    root = ec.get("data_root")
    root = None if root in (None, "None", "") else root
    norm = side.get("normalization") or {}
    try:
        ds = build_dataset(ec.get("dataset") or side["dataset"], root, ec.get("split", "val"),
                           val_transform(tuple(norm.get("mean") or ()), tuple(norm.get("std") or ())),
                           **dict(ec.get("data_options") or {}))
    except KdError as e:
        return None, f"its validation split is unavailable here ({str(e)[:120]})"
    size = ec.get("input_size") or side.get("input_size")
    return Resized(ds, task_for(ds.info), tuple(size) if size else None), ec


def task_of_onnx(onnx_path: str | Path) -> Any:
    """The task an ONNX file was exported for, from its sidecar (segmentation when it has none).

    Without a sidecar there are no labels, only output parity, so any label space will do."""
    from kdcompress.export.metadata import read_sidecar
    from kdcompress.tasks import task_from_meta

    try:
        side = read_sidecar(onnx_path, required=False) or {}
    except ExportError:
        side = {}
    return task_from_meta({"num_classes": side.get("num_classes") or 1, "task": side.get("task", "segmentation"),
                           "class_names": side.get("class_names")})


def verify_int8_onnx(
    candidate: str | Path,
    fp32_onnx: str | Path,
    calib_images: Sequence[np.ndarray] | Iterable[np.ndarray] = (),
    tolerances: Any = None,
    what: str = "INT8 Q/DQ ONNX for TensorRT",
) -> dict[str, Any]:
    """Verify an INT8 ONNX in ONNX Runtime (CPU) against its fp32 ONNX; ExportError when it fails.

    Same checks as ``--to ort-int8`` (:func:`kdcompress.export.verify.verify_against`,
    :func:`~kdcompress.export.verify.miou_of`, :func:`~kdcompress.export.verify.check_miou_drop`
    with the ``int8`` tolerances): when ``fp32_onnx`` has its kdcompress sidecar, argmax parity on
    as many validation images as the fp32 ONNX was checked on and the mIoU drop against the
    recorded PyTorch mIoU on the same evaluation set; otherwise parity on up to 8 of
    ``calib_images`` (recorded as such: no mIoU check is possible without labels).
    """
    from kdcompress.export.metadata import read_sidecar
    from kdcompress.export.runners import OrtRunner
    from kdcompress.export.verify import check_metric_drop, images_of, metrics_of, resolve_tolerances, verify_against

    try:
        side = read_sidecar(fp32_onnx, required=False)
    except ExportError:
        side = None
    val, ec = _val_split_of(side)
    task = val.task if val is not None else task_of_onnx(fp32_onnx)
    tol = resolve_tolerances("int8", tolerances, task)
    # "basic": ORT keeps the Q/DQ pairs as float fake-quantisation instead of fusing them into its own
    # int8 kernels, whose AVX2 (non-VNNI) S8S8 path saturates (argmax agreement 0.883 vs 0.973 on the
    # tiny test model, Zen 2): what TensorRT computes with int32 accumulation is the float simulation.
    with OrtRunner(fp32_onnx) as ref, OrtRunner(candidate, optimization_level="basic") as cand:
        if val is not None:
            n = int((side or {}).get("parity", {}).get("images") or 8)
            report = verify_against(ref, cand, images_of(val, n), tol, task=task)
            miou_ref = float(side["parity"]["miou_torch"])  # type: ignore[index]
            max_eval = ec.get("max_eval_images")  # type: ignore[union-attr]
            miou = metrics_of(cand, val, task, max_eval)[task.headline]
            drop = check_metric_drop(miou_ref, miou, tol, task, what)
            report.update(images_from="validation split (fp32 ONNX sidecar)", miou_torch=miou_ref, miou_artifact=miou,
                          miou_drop=drop, eval_images=len(val) if max_eval is None else min(len(val), int(max_eval)))
        else:
            imgs = list(calib_images)[:8]
            if not imgs:
                raise ExportError(f"cannot verify the {what}: {ec} and no images were given.")
            report = verify_against(ref, cand, imgs, tol, task=task)
            report.update(images_from=f"calibration images ({ec}; mIoU not checked)", miou_drop=None)
    report["passed"] = True
    report["runtime"] = "onnxruntime CPUExecutionProvider, basic optimisation (Q/DQ simulated in float)"
    return report


# ----------------------------------------------------------------------------- the ort-int8 export target

def build_ort_int8(job: Any) -> Any:
    """Quantize the verified fp32 ONNX (static QDQ) and verify the INT8 model against PyTorch."""
    from kdcompress.export.metadata import build_sidecar
    from kdcompress.export.verify import StagedArtifact, check_metric_drop, images_of, metrics_of, verify_against
    from kdcompress.runtime import OrtRunner

    prog, tol, task = job.prog, job.tol, job.task
    with StagedArtifact(job.artifact) as staged:
        with prog.stage("quantize", f"quantize INT8 (QDQ, per-channel, {len(job.calib)} calibration images)"):
            quantize_int8(job.fp32_path, staged.tmp, job.calib, op_types=task.int8_op_types)
        with OrtRunner(staged.tmp) as art_runner:
            with prog.stage("verify_artifact", "verify INT8 against PyTorch"):
                parity = verify_against(job.torch_ref, art_runner, images_of(job.val, job.verify_images), tol,
                                        task=task)
            with prog.stage("miou_artifact", f"{task.headline} INT8"):
                miou_art = metrics_of(art_runner, job.val, task, job.max_eval_images)[task.headline]
            drop = check_metric_drop(job.miou_torch, miou_art, tol, task, f"INT8 '{job.artifact.name}'")
        extra = {"calibration": {"split": "train", "images": len(job.calib), "method": "minmax",
                                 "format": "QDQ", "per_channel": True, "activations": "uint8", "weights": "int8"},
                 "source_onnx": job.fp32_path.name}
        parity.update(miou_torch=job.miou_torch, miou_artifact=miou_art, miou_drop=drop,
                      eval_images=job.eval_images(), eval_config=job.eval_config, passed=True)
        staged.commit(build_sidecar(staged.tmp, kind="ort-int8", precision=job.precision, opset=job.opset,
                                    parity=parity, extra=extra, **job.common))
    return job.result(parity, miou_art, drop)
