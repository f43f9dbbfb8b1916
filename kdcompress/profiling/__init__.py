"""Profile models and deployed artifacts side by side (params, GMACs/GFLOPs, memory, latency, FPS).

``profile_target`` accepts a zoo model name (random init), a kdcompress checkpoint (``.pt``),
an ONNX file or a TensorRT engine and returns one row; ``render_table`` lays rows out like
ACAM-KD's Table 7. Heavy libraries are imported inside the functions.

Runtimes: ``torch`` (the model itself) and every runner of :data:`kdcompress.runtime.RUNNERS`
(``ort`` built in; ``tensorrt`` registered by ``kdcompress.export``, which the CLI imports).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from kdcompress.errors import KdError

__all__ = ["profile_target", "profile_many", "render_table", "TARGET_SUFFIXES", "ALLOWED_RUNTIMES"]

TARGET_SUFFIXES = {".pt": "checkpoint", ".pth": "checkpoint", ".onnx": "onnx",
                   ".engine": "engine", ".plan": "engine", ".trt": "engine"}
_DEFAULT_BACKEND = {"model": "torch", "checkpoint": "torch", "onnx": "ort", "engine": "tensorrt"}
ALLOWED_RUNTIMES = {"model": ("torch",), "checkpoint": ("torch",), "onnx": ("ort",), "engine": ("tensorrt",)}


def classify_target(target: str | Path) -> str:
    """``model`` / ``checkpoint`` / ``onnx`` / ``engine``; KdError for missing files or unknown suffixes."""
    s = str(target)
    p = Path(s)
    suffix = p.suffix.lower()
    if suffix in TARGET_SUFFIXES:
        if not p.is_file():
            raise KdError(f"'{s}' does not exist. Check the path (profile a model name, a .pt checkpoint, "
                          f"an .onnx file or a .engine/.plan).")
        return TARGET_SUFFIXES[suffix]
    if p.exists() or "/" in s or "\\" in s or suffix:
        from kdcompress.models import MODELS

        if s in MODELS:
            return "model"
        raise KdError(f"Cannot profile '{s}': expected a model name ({', '.join(MODELS.names())}) or a file "
                      f"ending in {', '.join(sorted(TARGET_SUFFIXES))}.")
    return "model"


def _weights_bytes_torch(model: Any) -> int:
    return int(sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers())))


def _sidecar(path: Path) -> dict[str, Any] | None:
    import json

    side = path.with_name(path.name + ".json")
    try:
        return json.loads(side.read_text()) if side.is_file() else None
    except (OSError, ValueError):
        return None


def profile_target(
    target: str | Path,
    input_size: tuple[int, int] = (800, 1088),
    batch: int = 1,
    backend: str | None = None,
    device: str = "cpu",
    warmup: int = 5,
    iters: int = 50,
    num_classes: int | None = None,
    threads: int | None = None,
    output_stride: int | None = None,
) -> dict[str, Any]:
    """One row: params, GMACs/GFLOPs, peak memory, latency median/p90/p99 (ms), FPS, environment.

    ``input_size`` is (H, W); the default 800x1088 is ACAM-KD Table 7's 1088x800. ``threads``
    sets both torch's and ORT's intra-op thread count (recorded either way). FLOPs are counted
    in PyTorch: for ONNX/engine targets from the architecture named in the sidecar JSON,
    otherwise reported as None ("n/a").
    """
    import torch

    from kdcompress.profiling.latency import environment, fps_of
    from kdcompress.profiling.static import FLOPS_CONVENTION, count_flops

    kind, backend, device = _check_request(target, backend, device, batch, input_size, threads)
    h, w = int(input_size[0]), int(input_size[1])
    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(int(threads))
    row: dict[str, Any] = {
        "target": str(target), "kind": kind, "backend": backend, "device": str(device), "batch": int(batch),
        "input_size": [h, w], "precision": "fp32", "flops_convention": FLOPS_CONVENTION,
    }
    try:
        source_model = _static(target, kind, row, num_classes, output_stride, (h, w))
        if source_model is not None:
            fl = count_flops(source_model, (h, w), batch=batch)
            row.update(flops=fl["flops"], gflops=fl["gflops"], gmacs=fl["gmacs"], flops_method=fl["method"])
        else:
            row.update(flops=None, gflops=None, gmacs=None, flops_method="n/a (no source architecture recorded)")
        fn, weights, runner = _inference(target, backend, device, threads, source_model, (batch, 3, h, w), row)
        try:
            lat = _measure(fn, weights, runner, backend, device, warmup, iters, row)
        finally:
            if runner is not None:
                runner.close()
        row["latency_ms"] = lat
        row["fps"] = fps_of(lat, batch)
        row["threads"] = torch.get_num_threads() if threads is None else int(threads)
        row["env"] = environment(str(device), threads=row["threads"])
    finally:
        torch.set_num_threads(old_threads)
    return row


def _check_request(target: str | Path, backend: str | None, device: str, batch: int, input_size: tuple[int, int],
                   threads: int | None) -> tuple[str, str, str]:
    """(kind, backend, device) once every option fits the target; one line naming the fix otherwise."""
    from kdcompress.engine.distributed import resolve_device

    kind = classify_target(target)
    backend = backend or _DEFAULT_BACKEND[kind]
    runtimes = sorted({b for allowed in ALLOWED_RUNTIMES.values() for b in allowed})
    if backend not in runtimes:
        raise KdError(f"Unknown backend '{backend}'. Available: {', '.join(runtimes)}")
    if backend not in ALLOWED_RUNTIMES[kind]:
        hint = {"model": "export it first (kdcompress export --to onnx) and profile the .onnx",
                "checkpoint": "export it first (kdcompress export --to onnx/tensorrt) and profile the artifact",
                "onnx": "use --backend ort (or build an engine with kdcompress export --to tensorrt)",
                "engine": "use --backend tensorrt"}[kind]
        raise KdError(f"Backend '{backend}' cannot run a {kind} target ('{target}'): {hint}.")
    device = str(resolve_device(device))
    if backend == "tensorrt" and not device.startswith("cuda"):
        raise KdError("TensorRT engines run on CUDA only: use --device cuda.")
    if batch < 1:
        raise KdError(f"batch must be >= 1, got {batch}.")
    if int(input_size[0]) <= 0 or int(input_size[1]) <= 0:
        raise KdError(f"input size must be positive (H, W), got {input_size!r}.")
    if threads is not None and threads < 1:
        raise KdError(f"threads must be >= 1, got {threads}.")
    return kind, backend, device


def _static(target: str | Path, kind: str, row: dict[str, Any], num_classes: int | None, output_stride: int | None,
            size: tuple[int, int]) -> Any:
    """Parameter counts into ``row``; returns the PyTorch model FLOPs are counted on (None if unknown)."""
    from kdcompress.profiling.static import count_params

    source_model = None
    if kind in ("model", "checkpoint"):
        if kind == "model":
            from kdcompress.models import build_model

            k = int(num_classes) if num_classes is not None else 19
            model = build_model(str(target), num_classes=k, output_stride=output_stride)
            row.update(model=str(target), num_classes=k)
        else:
            from kdcompress.engine.checkpoint import load_model

            model, meta = load_model(target)
            row.update(model=meta.get("arch"), num_classes=meta.get("num_classes"))
        model.eval()
        # PyTorch runs any size the backbone can downsample (PSPNet at 512x1024 as the papers profile
        # it); only export needs whole pooling grids (check_input_size, called by export).
        stride = int(getattr(model, "output_stride", 1) or 1)
        if min(size) < stride:
            raise KdError(f"Input size {size[0]}x{size[1]} is smaller than the model's output stride {stride}; "
                          f"use at least {stride}x{stride}.")
        source_model = model
        row["params"] = count_params(model)
    else:
        side = _sidecar(Path(target)) or {}
        row.update(model=side.get("arch") or Path(target).stem, num_classes=side.get("num_classes"),
                   precision=side.get("precision", "fp32" if kind == "onnx" else None))
        if kind == "onnx":
            from kdcompress.profiling.static import onnx_param_count

            row["params"] = onnx_param_count(target)
            row["params_source"] = "ONNX weight initializers (BN folded into convs)"
        else:
            row["params"] = None
        if side.get("arch") and side.get("num_classes"):
            from kdcompress.models import MODELS, build_model

            if side["arch"] in MODELS:  # FLOPs do not depend on weights: the architecture suffices
                source_model = build_model(side["arch"], num_classes=int(side["num_classes"]),
                                           output_stride=side.get("output_stride"))
                if row["params"] is None:
                    row["params"] = count_params(source_model)
                    row["params_source"] = "source architecture named in the sidecar"
    row["params_m"] = row["params"] / 1e6 if row.get("params") is not None else None
    return source_model


def _inference(target: str | Path, backend: str, device: str, threads: int | None, source_model: Any,
               shape: tuple[int, int, int, int], row: dict[str, Any]) -> tuple[Callable[[], Any], int, Any]:
    """(one inference call, weight bytes, the runner to close or None) for the chosen runtime."""
    import numpy as np
    import torch

    dev = torch.device(device)
    if backend == "torch":
        model = source_model.to(dev)
        x = torch.randn(*shape, device=dev)

        def torch_fn() -> Any:
            with torch.inference_mode():
                return model(x)

        return torch_fn, _weights_bytes_torch(model), None
    from kdcompress.runtime import RUNNERS  # an artifact: its runner from the core's runtime registry

    if backend not in RUNNERS:
        raise KdError(f"the {backend} runtime is provided by kdcompress.export: `import kdcompress.export` "
                      f"before profiling an engine (the kdcompress CLI does this).")
    runner = RUNNERS.get(backend)(target, device, threads)
    weights = int(Path(target).stat().st_size)
    if backend != "ort":
        x = torch.randn(*shape, device=dev)
        return (lambda: runner.infer_torch(x)), weights, runner
    inp = runner.session.get_inputs()[0]
    fixed = [d for d, v in zip(inp.shape, shape) if isinstance(d, int) and d != v]
    if fixed:
        runner.close()
        dims = "x".join(str(d) for d in inp.shape)
        raise KdError(f"'{target}' has a static input shape {dims}; profile it with a matching "
                      f"--input-size/--batch or re-export with --dynamic-spatial / --dynamic-batch.")
    row["ort_providers"] = runner.providers
    row["ort_intra_op_threads"] = threads if threads is not None else "ORT default (physical cores)"
    xs = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    return (lambda: runner.session.run(None, {runner.input_name: xs})), weights, runner


def _measure(fn: Callable[[], Any], weights: int, runner: Any, backend: str, device: str, warmup: int, iters: int,
             row: dict[str, Any]) -> dict[str, Any]:
    """Latency statistics; peak memory into ``row`` by the convention of the device and runtime."""
    import torch

    from kdcompress.profiling.latency import CpuPeakMemory, CudaPeakMemory, measure_latency

    memory: dict[str, Any] = {}
    if device.startswith("cuda"):
        timer_device = device if backend in ("torch", "tensorrt") else "cpu"  # ORT run() is blocking
        with CudaPeakMemory(torch.device(device)) as cm:
            lat = measure_latency(fn, warmup=warmup, iters=iters, device=timer_device)
        memory.update(cuda_max_allocated_mb=cm.allocated / 2**20, cuda_max_reserved_mb=cm.reserved / 2**20,
                      weights_mb=weights / 2**20)
        if backend == "torch":
            row["memory_mb"] = cm.allocated / 2**20
            memory["method"] = "torch.cuda.max_memory_allocated (weights + activations; mmdet convention)"
        elif backend == "tensorrt" and hasattr(runner, "device_memory_bytes"):
            act = int(runner.device_memory_bytes())
            row["memory_mb"] = (cm.allocated + act + weights) / 2**20
            memory.update(trt_activation_mb=act / 2**20,
                          method="TensorRT activation memory + plan size (weights) + torch-allocated I/O peak")
        else:
            row["memory_mb"] = None
            memory["method"] = "n/a: ONNX Runtime's CUDA arena is not visible to torch's allocator"
    else:
        # Memory over the warm-up passes (the first pass allocates what steady state needs);
        # the timed loop runs without any sampler thread competing for the cores.
        with CpuPeakMemory() as mm:
            for _ in range(max(1, warmup)):
                fn()
        lat = measure_latency(fn, warmup=0, iters=iters, device="cpu")
        lat["warmup"] = max(1, warmup)
        memory.update(weights_mb=weights / 2**20, peak_rss_growth_mb=mm.peak_delta / 2**20,
                      method=f"weights + peak RSS growth during warm-up ({mm.method})")
        row["memory_mb"] = (weights + mm.peak_delta) / 2**20
    row["memory"] = memory
    return lat


def profile_many(targets: Iterable[str | Path], progress: bool = False, **kwargs: Any) -> list[dict[str, Any]]:
    """``profile_target`` for each target with the same settings (one table, comparable rows)."""
    from kdcompress.progress import LoopProgress

    targets, rows = list(targets), []
    with LoopProgress("profile", len(targets), enabled=progress, every=1, unit="target", transient=True) as bar:
        for t in targets:
            rows.append(profile_target(t, **kwargs))
            lat = (rows[-1].get("latency_ms") or {}).get("median_ms")
            bar.advance(text=f"{Path(str(t)).name}" + (f" {lat:.2f} ms" if lat is not None else ""))
    return rows


def _fmt(v: Any, spec: str) -> str:
    return "n/a" if v is None else format(v, spec)


def render_table(rows: Sequence[dict[str, Any]], title: str | None = None) -> Any:
    """A rich Table like ACAM-KD Table 7 (GMACs = the papers' "FLOPs"; GFLOPs = 2 x GMACs)."""
    from rich.table import Table

    if title is None and rows:
        r0 = rows[0]
        title = f"Input {r0['batch']}x3x{r0['input_size'][0]}x{r0['input_size'][1]} (N x C x H x W)"
    table = Table(title=title, caption="GMACs = multiply-accumulates (papers' 'FLOPs'); GFLOPs = 2 x GMACs "
                                       "(torch FlopCounterMode). Memory: CUDA peak allocated, or CPU weights + peak RSS growth.")
    for col, just in (("Model", "left"), ("Params (M)", "right"), ("GMACs", "right"), ("GFLOPs", "right"),
                      ("Memory (MB)", "right"), ("Latency ms (median/p90/p99)", "right"), ("FPS", "right"),
                      ("Backend/device", "left")):
        table.add_column(col, justify=just)  # type: ignore[arg-type]
    for r in rows:
        lat = r.get("latency_ms") or {}
        lat_s = (f"{lat['median_ms']:.2f} / {lat['p90_ms']:.2f} / {lat['p99_ms']:.2f}" if lat else "n/a")
        name = str(r.get("model") or r.get("target"))
        if r.get("kind") in ("onnx", "engine"):
            name = f"{name} [{Path(str(r['target'])).name}]"
        prec = r.get("precision")
        where = f"{r.get('backend')}/{r.get('device')}"
        if prec and prec != "fp32":
            where += f" {prec}"
        if not str(r.get("device", "")).startswith("cuda"):
            where += f" ({r.get('threads')} thr)"
        table.add_row(name, _fmt(r.get("params_m"), ".2f"), _fmt(r.get("gmacs"), ".2f"), _fmt(r.get("gflops"), ".2f"),
                      _fmt(r.get("memory_mb"), ".0f"), lat_s, _fmt(r.get("fps"), ".1f"), where)
    return table
