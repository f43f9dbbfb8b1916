"""Peak memory of the CanKD and ACAM-KD losses (forward + backward) vs number of positions.

Compares the textbook formulas (CanKD: (q kᵀ/N) v with the HW×N affinity; ACAM: explicit
softmax(QKᵀ/√d) V with the HW×HW matrix) with ours (CanKD: q (kᵀ v); ACAM: fused SDPA with
split heads / padded Q/K). Each case runs in a fresh subprocess so allocator state cannot leak
between cases.

Measurement: on CUDA, ``torch.cuda.max_memory_allocated`` minus what was allocated before the
step. On CPU, the growth of the process's peak RSS during the step: the high-water mark is
reset through ``/proc/self/clear_refs`` just before it (falls back to ``ru_maxrss`` where that
file is not writable), glibc is told to mmap every allocation ≥ 64 KiB so freed tensors leave
RSS at once, and a small warm-up step runs first so one-off kernel/thread-pool setup is not
counted. Inputs and parameters exist before the step and are not counted; the input gradient
is. The naive variant runs only while its quadratically extrapolated peak fits the budget.

Usage: ``python benchmarks/attention_memory.py`` (writes benchmarks/results/attention_memory.json).
Detection scale (FPN P3 and P2 of a 1088×800 image, 136×100 and 272×200 positions)::

    python benchmarks/attention_memory.py --cases cankd_c256 acam_fpn_c256 --sizes 136x100 272x200 \
        --ours-max-n --out benchmarks/results/attention_memory_fpn.json

The attention product alone (``--cases cankd_attn_c256 acam_attn_c256``) and training's mixed precision
(``--dtype bfloat16``) split that figure. ``--modes naive ours one-pass``: ``ours`` is the shipped
loss (position bands recomputed in backward on maps above the method's ``chunk_positions``) and
``one-pass`` the same maths without bands (``chunk_positions=0``), side by side in memory and time.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULT = ROOT / "benchmarks" / "results" / "attention_memory.json"
SIZES = [1024, 4096, 16384, 65536]  # positions H·W: 32², 64², 128², 256²
MiB = 2**20
GiB = 2**30

# name -> (method, channels, hparams, extra description)
CASES: dict[str, tuple[str, int, dict[str, float], str]] = {
    "cankd_c256": ("cankd", 256, {}, "CanKD, C=256 (C'=128), keys 2×2-pooled"),
    "acam_logits_c19": ("acam", 19, {"m": 19.0}, "ACAM-KD on 19-class logits, M=19"),
    "acam_fpn_c256": ("acam", 256, {"m": 6.0}, "ACAM-KD on an FPN level, C=256, M=6"),
}
# The attention step alone, on the shapes its loss feeds it at C = 256 (what the authors' formulations
# materialise quadratically): name -> (q width, k width, v width, keys per query position, description).
# q, k and v exist before the step and are not counted; their gradients are.
ATTENTION_CASES: dict[str, tuple[int, int, int, float, str]] = {
    "cankd_attn_c256": (128, 128, 128, 0.25, "CanKD attention alone: q (HW×128) · k,v (HW/4×128), 2×2-pooled keys"),
    "acam_attn_c256": (128, 128, 256, 1.0, "ACAM-KD attention alone: q,k (HW×128), v (HW×256)"),
}
ALL_CASES = list(CASES) + list(ATTENTION_CASES)
TIMING_ENV = "KDC_ATTN_BENCH_TIMING"
MODES = ("naive", "ours", "one-pass")  # one-pass: the loss cases with chunk_positions=0 (no bands)


def description(case: str) -> str:
    return CASES[case][3] if case in CASES else ATTENTION_CASES[case][4]


def channels(case: str) -> int:
    return CASES[case][1] if case in CASES else 256


def attention_step(case: str, mode: str, hw: tuple[int, int], device: str, dtype: Any) -> tuple[dict, Any]:
    """Inputs and step of an ATTENTION_CASES case: forward + backward of the attention product only."""
    import torch

    from kdcompress.methods.acam import fused_attention, naive_attention
    from kdcompress.methods.cankd import linear_affinity, naive_affinity

    dq, dk, dv, key_share, _ = ATTENTION_CASES[case]
    n = hw[0] * hw[1]
    keys = -(-hw[0] // 2) * -(-hw[1] // 2) if key_share < 1 else n
    gen = torch.Generator(device=device).manual_seed(0)
    inputs = {
        name: torch.randn((1, rows, width), generator=gen, device=device).to(dtype).requires_grad_()
        for name, rows, width in (("q", n, dq), ("k", keys, dk), ("v", keys, dv))
    }
    if case.startswith("cankd"):
        fn = naive_affinity if mode == "naive" else linear_affinity
    else:
        fn = partial(naive_attention if mode == "naive" else fused_attention, scale=dq**-0.5)

    def step() -> float:
        with autocast(device, dtype):
            out = fn(inputs["q"], inputs["k"], inputs["v"])
            loss = out.float().pow(2).mean()
        loss.backward()
        return float(loss.detach())

    return inputs, step


def autocast(device: str, dtype: Any) -> Any:
    """Training's mixed precision (the recipes' ``amp``) when a half dtype is asked; a no-op for float32."""
    import torch

    return torch.autocast(device_type=device, dtype=dtype, enabled=dtype != torch.float32)


def _status_kib(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    match = re.search(rf"^{field}:\s+(\d+) kB", text, re.M)
    return int(match.group(1)) if match else 0


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def grid(size: str) -> tuple[int, int]:
    """'272x200' -> (272, 200); a plain position count N -> the square grid of N positions."""
    if "x" in size:
        h, w = size.split("x")
        return int(h), int(w)
    side = int(round(int(size) ** 0.5))
    return side, side


def run_case(case: str, mode: str, size: str, device: str, threads: int, dtype_name: str) -> dict[str, Any]:
    """Child process body: one forward + backward, returns the peak extra memory in bytes."""
    import torch

    from kdcompress.methods import build_method

    torch.set_num_threads(threads)
    dtype = getattr(torch, dtype_name)
    grid_hw = grid(size)
    if case in ATTENTION_CASES:
        warm_inputs, warm_step = attention_step(case, mode, (8, 8), device, dtype)
        warm_step()
        del warm_inputs, warm_step
        _, step_fn = attention_step(case, mode, grid_hw, device, dtype)
        return measure(step_fn, device)
    method_name, channels, hparams, _ = CASES[case]
    tap = "logits" if case.startswith("acam_logits") else "feat"

    def build(hw: tuple[int, int], chunk: float | None = None) -> tuple[torch.nn.Module, dict, dict]:
        shape = torch.Size((1, channels, *hw))
        extra = {"chunk_positions": 0.0} if mode == "one-pass" else {}
        if chunk is not None:
            extra = {"chunk_positions": chunk}
        method = build_method(
            method_name, {tap: shape}, {tap: shape}, num_classes=19, taps=[tap], **hparams, **extra
        ).to(device)
        method.set_naive(mode == "naive")
        method.train()
        gen = torch.Generator(device=device).manual_seed(0)
        s = {tap: torch.randn(shape, generator=gen, device=device).to(dtype).requires_grad_()}
        t = {tap: torch.randn(shape, generator=gen, device=device).to(dtype)}
        return method, s, t

    def step(method: torch.nn.Module, s: dict, t: dict) -> float:
        weights = method.loss_weights()
        with autocast(device, dtype):
            terms = method(s, t)
            loss = sum(weights[k] * v.float() for k, v in terms.items())
        loss.backward()
        return float(loss.detach())

    # Warm up both paths of a banded loss (bands forced on the small map, then one pass): the first banded
    # step sets up ~40 MiB of kernel state once (measured at P3: 73 MiB cold, 34 MiB warm), which is not
    # the per-step memory.
    for chunk in (8.0, 0.0) if "chunk_positions" in build_method_defaults(method_name) else (None,):
        warm = build((16, 16), chunk)
        step(*warm)
        del warm
    method, s, t = build(grid_hw)
    if os.environ.get(TIMING_ENV):
        step(method, s, t)
    return measure(lambda: step(method, s, t), device)


def build_method_defaults(name: str) -> dict[str, float]:
    from kdcompress.methods import METHODS

    return dict(METHODS.get(name).default_hparams)


def measure(step: Any, device: str) -> dict[str, Any]:
    """Peak extra memory of ``step()`` (see the module docstring), its time and its return value."""
    import gc

    import torch

    gc.collect()
    cuda = device == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        how = "torch.cuda.max_memory_allocated - allocated before"
    else:
        rss_before = _status_kib("VmRSS") * 1024
        if _reset_peak_rss():
            base = rss_before
            how = "peak RSS (VmHWM reset via /proc/self/clear_refs) - RSS before"
        else:
            base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            how = "ru_maxrss after - ru_maxrss before"
    start = time.perf_counter()
    loss = step()
    if cuda:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    elif how.startswith("peak RSS"):
        peak = _status_kib("VmHWM") * 1024
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    seconds = time.perf_counter() - start
    return {"peak_bytes": max(0, peak - base), "seconds": seconds, "loss": loss, "how": how}


def spawn(case: str, mode: str, size: str, device: str, threads: int, dtype: str, timeout: float,
          timing: bool = False) -> dict:
    """One case in a fresh process: for memory with mmap'd allocations, or (``timing``) with the default
    allocator and one untimed step first, as a training loop runs (every band's allocation being an mmap
    makes the banded CanKD several times slower than it trains)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    if timing:
        env[TIMING_ENV] = "1"
    else:
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    cmd = [sys.executable, __file__, "--child", case, mode, size, device, str(threads), dtype]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{case}/{mode}/{size} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def environment(device: str, threads: int, dtype: str) -> dict[str, object]:
    """The shared record of where a number was measured (CPU model, versions), plus this run's dtype."""
    from kdcompress.profiling.latency import environment as measured_on

    return {**measured_on(device, threads), "dtype": dtype, "batch": 1}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", nargs=6, metavar=("CASE", "MODE", "N", "DEVICE", "THREADS", "DTYPE"))
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="inputs' dtype; a half dtype also runs the step under autocast, as training's amp")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--sizes", nargs="+", default=[str(n) for n in SIZES],
                        help="positions N (square grids) or HxW grids such as 272x200")
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=ALL_CASES)
    parser.add_argument("--modes", nargs="+", default=["naive", "ours"], choices=MODES,
                        help="one-pass: CanKD without row bands (chunk_positions=0)")
    parser.add_argument("--time", action="store_true",
                        help="also time each case in a second process with the default allocator (seconds_default_malloc)")
    parser.add_argument("--naive-budget-gib", type=float, default=4.0,
                        help="skip the naive variant when its extrapolated peak exceeds this")
    parser.add_argument("--ours-max-n", nargs="*", default=["acam_fpn_c256=16384"],
                        help="CASE=N: largest N for 'ours' in that case (CPU runtime cap)")
    parser.add_argument("--out", type=Path, default=RESULT)
    args = parser.parse_args()

    if args.child:
        case, mode, size, device, threads, dtype = args.child
        print(json.dumps(run_case(case, mode, size, device, int(threads), dtype)))
        return

    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    threads = args.threads or torch.get_num_threads()
    ours_cap = {}
    if device == "cpu":
        for item in args.ours_max_n:
            name, _, value = str(item).partition("=")
            ours_cap[name] = int(value)

    rows: list[dict[str, Any]] = []
    header = f"{'case':<16} {'mode':<6} {'N':>6} {'peak MiB':>10} {'B/pos':>8} {'marg B/pos':>10}"
    print(f"{header} {'x prev':>7} {'s':>7}".replace("mode  ", "mode    "))
    for case in args.cases:
        for mode in args.modes:
            if mode == "one-pass" and case not in CASES:
                continue
            last: dict[str, Any] | None = None  # last measured row of this series
            for size in args.sizes:
                h, w = grid(size)
                n = h * w
                row: dict[str, Any] = {
                    "case": case,
                    "description": description(case),
                    "mode": mode,
                    "positions": n,
                    "grid": [h, w],
                    "channels": channels(case),
                }
                skip = None
                if mode == "naive" and last is not None:
                    estimate = last["peak_bytes"] * (n / last["positions"]) ** 2
                    if estimate > args.naive_budget_gib * GiB:
                        skip = (
                            f"skipped (would need ~{estimate / GiB:.1f} GiB, extrapolated "
                            f"quadratically from N={last['positions']})"
                        )
                        row["estimated_peak_bytes"] = int(estimate)
                if mode != "naive" and n > ours_cap.get(case, n):
                    skip = (
                        f"skipped (CPU runtime cap N<={ours_cap[case]}: attention FLOPs grow "
                        "as N² at C=256; its memory is linear)"
                    )
                if skip:
                    row["skipped"] = skip
                    rows.append(row)
                    print(f"{case:<16} {mode:<8} {n:>6} {skip}")
                    continue
                row.update(spawn(case, mode, size, device, threads, args.dtype, timeout=600))
                if args.time:
                    timed = spawn(case, mode, size, device, threads, args.dtype, timeout=600, timing=True)
                    row["seconds_default_malloc"] = timed["seconds"]
                peak = row["peak_bytes"]
                row["bytes_per_position"] = round(peak / n, 1)
                marginal = ratio = None
                if last is not None:
                    # Slope between consecutive sizes: the per-position cost once constant
                    # overheads (kernel scratch buffers, page rounding) cancel out.
                    marginal = round((peak - last["peak_bytes"]) / (n - last["positions"]), 1)
                    row["marginal_bytes_per_position"] = marginal
                    row["positions_ratio"] = n // last["positions"]
                    if last["peak_bytes"] > 0:
                        ratio = round(peak / last["peak_bytes"], 2)
                        row["ratio_to_previous"] = ratio
                rows.append(row)
                print(
                    f"{case:<16} {mode:<8} {n:>6} {peak / MiB:>10.1f}"
                    f" {row['bytes_per_position']:>8} {marginal if marginal is not None else '-':>10}"
                    f" {ratio if ratio is not None else '-':>7} {row['seconds']:>7.2f}"
                    + (f" {row['seconds_default_malloc']:>7.2f}" if args.time else "")
                )
                last = row

    # The same loss from both variants cross-checks that the rows compare like with like.
    for case in args.cases:
        for size in args.sizes:
            n = grid(size)[0] * grid(size)[1]
            pair = [r for r in rows if r["case"] == case and r["positions"] == n and "loss" in r
                    and r["mode"] in ("naive", "ours")]
            if len(pair) == 2:
                a, b = (float(r["loss"]) for r in pair)
                for r in pair:
                    r["loss_rel_diff_naive_vs_ours"] = abs(a - b) / max(abs(a), 1e-12)

    report = {
        "benchmark": "attention_memory",
        "what": f"extra peak memory of one loss (or attention) forward+backward (batch 1, {args.dtype}), naive vs ours",
        "environment": environment(device, threads, args.dtype),
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"saved {args.out.relative_to(ROOT) if args.out.is_relative_to(ROOT) else args.out}")


if __name__ == "__main__":
    main()
