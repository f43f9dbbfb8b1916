"""TensorRT 10 engines from the verified fp32 ONNX (Python API; imported lazily).

The plan is written *plain* (no JSON header) so ``trtexec --loadEngine`` and any TensorRT
application can load it; what it was built with lives in ``<engine>.json``. Engines are only
valid for the TensorRT version and GPU that built them, so the loader compares the sidecar
with the current machine and refuses with both versions named instead of crashing inside
``deserialize_cuda_engine``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from kdcompress.errors import ExportError, KdError, MissingDependencyError

PRECISIONS = ("fp32", "fp16", "int8")
TRT_MISSING = "TensorRT is not installed: pip install 'kdcompress[tensorrt]' (needs an NVIDIA GPU)"

Shape = tuple[int, int, int, int]


def import_tensorrt() -> Any:
    """``import tensorrt`` or a one-line MissingDependencyError (exit code 4)."""
    try:
        import tensorrt as trt  # type: ignore[import-not-found]
    except ImportError as e:
        raise MissingDependencyError(TRT_MISSING) from e
    except OSError as e:  # wheel present but libnvinfer / CUDA libraries missing
        raise MissingDependencyError(f"TensorRT is installed but cannot load its libraries ({e}). "
                                     f"Install a CUDA driver and matching TensorRT wheel.") from e
    major = int(str(trt.__version__).split(".")[0])
    if major < 10:
        raise MissingDependencyError(f"TensorRT {trt.__version__} is too old: kdcompress needs TensorRT >= 10 "
                                     f"(pip install 'kdcompress[tensorrt]').")
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


def check_engine_compat(recorded: dict[str, Any], trt_version: str, gpu_name: str, path: str | Path = "engine") -> None:
    """Refuse an engine built with another TensorRT version or on another GPU (pure function).

    ``recorded`` is the sidecar's ``tensorrt`` section: ``{"version": ..., "gpu": ...}``.
    """
    rec_ver = recorded.get("version")
    rec_gpu = recorded.get("gpu")
    if rec_ver is None or rec_gpu is None:
        raise ExportError(f"the sidecar of '{path}' does not record the TensorRT version/GPU it was built with. "
                          f"Rebuild the engine with `kdcompress export --to tensorrt`.")
    problems = []
    if str(rec_ver) != str(trt_version):
        problems.append(f"TensorRT {rec_ver} (this machine has {trt_version})")
    if str(rec_gpu) != str(gpu_name):
        problems.append(f"GPU '{rec_gpu}' (this machine has '{gpu_name}')")
    if problems:
        raise ExportError(f"Engine '{path}' was built for {' and '.join(problems)}: TensorRT engines are not portable. "
                          f"Rebuild it here with `kdcompress export --to tensorrt`.")


def _logger(trt: Any, verbose: bool) -> Any:
    return trt.Logger(trt.Logger.VERBOSE if verbose else trt.Logger.WARNING)


def _make_calibrator(trt: Any, images: Sequence[np.ndarray], cache_path: Path | None, batch_size: int = 1) -> Any:
    """An ``IInt8EntropyCalibrator2`` feeding torch CUDA tensors; reads/writes the calibration cache."""
    import torch

    class EntropyCalibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self) -> None:
            trt.IInt8EntropyCalibrator2.__init__(self)  # required by the pybind trampoline
            self.images = [np.ascontiguousarray(im[None] if im.ndim == 3 else im, dtype=np.float32) for im in images]
            self.batch_size = batch_size
            self.pos = 0
            self.buffer: torch.Tensor | None = None  # kept alive while TensorRT reads it

        def get_batch_size(self) -> int:
            return self.batch_size

        def get_batch(self, names: list[str]) -> list[int] | None:
            if self.pos + self.batch_size > len(self.images):
                return None
            batch = np.concatenate(self.images[self.pos:self.pos + self.batch_size])
            self.pos += self.batch_size
            self.buffer = torch.from_numpy(batch).cuda().contiguous()
            torch.cuda.synchronize()
            return [int(self.buffer.data_ptr())]

        def read_calibration_cache(self) -> bytes | None:
            if cache_path is not None and cache_path.is_file() and cache_path.stat().st_size > 0:
                return cache_path.read_bytes()
            return None

        def write_calibration_cache(self, cache: Any) -> None:
            if cache_path is not None:
                from kdcompress.engine.checkpoint import atomic_write

                data = bytes(cache)
                atomic_write(cache_path, lambda tmp: tmp.write_bytes(data))

    return EntropyCalibrator()


def _fast_precision_supported(trt: Any, builder: Any, precision: str) -> bool:
    """TensorRT's platform query when present, else the compute capability (fp16 >= 5.3, int8 >= 6.1)."""
    import torch

    attr = {"fp16": "platform_has_fast_fp16", "int8": "platform_has_fast_int8"}[precision]
    if hasattr(builder, attr):
        return bool(getattr(builder, attr))
    major, minor = torch.cuda.get_device_capability()
    cc = major * 10 + minor
    return cc >= (53 if precision == "fp16" else 61)


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
) -> tuple[Path, dict[str, Any]]:
    """Build a serialized TensorRT plan; returns (engine path, build info for the sidecar).

    ``precision`` is what TensorRT is *allowed* to use (fp16/int8 flags, fp32 always allowed for
    layers without a faster kernel); a GPU without fast fp16/int8 is an error, never a silent
    fp32 build. INT8 uses entropy calibration on ``calib_images`` (or a cache from an earlier
    build, reused when present).
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
    cache_path = Path(calib_cache) if calib_cache else None
    images = list(calib_images) if calib_images is not None else []
    if precision == "int8" and not images and not (cache_path and cache_path.is_file()):
        raise ExportError("calibration set is empty: INT8 TensorRT engines need calibration images "
                          "(--calib-images >= 1) or an existing calibration cache.")

    logger = _logger(trt, verbose)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise ExportError(f"TensorRT could not parse '{onnx_path.name}' ({len(errors)} error(s)): "
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

    if precision in ("fp16", "int8"):
        if not _fast_precision_supported(trt, builder, precision):
            raise ExportError(f"this GPU ({current_gpu()['name']}) has no fast {precision} support; refusing to "
                              f"build a slower fp32 engine silently. Use --precision fp32.")
    flags = ["fp32"]
    if precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
        flags.append("fp16")
    elif precision == "int8":
        config.set_flag(trt.BuilderFlag.INT8)
        flags.append("int8")
        # fp16 as well: layers TensorRT cannot run in int8 then fall back to fp16, not fp32 (recorded below).
        if _fast_precision_supported(trt, builder, "fp16"):
            config.set_flag(trt.BuilderFlag.FP16)
            flags.append("fp16")
        want = tuple(opt[1:])
        bad = [tuple(np.shape(im)) for im in images if tuple(np.shape(im))[-3:] != want]
        if bad:
            raise ExportError(f"calibration images have shape {list(bad[0])}; the profile's opt shape needs "
                              f"3 x H x W = {list(want)}. Resize them to the export input size.")
        config.int8_calibrator = _make_calibrator(trt, images, cache_path)
        config.set_calibration_profile(profile)

    tcache_path = Path(timing_cache) if timing_cache else None
    if tcache_path is not None:
        blob = tcache_path.read_bytes() if tcache_path.is_file() else b""
        tcache = config.create_timing_cache(blob)
        if not config.set_timing_cache(tcache, False):  # False: do not accept a cache from another GPU/TensorRT
            raise ExportError(f"timing cache '{tcache_path}' was made on another GPU or TensorRT version. "
                              f"Delete it or pass another --timing-cache path.")

    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise ExportError(f"TensorRT failed to build the {precision} engine for '{onnx_path.name}' (see the log above); "
                          f"try a larger --workspace-mb or another precision.")

    from kdcompress.engine.checkpoint import atomic_write

    out_path = Path(out_path)
    atomic_write(out_path, lambda tmp: tmp.write_bytes(memoryview(plan)))
    if tcache_path is not None:
        blob = bytes(memoryview(config.get_timing_cache().serialize()))
        atomic_write(tcache_path, lambda tmp: tmp.write_bytes(blob))
    gpu = current_gpu()
    info = {
        "version": str(trt.__version__),
        "gpu": gpu["name"],
        "compute_capability": gpu["compute_capability"],
        "allowed_precisions": flags,  # TensorRT picks the fastest allowed kernel per layer
        "profile": {"input": inp.name, "min": list(lo), "opt": list(opt), "max": list(hi)},
        "workspace_mb": int(workspace_mb),
        "calibration_cache": str(cache_path) if cache_path else None,
        "calibration_images": len(images),
        "timing_cache": str(tcache_path) if tcache_path else None,
    }
    return out_path, info


def load_engine(path: str | Path, verbose: bool = False) -> tuple[Any, Any]:
    """(engine, runtime) after checking the sidecar's TensorRT version and GPU against this machine.

    The runtime is returned so the caller keeps it alive as long as the engine.
    """
    from kdcompress.export.metadata import read_sidecar

    path = Path(path)
    if not path.is_file():
        raise ExportError(f"engine '{path}' does not exist. Build it with `kdcompress export --to tensorrt`.")
    trt = import_tensorrt()
    require_cuda()
    sidecar = read_sidecar(path)
    check_engine_compat(sidecar.get("tensorrt") or {}, str(trt.__version__), current_gpu()["name"], path)
    runtime = trt.Runtime(_logger(trt, verbose))
    engine = runtime.deserialize_cuda_engine(path.read_bytes())
    if engine is None:
        raise ExportError(f"TensorRT could not deserialize '{path}' (corrupt file?). Rebuild it with `kdcompress export --to tensorrt`.")
    return engine, runtime


def trt_version_installed() -> str | None:
    """TensorRT version without importing it (None when absent)."""
    from kdcompress.export.metadata import package_version

    for name in ("tensorrt", "tensorrt-cu12", "tensorrt-cu11"):
        v = package_version(name)
        if v:
            return v
    return None
