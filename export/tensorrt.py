"""TensorRT engines (10.x and 11.x) from the verified fp32 ONNX (Python API; imported lazily).

Precision is explicit on both majors: networks are *strongly typed* (the ONNX says which type
each tensor has; TensorRT 11 removed the weak-typing ``BuilderFlag.FP16``/``INT8`` and implicit
INT8 calibration). fp16 builds from a mixed-precision copy of the fp32 ONNX (float16 weights and
activations, fp32 inputs/outputs); int8 builds from a TensorRT-compatible Q/DQ ONNX (symmetric
INT8 activations and per-channel weights, float biases) that ONNX Runtime quantised, that passed
:func:`kdcompress.export.ort_quant.check_trt_qdq` and that was verified on CPU before any engine
is built. The TensorRT attributes used here are listed, with where they were confirmed, in
:mod:`kdcompress.export.trt_api`.

The plan is written *plain* (no JSON header) so ``trtexec --loadEngine`` and any TensorRT
application can load it; what it was built with lives in ``<engine>.json``. Engines are tied to
the TensorRT version and GPU compute capability that built them (unless built version-compatible
or with a hardware-compatibility level), so the loader compares the sidecar with this machine
and refuses with both named instead of failing inside ``deserialize_cuda_engine``.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from kdcompress.errors import ExportError, KdError, MissingDependencyError
from kdcompress.export.trt_api import SUPPORTED_MAJORS, SUPPORTED_SPEC
from kdcompress.versions import tensorrt_distributions, trt_version_installed  # noqa: F401 (re-exported)

PRECISIONS = ("fp32", "fp16", "int8")
TRT_MISSING = "TensorRT is not installed: pip install 'kdcompress[tensorrt]' (needs an NVIDIA GPU)"
#: Key of the ONNX metadata_props entry that records how a cached Q/DQ ONNX was made and verified.
QDQ_META_KEY = "kdcompress.trt_qdq"
QDQ_FORMAT = "kdcompress.trt-qdq/1"

Shape = tuple[int, int, int, int]


class TensorRTCompatWarning(UserWarning):
    """An engine/timing cache that TensorRT accepts but that may be slower or was rebuilt."""


def _supported_text() -> str:
    return " and ".join(f"{m}.x" for m in SUPPORTED_MAJORS)


def _major_of(version: Any) -> int | None:
    m = re.match(r"\s*(\d+)", str(version))
    return int(m.group(1)) if m else None


def import_tensorrt() -> Any:
    """``import tensorrt`` of a supported major, or a one-line MissingDependencyError (exit code 4).

    Only ``__version__`` is read before the major is known to be supported, so a TensorRT 9 or
    12 install fails here with both versions named, never with an AttributeError later.
    """
    try:
        import tensorrt as trt  # type: ignore[import-not-found]
    except ImportError as e:
        raise MissingDependencyError(TRT_MISSING) from e
    except OSError as e:  # wheel present but libnvinfer / CUDA libraries missing
        raise MissingDependencyError(f"TensorRT is installed but cannot load its libraries ({e}). "
                                     f"Install a CUDA driver and matching TensorRT wheel.") from e
    version = getattr(trt, "__version__", None)
    major = _major_of(version)
    if major not in SUPPORTED_MAJORS:
        installed = f"TensorRT {version}" if version is not None else "a TensorRT module without __version__"
        raise MissingDependencyError(f"{installed} is installed but kdcompress supports TensorRT {_supported_text()} "
                                     f"({SUPPORTED_SPEC}): pip install 'kdcompress[tensorrt]'.")
    return trt


def require_cuda() -> None:
    """TensorRT needs a visible CUDA device; say so instead of failing in the builder."""
    import torch

    if not torch.cuda.is_available():
        raise MissingDependencyError("TensorRT needs an NVIDIA GPU, but torch.cuda.is_available() is False. "
                                     "Run on a CUDA machine or export --to onnx / ort-int8 instead.")


def current_gpu() -> dict[str, Any]:
    import torch

    idx = torch.cuda.current_device()
    major, minor = torch.cuda.get_device_capability(idx)
    return {"name": torch.cuda.get_device_name(idx), "compute_capability": f"{major}.{minor}"}


def validate_profile(input_dims: Sequence[int], min_shape: Sequence[int] | None = None,
                     opt_shape: Sequence[int] | None = None, max_shape: Sequence[int] | None = None,
                     max_batch: int = 8) -> tuple[Shape, Shape, Shape]:
    """Check (and default) an optimisation profile against the network input's dims.

    ``input_dims`` uses -1 for dynamic axes (as TensorRT reports them). Static axes must be
    matched exactly; dynamic ones need 1 <= min <= opt <= max. Missing shapes default to the
    static dims with batch 1 (min, opt) and ``max_batch`` (max) when batch is dynamic.
    """
    dims = [int(d) for d in input_dims]
    if len(dims) != 4:
        raise ExportError(f"the ONNX input has rank {len(dims)}; TensorRT export expects N x 3 x H x W.")
    dynamic = [i for i, d in enumerate(dims) if d < 0]
    if any(i in dynamic for i in (2, 3)) and (min_shape is None or max_shape is None):
        raise ExportError("the ONNX model has dynamic height/width: pass min_shape and max_shape (and opt_shape) "
                          "for the TensorRT optimisation profile, e.g. --min-shape 1x3x256x256 --max-shape 1x3x1024x1024.")

    def default(batch: int) -> list[int]:
        return [batch if (i == 0 and d < 0) else d for i, d in enumerate(dims)]

    shapes: list[list[int]] = []
    for label, given, fallback in (("min", min_shape, default(1)), ("opt", opt_shape, None),
                                   ("max", max_shape, default(max_batch if 0 in dynamic else 1))):
        if given is None:
            shapes.append(fallback if fallback is not None else [])
            continue
        s = [int(v) for v in given]
        if len(s) != 4 or any(v <= 0 for v in s):
            raise ExportError(f"{label}_shape {list(given)} must be 4 positive integers (N, 3, H, W).")
        for i, (v, d) in enumerate(zip(s, dims)):
            if d >= 0 and v != d:
                raise ExportError(f"{label}_shape {s} does not match the ONNX input {dims} on axis {i} "
                                  f"(static {d}); only axes exported as dynamic may vary. Re-export with dynamic axes.")
        shapes.append(s)
    lo, opt, hi = shapes
    if not opt:  # opt defaults to min: batch 1 is the latency case the engine is tuned for
        opt = list(lo)
    for i in range(4):
        if not lo[i] <= opt[i] <= hi[i]:
            raise ExportError(f"optimisation profile needs min <= opt <= max on every axis; axis {i} has "
                              f"{lo[i]} / {opt[i]} / {hi[i]} (min {lo}, opt {opt}, max {hi}).")
    return tuple(lo), tuple(opt), tuple(hi)  # type: ignore[return-value]


# ---- compatibility -----------------------------------------------------------------------------

def _cc_tuple(cc: Any) -> tuple[int, int] | None:
    m = re.match(r"\s*(\d+)\.(\d+)", str(cc))
    return (int(m.group(1)), int(m.group(2))) if m else None


def _version_tuple(v: Any) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", str(v))[:3])


def check_engine_compat(recorded: dict[str, Any], trt_version: str, gpu: dict[str, Any],
                        path: str | Path = "engine") -> list[str]:
    """Refuse a plan this machine cannot run; return warnings for what only may be slower (pure function).

    ``recorded`` is the sidecar's ``tensorrt`` section (``version``, ``gpu``, ``compute_capability``,
    ``hardware_compatibility_level``, ``version_compatible``); ``gpu`` is :func:`current_gpu`'s
    ``{"name", "compute_capability"}``. TensorRT ties a plan to the TensorRT version and the
    compute capability that built it: another version is refused unless the plan was built
    version-compatible (then only a newer runtime of the same major, or 10 -> 11, is accepted);
    another compute capability is refused unless it was built with hardware-compatibility level
    ``AMPERE_PLUS`` (and this GPU is >= 8.0). Another GPU *name* with the same compute capability
    only warns.
    """
    rec_ver = recorded.get("version")
    rec_cc = recorded.get("compute_capability")
    if rec_ver is None or rec_cc is None:
        missing = " and ".join(k for k, v in (("TensorRT version", rec_ver), ("compute capability", rec_cc)) if v is None)
        raise ExportError(f"the sidecar of '{path}' does not record the {missing} it was built with. "
                          f"Rebuild the engine with `kdcompress export --to tensorrt`.")
    here_name, here_cc = str(gpu.get("name")), str(gpu.get("compute_capability"))
    rec_gpu = recorded.get("gpu")
    hw_level = str(recorded.get("hardware_compatibility_level") or "NONE").split(".")[-1].upper()
    version_compatible = bool(recorded.get("version_compatible"))
    problems: list[str] = []
    notes: list[str] = []
    if str(rec_ver) != str(trt_version):
        built, here = _version_tuple(rec_ver), _version_tuple(trt_version)
        ok_vc = version_compatible and built and here and here >= built and (here[0] == built[0] or (built[0], here[0]) == (10, 11))
        if ok_vc:
            notes.append(f"'{path}' was built version-compatible with TensorRT {rec_ver}; running it with {trt_version}")
        else:
            problems.append(f"TensorRT {rec_ver} (this machine has {trt_version})")
    if str(rec_cc) != here_cc:
        here_t = _cc_tuple(here_cc)
        if hw_level == "AMPERE_PLUS" and here_t is not None and here_t >= (8, 0):
            notes.append(f"'{path}' was built for compute capability {rec_cc} with hardware compatibility AMPERE_PLUS; "
                         f"running it on {here_cc} ('{here_name}') may be slower than a native build")
        else:
            who = f" ('{rec_gpu}')" if rec_gpu else ""
            problems.append(f"compute capability {rec_cc}{who} (this machine's '{here_name}' is {here_cc})")
    elif rec_gpu is not None and str(rec_gpu) != here_name:
        notes.append(f"'{path}' was built on '{rec_gpu}' and runs on '{here_name}' (same compute capability {here_cc}): "
                     f"TensorRT accepts it, but rebuild here for the best tactics")
    if problems:
        raise ExportError(f"Engine '{path}' was built for {' and '.join(problems)}: TensorRT engines are tied to the "
                          f"TensorRT version and GPU compute capability that built them. Rebuild it here with "
                          f"`kdcompress export --to tensorrt`.")
    return notes


# ---- timing cache ------------------------------------------------------------------------------

def timing_cache_path(base: str | Path, trt_version: str, compute_capability: str) -> Path:
    """``timing.cache`` -> ``timing.trt10.3.0-sm86.cache``: one cache per TensorRT version and GPU."""
    base = Path(base)
    key = f"trt{trt_version}-sm{str(compute_capability).replace('.', '')}"
    return base.with_name(f"{base.stem}.{key}{base.suffix}") if base.suffix else base.with_name(f"{base.name}.{key}")


def _attach_timing_cache(config: Any, path: Path) -> str:
    """Load ``path`` into ``config``; a cache TensorRT rejects is replaced by a fresh one (warning)."""
    blob = path.read_bytes() if path.is_file() else b""
    status = "loaded" if blob else "new"
    try:
        tcache = config.create_timing_cache(blob)
    except Exception as e:  # corrupt / foreign file: TensorRT raises instead of returning None
        warnings.warn(f"timing cache '{path}' is unreadable ({type(e).__name__}); starting a fresh one.",
                      TensorRTCompatWarning, stacklevel=3)
        tcache, status = config.create_timing_cache(b""), "rejected (unreadable), rebuilt"
    if tcache is None or not config.set_timing_cache(tcache, False):  # False: never use another GPU's/version's timings
        warnings.warn(f"timing cache '{path}' was rejected by TensorRT (another GPU or TensorRT version?); "
                      f"starting a fresh one.", TensorRTCompatWarning, stacklevel=3)
        tcache = config.create_timing_cache(b"")
        if not config.set_timing_cache(tcache, False):
            raise ExportError("TensorRT refused an empty timing cache; rebuild without a timing cache.")
        status = "rejected (mismatch), rebuilt"
    return status


# ---- network ONNX per precision ----------------------------------------------------------------

def _toposort(graph: Any) -> None:
    """Order ``graph.node`` so every input is produced before use (converters append Casts at the end)."""
    ready = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        rest = []
        for n in pending:
            if all(i in ready for i in n.input):
                ordered.append(n)
                ready.update(n.output)
            else:
                rest.append(n)
        if len(rest) == len(pending):
            raise ExportError(f"the fp16 ONNX graph has a cycle or a dangling input at node '{rest[0].name}' "
                              f"({rest[0].op_type}). Report this with the model name.")
        pending = rest
    del graph.node[:]
    graph.node.extend(ordered)


def _fp16_converter() -> tuple[Callable[..., Any], str]:
    """``convert_float_to_float16`` from onnxconverter_common if installed, else ONNX Runtime's copy."""
    try:
        from onnxconverter_common.float16 import convert_float_to_float16  # type: ignore[import-not-found]

        return convert_float_to_float16, "onnxconverter_common.float16.convert_float_to_float16"
    except ImportError:
        pass
    try:
        from onnxruntime.transformers.float16 import convert_float_to_float16

        return convert_float_to_float16, "onnxruntime.transformers.float16.convert_float_to_float16"
    except ImportError as e:
        raise MissingDependencyError("fp16 TensorRT engines need an ONNX float16 converter: onnxruntime>=1.18 "
                                     "(onnxruntime.transformers.float16) or onnxconverter-common.") from e


def convert_fp16_onnx(fp32_onnx: str | Path, out_path: str | Path) -> tuple[Path, str]:
    """Mixed-precision copy of ``fp32_onnx``: float16 weights/activations, fp32 inputs and outputs.

    ``keep_io_types=True`` inserts Cast nodes after the input and before the output, so the
    engine keeps kdcompress's float32 I/O contract; ops the converter blocks (and Resize scales)
    stay fp32 behind their own Casts. Returns (path, converter name).
    """
    import onnx

    convert, name = _fp16_converter()
    model = onnx.load(str(fp32_onnx))
    try:
        m16 = convert(model, keep_io_types=True)
    except Exception as e:
        raise ExportError(f"fp16 conversion of '{Path(fp32_onnx).name}' failed: {type(e).__name__}: "
                          f"{(str(e).strip().splitlines() or [''])[0][:200]}. Build --precision fp32 instead.") from e
    _toposort(m16.graph)
    try:
        onnx.checker.check_model(m16, full_check=True)
    except Exception as e:
        raise ExportError(f"the fp16 ONNX made from '{Path(fp32_onnx).name}' is invalid: "
                          f"{(str(e).splitlines() or [''])[0][:200]}. Build --precision fp32 instead.") from e
    out_path = Path(out_path)
    onnx.save(m16, str(out_path))
    return out_path, name


def _qdq_record(path: Path) -> dict[str, Any] | None:
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:
        return None
    for p in model.metadata_props:
        if p.key == QDQ_META_KEY:
            try:
                rec = json.loads(p.value)
            except json.JSONDecodeError:
                return None
            return rec if isinstance(rec, dict) and rec.get("format") == QDQ_FORMAT else None
    return None


def _stamp_qdq(src: Path, dst: Path, record: dict[str, Any]) -> None:
    import onnx

    model = onnx.load(str(src))
    for p in list(model.metadata_props):
        if p.key == QDQ_META_KEY:
            model.metadata_props.remove(p)
    entry = model.metadata_props.add()
    from kdcompress.export.metadata import _jsonable

    entry.key, entry.value = QDQ_META_KEY, json.dumps(_jsonable(record), default=str)
    onnx.save(model, str(dst))


def prepare_int8_qdq(
    fp32_onnx: str | Path,
    images: Sequence[np.ndarray],
    cache_path: str | Path | None,
    workdir: str | Path,
    tolerances: Any = None,
    verify: Callable[[Path], dict[str, Any]] | None = None,
) -> tuple[Path, dict[str, Any]]:
    """The verified TensorRT Q/DQ ONNX for ``fp32_onnx``: from ``cache_path`` when it still fits, else made now.

    A cache is reused only if it records the sha256 of this fp32 ONNX, passed its verification
    with the same tolerances, and still passes :func:`check_trt_qdq`; otherwise (or without a
    cache) ``images`` are quantised with :func:`quantize_int8_trt`, the graph is checked, and
    the result is verified in ONNX Runtime on CPU (``verify`` if given, else
    :func:`kdcompress.export.ort_quant.verify_int8_onnx`: parity against the fp32 ONNX and, when
    the fp32 ONNX has its sidecar, the mIoU drop on its validation split). Only a verified file
    is written to ``cache_path``. Returns (a copy inside ``workdir`` to build from, record).
    """
    from kdcompress.engine.checkpoint import atomic_write
    from kdcompress.engine.checkpoint import sha256_file
    from kdcompress.export.ort_quant import (TRT_QDQ_EXTRA_OPTIONS, check_trt_qdq, quantize_int8_trt, task_of_onnx,
                                             verify_int8_onnx)
    from kdcompress.export.verify import resolve_tolerances

    task = task_of_onnx(fp32_onnx)
    tol = resolve_tolerances("int8", tolerances, task)
    fp32_onnx, workdir = Path(fp32_onnx), Path(workdir)
    cache = Path(cache_path) if cache_path else None
    src_sha = sha256_file(fp32_onnx)
    build_copy = workdir / "network.int8.qdq.onnx"
    reason = None
    if cache is not None and cache.is_file():
        rec = _qdq_record(cache)
        if rec is None:
            reason = ("is not a kdcompress Q/DQ ONNX (a TensorRT calibration cache from an older kdcompress? "
                      "implicit INT8 calibration was removed)")
        elif rec.get("source_onnx_sha256") != src_sha:
            reason = "was quantised from another fp32 ONNX"
        elif not (rec.get("verification") or {}).get("passed") or rec.get("tolerances") != task.tolerance_dict(tol):
            reason = "was verified with other tolerances"
        else:
            problems = check_trt_qdq(cache)
            if problems:
                reason = f"fails the TensorRT Q/DQ check ({problems[0]})"
            else:
                shutil.copyfile(cache, build_copy)
                return build_copy, {**rec, "path": str(cache), "reused": True}
        if not images:
            raise ExportError(f"the INT8 cache '{cache}' {reason}, and no calibration images were given: "
                              f"pass --calib-images >= 1 (or delete the cache).")
        warnings.warn(f"INT8 cache '{cache}' {reason}; re-quantising.", TensorRTCompatWarning, stacklevel=2)
    if not images:
        raise ExportError("calibration set is empty: INT8 TensorRT engines need calibration images "
                          "(--calib-images >= 1) or a verified Q/DQ cache from an earlier build.")
    staged = workdir / "staged.int8.qdq.onnx"
    quantize_int8_trt(fp32_onnx, staged, images)
    problems = check_trt_qdq(staged)  # quantize_int8_trt checks too; the record stores the result
    verification = dict(verify(staged) if verify is not None else verify_int8_onnx(staged, fp32_onnx, images, tol))
    verification.setdefault("passed", True)  # a failed verification raises ExportError: nothing is cached
    record = {
        "format": QDQ_FORMAT,
        "source_onnx": fp32_onnx.name,
        "source_onnx_sha256": src_sha,
        "quantizer": "onnxruntime.quantization.quantize_static",
        "settings": {"quant_format": "QDQ", "activation_type": "QInt8", "weight_type": "QInt8", "per_channel": True,
                     "calibrate_method": "minmax", "extra_options": dict(TRT_QDQ_EXTRA_OPTIONS)},
        "calibration_images": len(images),
        "graph_check": {"problems": problems, "passed": not problems},
        "tolerances": task.tolerance_dict(tol),
        "verification": verification,
    }
    _stamp_qdq(staged, build_copy, record)
    if cache is not None:
        atomic_write(cache, lambda tmp: shutil.copyfile(build_copy, tmp))
    return build_copy, {**record, "path": str(cache) if cache else None, "reused": False}


def _fast_precision_supported(precision: str) -> bool:
    """fp16 needs compute capability >= 5.3, int8 >= 6.1 (torch's query; TensorRT 11 has no platform_has_* API)."""
    import torch

    major, minor = torch.cuda.get_device_capability()
    return (major, minor) >= ((5, 3) if precision == "fp16" else (6, 1))


def _logger(trt: Any, verbose: bool) -> Any:
    return trt.Logger(trt.Logger.VERBOSE if verbose else trt.Logger.WARNING)


# ---- build / load ------------------------------------------------------------------------------

def build_engine(
    onnx_path: str | Path,
    out_path: str | Path,
    precision: str = "fp16",
    calib_images: Sequence[np.ndarray] | Iterable[np.ndarray] | None = None,
    calib_cache: str | Path | None = None,
    min_shape: Sequence[int] | None = None,
    opt_shape: Sequence[int] | None = None,
    max_shape: Sequence[int] | None = None,
    workspace_mb: int = 4096,
    timing_cache: str | Path | None = None,
    max_batch: int = 8,
    verbose: bool = False,
    *,
    tolerances: Any = None,
    qdq_verify: Callable[[Path], dict[str, Any]] | None = None,
) -> tuple[Path, dict[str, Any]]:
    """Build a serialized TensorRT plan from the fp32 ONNX; returns (engine path, build info for the sidecar).

    The network is strongly typed, so the ONNX decides the precision: ``fp32`` builds the ONNX
    as is; ``fp16`` builds :func:`convert_fp16_onnx`'s mixed-precision copy; ``int8`` builds the
    verified Q/DQ ONNX of :func:`prepare_int8_qdq` (calibrated on ``calib_images``, cached at
    ``calib_cache`` and reused from there when it still fits; ``tolerances``/``qdq_verify`` set
    how it is verified before the build). A GPU without fast fp16/int8 is an error, never a silent
    fp32 build. ``timing_cache`` is a base path: the file used is keyed by TensorRT version and
    compute capability (:func:`timing_cache_path`).
    """
    if precision not in PRECISIONS:
        raise KdError(f"Unknown TensorRT precision '{precision}'. Available: {', '.join(PRECISIONS)}")
    if workspace_mb is None or int(workspace_mb) <= 0:
        raise ExportError(f"workspace_mb must be a positive number of MiB, got {workspace_mb!r}.")
    trt = import_tensorrt()
    require_cuda()
    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise ExportError(f"ONNX file '{onnx_path}' does not exist. Export it first with `kdcompress export --to onnx`.")
    if precision in ("fp16", "int8") and not _fast_precision_supported(precision):
        raise ExportError(f"this GPU ({current_gpu()['name']}) has no fast {precision} support; refusing to "
                          f"build a slower fp32 engine silently. Use --precision fp32.")
    images = list(calib_images) if calib_images is not None else []
    gpu = current_gpu()
    trt_version = str(trt.__version__)

    with tempfile.TemporaryDirectory(prefix="kd-trt-") as tmp:
        qdq_info: dict[str, Any] | None = None
        converter = None
        if precision == "fp32":
            network_onnx = onnx_path
        elif precision == "fp16":
            network_onnx, converter = convert_fp16_onnx(onnx_path, Path(tmp) / "network.fp16.onnx")
        else:  # the Q/DQ ONNX is verified on CPU before TensorRT sees it
            network_onnx, qdq_info = prepare_int8_qdq(onnx_path, images, calib_cache, tmp, tolerances, qdq_verify)

        logger = _logger(trt, verbose)
        builder = trt.Builder(logger)
        # Strongly typed: every tensor keeps the ONNX type (required on 10.x, always on in 11.x).
        network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(network_onnx)):
            errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
            raise ExportError(f"TensorRT could not parse the {precision} ONNX of '{onnx_path.name}' ({len(errors)} error(s)): "
                              f"{errors[0] if errors else 'unknown error'}. Try another --opset or a static shape.")
        if network.num_inputs != 1:
            raise ExportError(f"'{onnx_path.name}' has {network.num_inputs} inputs; kdcompress engines take one image tensor.")
        inp = network.get_input(0)
        lo, opt, hi = validate_profile(tuple(inp.shape), min_shape, opt_shape, max_shape, max_batch=max_batch)

        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_mb) << 20)
        profile = builder.create_optimization_profile()
        profile.set_shape(inp.name, lo, opt, hi)
        config.add_optimization_profile(profile)

        tcache_path = timing_cache_path(timing_cache, trt_version, gpu["compute_capability"]) if timing_cache else None
        tcache_status = _attach_timing_cache(config, tcache_path) if tcache_path is not None else None

        plan = builder.build_serialized_network(network, config)
        if plan is None:
            raise ExportError(f"TensorRT failed to build the {precision} engine for '{onnx_path.name}' (see the log above); "
                              f"try a larger --workspace-mb or another precision.")
        hw_level = config.hardware_compatibility_level
        version_compatible = bool(config.get_flag(trt.BuilderFlag.VERSION_COMPATIBLE))

        from kdcompress.engine.checkpoint import atomic_write

        out_path = Path(out_path)
        atomic_write(out_path, lambda t: t.write_bytes(memoryview(plan)))
        if tcache_path is not None:
            tcache = config.get_timing_cache()
            blob = bytes(memoryview(tcache.serialize()))
            atomic_write(tcache_path, lambda t: t.write_bytes(blob))

    types = {"fp32": ["fp32"], "fp16": ["fp16", "fp32"], "int8": ["int8", "fp32"]}[precision]
    info = {
        "version": trt_version,
        "major": _major_of(trt_version),
        "gpu": gpu["name"],
        "compute_capability": gpu["compute_capability"],
        "hardware_compatibility_level": str(getattr(hw_level, "name", hw_level)).split(".")[-1],
        "version_compatible": version_compatible,
        "strongly_typed": True,
        # Types present in the network (strong typing: TensorRT does not pick precisions per layer).
        "allowed_precisions": types,
        "network_onnx": {"fp32": "the verified fp32 ONNX",
                         "fp16": f"mixed-precision fp16 copy, fp32 I/O ({converter})",
                         "int8": "verified symmetric INT8 Q/DQ ONNX (ONNX Runtime quantize_static)"}[precision],
        "profile": {"input": inp.name, "min": list(lo), "opt": list(opt), "max": list(hi)},
        "workspace_mb": int(workspace_mb),
        "calibration_cache": (qdq_info or {}).get("path"),
        "calibration_images": 0 if qdq_info is None or qdq_info.get("reused") else int(qdq_info.get("calibration_images", 0)),
        "timing_cache": str(tcache_path) if tcache_path else None,
        "timing_cache_status": tcache_status,
    }
    if qdq_info is not None:
        info["qdq"] = qdq_info
    return out_path, info


def load_engine(path: str | Path, verbose: bool = False) -> tuple[Any, Any]:
    """(engine, runtime) after checking the sidecar's TensorRT version and compute capability.

    Another TensorRT version or compute capability is refused with both named (unless the plan
    was built version-compatible / hardware-compatible); another GPU name with the same compute
    capability only warns. The runtime is returned so the caller keeps it alive with the engine.
    """
    from kdcompress.export.metadata import read_sidecar

    path = Path(path)
    if not path.is_file():
        raise ExportError(f"engine '{path}' does not exist. Build it with `kdcompress export --to tensorrt`.")
    trt = import_tensorrt()
    require_cuda()
    sidecar = read_sidecar(path)
    recorded = sidecar.get("tensorrt") or {}
    for note in check_engine_compat(recorded, str(trt.__version__), current_gpu(), path):
        warnings.warn(note, TensorRTCompatWarning, stacklevel=2)
    runtime = trt.Runtime(_logger(trt, verbose))
    if recorded.get("version_compatible"):
        runtime.engine_host_code_allowed = True  # the plan embeds its lean runtime; it is our own artifact
    try:
        engine = runtime.deserialize_cuda_engine(path.read_bytes())
    except Exception:  # some releases raise instead of returning None on a foreign/corrupt plan
        engine = None
    if engine is None:
        raise ExportError(f"TensorRT {trt.__version__} could not deserialize '{path}': built by another TensorRT "
                          f"version or for another GPU, or corrupt. Rebuild it here with `kdcompress export --to tensorrt`.")
    return engine, runtime



# ----------------------------------------------------------------------------- the tensorrt export target

def build_tensorrt(job: Any) -> Any:
    """Build the engine from the verified fp32 ONNX, then verify it on the GPU against PyTorch.

    The engine loader reads the sidecar (TensorRT version, compute capability), so the engine is
    verified in place under an ArtifactGuard and removed with its sidecar on failure.
    """
    from kdcompress.export.metadata import build_sidecar, sidecar_path, write_sidecar
    from kdcompress.export.runners import TorchRunner, TrtRunner
    from kdcompress.export.verify import ArtifactGuard, check_metric_drop, images_of, metrics_of, verify_against

    prog, tol, precision, opts, task = job.prog, job.tol, job.precision, job.options, job.task
    artifact = job.artifact
    trt_cache = None
    if precision == "int8":
        trt_cache = Path(opts["calib_cache"]) if opts.get("calib_cache") else artifact.with_name(artifact.name + ".calib")
    # A calibration cache made by this run goes too if the engine fails (it would reproduce the failure).
    new_cache = [trt_cache] if trt_cache is not None and not trt_cache.exists() else []
    with ArtifactGuard(artifact, sidecar_path(artifact), *new_cache):
        with prog.stage("build_engine", f"build TensorRT {precision} engine"):
            # int8: the Q/DQ ONNX is verified in ORT (parity + mIoU drop, these tolerances) before the build
            _, trt_info = build_engine(job.fp32_path, artifact, precision, calib_images=job.calib, calib_cache=trt_cache,
                                       min_shape=opts.get("min_shape"), opt_shape=opts.get("opt_shape"),
                                       max_shape=opts.get("max_shape"), workspace_mb=opts.get("workspace_mb", 4096),
                                       timing_cache=opts.get("timing_cache"),
                                       tolerances=tol if precision == "int8" else None)
        extra = {"tensorrt": trt_info, "source_onnx": job.fp32_path.name}
        # The loader checks the sidecar's TensorRT version/compute capability, so write it before verifying.
        write_sidecar(artifact, build_sidecar(artifact, kind="tensorrt", precision=precision, opset=job.opset,
                                              parity={"passed": False, "status": "verifying"}, extra=extra,
                                              **job.common))
        with TrtRunner(artifact) as art_runner:
            torch_cuda = TorchRunner(job.model, "cuda")
            with prog.stage("verify_artifact", f"verify TensorRT {precision} against PyTorch"):
                parity = verify_against(torch_cuda, art_runner, images_of(job.val, job.verify_images), tol,
                                        task=task)
            with prog.stage("miou_artifact", f"{task.headline} TensorRT {precision}"):
                miou_art = metrics_of(art_runner, job.val, task, job.max_eval_images)[task.headline]
            drop = check_metric_drop(job.miou_torch, miou_art, tol, task, f"TensorRT {precision} '{artifact.name}'")
        parity.update(miou_torch=job.miou_torch, miou_artifact=miou_art, miou_drop=drop,
                      eval_images=job.eval_images(), eval_config=job.eval_config, passed=True)
        write_sidecar(artifact, build_sidecar(artifact, kind="tensorrt", precision=precision, opset=job.opset,
                                              parity=parity, extra=extra, **job.common))
    return job.result(parity, miou_art, drop)


def _preflight() -> None:
    import_tensorrt()
    require_cuda()
