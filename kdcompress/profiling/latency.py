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

from kdcompress.errors import KdError

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
