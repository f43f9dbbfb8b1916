"""Deployment speed of the built-in students: PyTorch eager vs ONNX Runtime FP32 vs ORT INT8 (CPU),
plus TensorRT FP16/INT8 vs PyTorch on CUDA when available.

    .venv/bin/python benchmarks/deploy_speed.py [--threads N] [--sizes 96 512] [--iters 30]

Method (see kdcompress.profiling.latency): every backend gets the same input, the same intra-op
thread count (torch.set_num_threads and ORT intra_op_num_threads, inter_op 1) and warm-up
calls; the timed calls are *interleaved* round-robin (one call of each backend per round), so
background load on a shared machine hits all backends alike and the ratios stay fair. We report
medians and p90/p99 and the ratios ort/torch and int8/fp32 (< 1 = faster than the reference).
Models are randomly initialised (latency does not depend on the weights); INT8 is calibrated on
a few images of the built-in digits dataset. Results go to benchmarks/results/deploy_speed.json
with the environment. No assertions: this script measures, it does not gate.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from kdcompress.data import build_dataset, val_transform
from kdcompress.export.metadata import write_sidecar
from kdcompress.export.onnx import export_onnx
from kdcompress.export.ort_quant import calibration_images, quantize_int8
from kdcompress.export.runners import OrtRunner
from kdcompress.export.verify import compare_outputs
from kdcompress.models import build_model
from kdcompress.profiling.latency import environment, measure_latency, summarize

MODELS = ("deeplabv3plus-mbv2", "deeplabv3plus-r18", "deeplabv3-mbv2")
NUM_CLASSES = 11
RESULTS = Path(__file__).resolve().parent / "results" / "deploy_speed.json"


def interleaved(fns: dict[str, Callable[[], Any]], warmup: int, rounds: int, per_round: int = 2) -> dict[str, dict[str, Any]]:
    """Warm every backend up, then ``rounds`` rounds in which each backend runs 1 untimed + ``per_round`` timed calls.

    Rounds spread background-load drift evenly over the backends; the untimed call absorbs the
    hand-over from the previous backend (ORT and OpenMP worker threads spin for a while after a
    call and would otherwise steal cores from whoever runs next).
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            fn()
            for _ in range(per_round):
                t0 = time.perf_counter_ns()
                fn()
                times[k].append((time.perf_counter_ns() - t0) / 1e6)
    return {k: summarize(v, warmup=warmup, timer=f"time.perf_counter_ns; {rounds} interleaved rounds x "
                                                   f"(1 untimed + {per_round} timed) calls")
            for k, v in times.items()}


def cpu_cases(name: str, size: int, thread_counts: list[int], work: Path, calib_ds: Any, iters: int, warmup: int,
              n_calib: int, opt_level: str = "all") -> list[dict[str, Any]]:
    """Export + quantise once, then time all three backends at every thread count."""
    torch.manual_seed(0)
    model = build_model(name, num_classes=NUM_CLASSES).eval()
    t0 = time.perf_counter()
    fp32 = export_onnx(model, work / f"{name}-{size}.onnx", (size, size))
    export_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    int8 = quantize_int8(fp32, work / f"{name}-{size}.int8.onnx", calibration_images(calib_ds, n_calib, (size, size)))
    quant_s = time.perf_counter() - t0
    x = np.random.default_rng(0).standard_normal((1, 3, size, size)).astype(np.float32)
    xt = torch.from_numpy(x)

    def torch_fn() -> Any:
        with torch.inference_mode():
            return model(xt)

    rows = []
    for threads in thread_counts:
        torch.set_num_threads(threads)
        ort32 = OrtRunner(fp32, intra_op_num_threads=threads, optimization_level=opt_level)
        ort8 = OrtRunner(int8, intra_op_num_threads=threads, optimization_level=opt_level)
        ref = torch_fn().numpy()
        parity = {"ort_fp32_vs_torch_max_abs": compare_outputs(ref, ort32.infer(x))["max_abs"],
                  "int8_vs_torch_argmax_agreement": compare_outputs(ref, ort8.infer(x))["argmax_agreement"]}
        lat = interleaved({"torch_fp32": torch_fn, "ort_fp32": lambda: ort32.infer(x),
                           "ort_int8": lambda: ort8.infer(x)}, warmup=warmup, rounds=iters)
        med = {k: v["median_ms"] for k, v in lat.items()}
        rows.append({
            "model": name, "input": [1, 3, size, size], "device": "cpu", "threads": threads,
            "latency_ms": lat,
            "ratios": {"ort_fp32/torch": med["ort_fp32"] / med["torch_fp32"],
                       "ort_int8/ort_fp32": med["ort_int8"] / med["ort_fp32"],
                       "ort_int8/torch": med["ort_int8"] / med["torch_fp32"]},
            "parity_on_benchmark_input": parity,
            "export_s": export_s, "quantize_s": quant_s, "calibration_images": n_calib,
            "onnx_mb": fp32.stat().st_size / 2**20, "int8_mb": int8.stat().st_size / 2**20,
        })
        ort32.close()
        ort8.close()
    return rows


def cuda_case(name: str, size: int, work: Path, calib_ds: Any, iters: int, n_calib: int) -> dict[str, Any]:
    """PyTorch eager fp32 vs TensorRT fp16 / int8 on the GPU (CUDA events, synchronised)."""
    from kdcompress.export.runners import TrtRunner
    from kdcompress.export.tensorrt import build_engine

    torch.manual_seed(0)
    model = build_model(name, num_classes=NUM_CLASSES).eval()
    fp32 = work / f"{name}-{size}.onnx"
    if not fp32.is_file():
        export_onnx(model, fp32, (size, size))
    model = model.cuda()
    x = torch.randn(1, 3, size, size, device="cuda")

    def torch_fn() -> Any:
        with torch.inference_mode():
            return model(x)

    out: dict[str, Any] = {"model": name, "input": [1, 3, size, size], "device": "cuda", "latency_ms": {}}
    out["latency_ms"]["torch_fp32"] = measure_latency(torch_fn, warmup=10, iters=iters, device="cuda")
    calib = calibration_images(calib_ds, n_calib, (size, size))
    for precision in ("fp16", "int8"):
        engine = work / f"{name}-{size}.{precision}.engine"
        _, info = build_engine(fp32, engine, precision, calib_images=calib if precision == "int8" else None,
                               calib_cache=work / f"{name}-{size}.calib", workspace_mb=2048)
        write_sidecar(engine, {"format": "kdcompress.artifact/1", "tensorrt": info})
        runner = TrtRunner(engine)
        out["latency_ms"][f"trt_{precision}"] = measure_latency(lambda: runner.infer_torch(x), warmup=10,
                                                                iters=iters, device="cuda")
        runner.close()
    med = {k: v["median_ms"] for k, v in out["latency_ms"].items()}
    out["ratios"] = {"trt_fp16/torch": med["trt_fp16"] / med["torch_fp32"],
                     "trt_int8/torch": med["trt_int8"] / med["torch_fp32"],
                     "trt_int8/trt_fp16": med["trt_int8"] / med["trt_fp16"]}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS))
    ap.add_argument("--sizes", nargs="+", type=int, default=[96, 512])
    ap.add_argument("--threads", type=int, nargs="+", default=sorted({1, torch.get_num_threads()}),
                    help="intra-op thread counts, each applied to torch AND onnxruntime (default: 1 and all cores)")
    ap.add_argument("--iters", type=int, default=15, help="rounds (2 timed calls per backend each) at sizes < 256")
    ap.add_argument("--iters-large", type=int, default=5, help="rounds at sizes >= 256")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--calib-images", type=int, default=8)
    ap.add_argument("--ort-opt-level", default="all", choices=["disable", "basic", "extended", "all"])
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)

    from rich.console import Console
    from rich.table import Table

    console = Console()
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    calib_ds = build_dataset("digits", None, "train", val_transform(), image_size=96, num_train=40, num_val=16)
    started = time.perf_counter()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="kd-deploy-speed-") as tmp:
        work = Path(tmp)
        for size in args.sizes:
            for name in args.models:
                iters = args.iters if size < 256 else args.iters_large
                console.print(f"[dim]cpu  {name} @ {size}x{size} ({iters} rounds, threads {args.threads}) ...[/dim]")
                rows.extend(cpu_cases(name, size, args.threads, work, calib_ds, iters, args.warmup,
                                      args.calib_images, args.ort_opt_level))
        cuda_rows: list[dict[str, Any]] = []
        cuda_note = None
        if torch.cuda.is_available():
            try:
                from kdcompress.export.tensorrt import import_tensorrt

                import_tensorrt()
                for size in args.sizes:
                    for name in args.models:
                        console.print(f"[dim]cuda {name} @ {size}x{size} ...[/dim]")
                        cuda_rows.append(cuda_case(name, size, work, calib_ds, max(args.iters, 50), args.calib_images))
            except Exception as e:  # recorded, not hidden: the JSON says why there are no GPU rows
                cuda_note = f"TensorRT rows skipped: {e}"
        else:
            cuda_note = "no CUDA device: TensorRT FP16/INT8 not measured"

    table = Table(title="CPU deploy latency, batch 1 (median ms, p90 in brackets)")
    for col in ("model", "input", "thr", "PyTorch fp32", "ORT fp32", "ORT int8", "ort/torch", "int8/fp32"):
        table.add_column(col, justify="left" if col in ("model", "input") else "right")
    for r in rows:
        lat = r["latency_ms"]
        cell = lambda k: f"{lat[k]['median_ms']:.1f} ({lat[k]['p90_ms']:.1f})"  # noqa: E731
        table.add_row(r["model"], f"{r['input'][2]}x{r['input'][3]}", str(r["threads"]), cell("torch_fp32"), cell("ort_fp32"),
                      cell("ort_int8"), f"{r['ratios']['ort_fp32/torch']:.2f}", f"{r['ratios']['ort_int8/ort_fp32']:.2f}")
    console.print(table)
    if cuda_rows:
        t2 = Table(title="CUDA latency, batch 1 (median ms)")
        for col in ("model", "input", "PyTorch fp32", "TRT fp16", "TRT int8", "fp16/torch", "int8/torch"):
            t2.add_column(col)
        for r in cuda_rows:
            lat = r["latency_ms"]
            t2.add_row(r["model"], f"{r['input'][2]}x{r['input'][3]}", f"{lat['torch_fp32']['median_ms']:.2f}",
                       f"{lat['trt_fp16']['median_ms']:.2f}", f"{lat['trt_int8']['median_ms']:.2f}",
                       f"{r['ratios']['trt_fp16/torch']:.2f}", f"{r['ratios']['trt_int8/torch']:.2f}")
        console.print(t2)
    if cuda_note:
        console.print(f"[yellow]{cuda_note}[/yellow]")

    ratios = [r["ratios"]["ort_fp32/torch"] for r in rows]
    key = lambda r: f"{r['model']}@{r['input'][2]}/{r['threads']}thr"  # noqa: E731
    env = environment("cpu", threads=None)
    env.pop("torch_threads", None)  # per row: "threads"
    env.update(thread_counts=args.threads, load_average_before=load_before,
               load_average_after=os.getloadavg() if hasattr(os, "getloadavg") else None,
               ort_session={"intra_op_num_threads": "= row threads (same as torch.set_num_threads)", "inter_op_num_threads": 1,
                            "graph_optimization_level": args.ort_opt_level, "execution_mode": "sequential"},
               onnx_export={"exporter": "torch.onnx.export(dynamo=True)", "opset": 18, "simplified_with": "onnxslim",
                            "dynamic_axes": "batch only"},
               int8={"format": "QDQ", "per_channel": True, "activations": "uint8", "weights": "int8",
                     "calibration": f"{args.calib_images} digits train images, MinMax"})
    result = {
        "benchmark": "deploy_speed", "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": " ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:])),
        "environment": env, "cpu": rows, "cuda": cuda_rows, "cuda_note": cuda_note,
        "summary": {"ort_fp32/torch_median_over_cases": float(np.median(ratios)),
                    "ort_fp32/torch_per_case": {key(r): r["ratios"]["ort_fp32/torch"] for r in rows},
                    "ort_int8/ort_fp32_per_case": {key(r): r["ratios"]["ort_int8/ort_fp32"] for r in rows},
                    "goal": "ORT FP32 <= 0.8x PyTorch latency on CPU",
                    "goal_met_cases": sum(q <= 0.8 for q in ratios), "cases": len(ratios)},
        "wall_s": time.perf_counter() - started,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    console.print(f"saved {args.out} ({result['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
