"""Latency, throughput and peak memory, measured the way trtexec / mmdet's benchmark do.

* Warm-up iterations first (allocator, cuDNN autotune, ORT arena, lazy init), then many
  timed iterations; we report the median and the p90/p99 tail, and FPS = batch / median.
* On CUDA every iteration is bracketed by CUDA events and synchronised, otherwise the host
  clock only measures the kernel *launch*.
* Peak memory on CUDA is ``torch.cuda.max_memory_allocated`` (what mmdet and the ACAM-KD
  table report) and ``max_memory_reserved`` (the caching allocator's footprint), both reset
  before the timed loop. On CPU we report the growth of the resident set size over the
  run: Linux's ``VmHWM`` (peak RSS) is reset through ``/proc/self/clear_refs`` before the run
  and read after it, which catches short peaks exactly; where that is not permitted a 1 ms
  background sampler of ``VmRSS`` is used (may miss peaks shorter than a sample).
"""

from __future__ import annotations

import os
import platform
import threading
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from kdcompress.errors import ExportError, KdError, MissingDependencyError

_STATUS = Path("/proc/self/status")


def measure_latency(fn: Callable[[], Any], warmup: int = 5, iters: int = 50, device: str = "cpu") -> dict[str, Any]:
    """Time ``fn()`` ``iters`` times after ``warmup`` calls; milliseconds per call.

    ``fn`` must do one complete inference (input already on the device). On CUDA the time is
    taken with CUDA events on the current stream and synchronised every iteration.
    """
    if iters < 1:
        raise KdError(f"iters must be >= 1, got {iters}.")
    if warmup < 0:
        raise KdError(f"warmup must be >= 0, got {warmup}.")
    import torch

    cuda = str(device).startswith("cuda")
    for _ in range(warmup):
        fn()
    times: list[float] = []
    if cuda:
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        for _ in range(iters):
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(float(start.elapsed_time(end)))
        timer = "cuda events, synchronised each iteration"
    else:
        for _ in range(iters):
            t0 = time.perf_counter_ns()
            fn()
            times.append((time.perf_counter_ns() - t0) / 1e6)
        timer = "time.perf_counter_ns"
    return summarize(times, warmup=warmup, timer=timer)


def summarize(times_ms: Sequence[float], warmup: int = 0, timer: str = "") -> dict[str, Any]:
    """median / p90 / p99 / mean / min / max / std of per-iteration times (ms)."""
    t = np.asarray(times_ms, dtype=np.float64)
    if t.size == 0:
        raise KdError("no timed iterations to summarise.")
    return {
        "median_ms": float(np.median(t)),
        "p90_ms": float(np.percentile(t, 90)),
        "p99_ms": float(np.percentile(t, 99)),
        "mean_ms": float(t.mean()),
        "min_ms": float(t.min()),
        "max_ms": float(t.max()),
        "std_ms": float(t.std()),
        "iters": int(t.size),
        "warmup": int(warmup),
        "timer": timer,
    }


def fps_of(latency: dict[str, Any], batch: int) -> float:
    """Images per second at the median latency."""
    med = latency["median_ms"]
    return float(batch * 1000.0 / med) if med > 0 else float("inf")


def _status_kb(field: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def current_rss_bytes() -> int | None:
    kb = _status_kb("VmRSS")
    return kb * 1024 if kb is not None else None


def _reset_hwm() -> bool:
    """Reset the kernel's peak-RSS counter (Linux >= 4.0); False where not permitted."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class CpuPeakMemory:
    """Context manager: peak resident-set growth (bytes) of this process over the block.

    ``baseline`` is the RSS at entry (model weights, runtime, already loaded); ``peak_delta`` is
    peak RSS minus that baseline, i.e. the activations/workspace the inference needs.
    """

    def __init__(self, interval_s: float = 0.001) -> None:
        self.interval_s = interval_s
        self.baseline: int | None = None
        self.peak: int | None = None
        self.method = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._samples_peak = 0

    def _sample(self) -> None:
        while not self._stop.is_set():
            rss = current_rss_bytes()
            if rss is not None and rss > self._samples_peak:
                self._samples_peak = rss
            self._stop.wait(self.interval_s)

    def __enter__(self) -> "CpuPeakMemory":
        self.baseline = current_rss_bytes()
        if self.baseline is None:  # not Linux: ru_maxrss cannot be reset, only growth above the old peak shows
            import resource

            scale = 1 if platform.system() == "Darwin" else 1024
            self._ru_scale = scale
            self.baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
            self.method = "ru_maxrss growth (lower bound: earlier peaks hide smaller ones)"
            return self
        if _reset_hwm():
            self.method = "VmHWM after /proc/self/clear_refs reset (exact peak RSS)"
        else:
            self.method = "VmRSS sampled every 1 ms by a background thread"
            self._samples_peak = self.baseline
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.method.startswith("ru_maxrss"):
            import resource

            self.peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * self._ru_scale
        elif self._thread is not None:
            self._stop.set()
            self._thread.join()
            self.peak = max(self._samples_peak, current_rss_bytes() or 0)
        else:
            hwm = _status_kb("VmHWM")
            self.peak = hwm * 1024 if hwm is not None else None

    @property
    def peak_delta(self) -> int:
        if self.peak is None or self.baseline is None:
            return 0
        return max(0, self.peak - self.baseline)


class CudaPeakMemory:
    """Context manager: ``max_memory_allocated`` / ``max_memory_reserved`` over the block (reset first)."""

    def __init__(self, device: Any = None) -> None:
        self.device = device
        self.allocated = self.reserved = self.baseline = 0

    def __enter__(self) -> "CudaPeakMemory":
        import torch

        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        self.baseline = int(torch.cuda.memory_allocated(self.device))
        return self

    def __exit__(self, *exc: object) -> None:
        import torch

        torch.cuda.synchronize(self.device)
        self.allocated = int(torch.cuda.max_memory_allocated(self.device))
        self.reserved = int(torch.cuda.max_memory_reserved(self.device))


def cpu_model() -> str:
    """CPU model name from /proc/cpuinfo (Linux), else platform.processor()."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: str = "cpu", threads: int | None = None) -> dict[str, Any]:
    """Where a number was measured: device, thread count, versions, CPU model."""
    import torch

    from kdcompress import __version__

    from kdcompress.versions import package_version as ver
    from kdcompress.versions import trt_version_installed

    env: dict[str, Any] = {
        "device": str(device),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": threads if threads is not None else torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "kdcompress": __version__,
        "torch": torch.__version__,
        "onnx": ver("onnx"),
        "onnxruntime": ver("onnxruntime") or ver("onnxruntime-gpu"),
        "tensorrt": trt_version_installed(),  # any distribution name: tensorrt, tensorrt-cu12, -cu13, ...
        "cuda_available": torch.cuda.is_available(),
    }
    if str(device).startswith("cuda") and torch.cuda.is_available():
        idx = torch.device(device).index or 0
        major, minor = torch.cuda.get_device_capability(idx)
        env.update({
            "device_name": torch.cuda.get_device_name(idx),
            "compute_capability": f"{major}.{minor}",
            "cuda_runtime": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version(),
        })
    else:
        env["device_name"] = env["cpu_model"]
    return env


def create_ort_session(onnx_path: str | Path, providers: Sequence[str] | str | None = None,
                       intra_op_num_threads: int | None = None, inter_op_num_threads: int | None = 1,
                       optimization_level: str = "all") -> Any:
    """An ONNX Runtime session on exactly the requested providers, or one clear error line.

    ORT silently falls back to the CPU EP when e.g. CUDA libraries are missing; we compare
    ``session.get_providers()`` with the request and refuse instead. A model stamped with an
    opset this ORT cannot run is reported with the newest opset it supports.
    """
    import re

    import onnxruntime as ort

    aliases = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider",
               "tensorrt": "TensorrtExecutionProvider", "trt": "TensorrtExecutionProvider"}
    if providers is None:
        wanted = ["CPUExecutionProvider"]
    else:
        wanted = [aliases.get(p.lower(), p) for p in ([providers] if isinstance(providers, str) else providers)]
    path = Path(onnx_path)
    if not path.is_file():
        raise ExportError(f"ONNX file '{path}' does not exist. Export it first with `kdcompress export --to onnx`.")
    available = ort.get_available_providers()
    missing = [p for p in wanted if p not in available]
    if missing:
        hint = (" Install onnxruntime-gpu (pip install 'kdcompress[gpu]') on a CUDA machine."
                if "CUDAExecutionProvider" in missing else "")
        raise MissingDependencyError(
            f"ONNX Runtime provider {missing[0]} is not available (this build has {', '.join(available)}).{hint}")
    levels = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }
    if optimization_level not in levels:
        raise KdError(f"Unknown ORT optimisation level '{optimization_level}'. Available: {', '.join(levels)}")
    so = ort.SessionOptions()
    so.graph_optimization_level = levels[optimization_level]
    so.log_severity_level = 3  # errors only; "unused initializer" warnings are noise
    if intra_op_num_threads is not None:
        so.intra_op_num_threads = int(intra_op_num_threads)
    if inter_op_num_threads is not None:
        so.inter_op_num_threads = int(inter_op_num_threads)
    try:
        session = ort.InferenceSession(str(path), sess_options=so, providers=wanted)
    except Exception as e:
        msg = str(e)
        m = re.search(r"support for domain ai\.onnx is till opset (\d+)", msg)
        if m:
            newest = int(m.group(1))
            import onnx

            stamped = next((i.version for i in onnx.load(str(path), load_external_data=False).opset_import
                            if i.domain in ("", "ai.onnx")), None)
            raise ExportError(
                f"ONNX Runtime {ort.__version__} cannot run '{path.name}' (opset {stamped}): it supports ai.onnx "
                f"up to opset {newest}. Re-export with --opset {min(newest, 18)}.") from e
        first = msg.strip().splitlines()[0][:300] if msg.strip() else type(e).__name__
        raise ExportError(f"ONNX Runtime could not load '{path.name}': {first}. Re-export the model.") from e
    actual = session.get_providers()
    if actual[: len(wanted)] != wanted:
        raise ExportError(f"ONNX Runtime fell back to {actual} although {wanted} was requested. "
                          f"Fix the CUDA/cuDNN installation or ask for the CPU provider explicitly.")
    return session
