"""Cost of each distillation method over plain training with the same teacher forward.

For every method we time the training step the trainer runs (teacher forward under no_grad,
student forward with taps, loss, backward, optimizer step) and measure its peak memory, and
divide by the ``none`` step (the same teacher forward and student step, no distillation loss).
Each method runs in its own subprocess so memory peaks do not hide each other.

    python benchmarks/kd_overhead.py                 # CPU at the built-in recipe's shapes
    python benchmarks/kd_overhead.py --device cuda   # the papers' shapes (512x1024, batch 4)

Saves ``benchmarks/results/kd_overhead_<device>.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path



def all_methods() -> list[str]:
    """Every registered method, ``none`` first (the baseline every ratio divides by)."""
    from kdcompress.methods import METHODS

    return ["none"] + [m for m in METHODS.names() if m != "none"]
RESULTS = Path(__file__).parent / "results"


def one(method: str, teacher: str, student: str, size: tuple[int, int], batch: int, device: str, steps: int,
        warmup: int, amp: bool) -> dict:
    import torch

    from kdcompress.engine.trainer import TrainTask, amp_dtype_for
    from kdcompress.methods import build_method
    from kdcompress.models import build_model
    from kdcompress.profiling.latency import CpuPeakMemory
    from kdcompress.taps import record, tap_shapes

    torch.manual_seed(0)
    dev = torch.device(device)
    k = 19 if device == "cuda" else 11
    t_model = build_model(teacher, k).to(dev).eval()
    for p in t_model.parameters():
        p.requires_grad_(False)
    s_model = build_model(student, k).to(dev)
    meth = None
    taps: list[str] = []
    if method != "none":
        s_shapes, t_shapes = tap_shapes(s_model, size), tap_shapes(t_model, size)
        meth = build_method(method, s_shapes, t_shapes, k).to(dev)
        taps = list(meth.taps)
    from types import SimpleNamespace

    from kdcompress.tasks import task_for

    seg = task_for(SimpleNamespace(num_classes=k, class_names=tuple(map(str, range(k))), ignore_index=255))
    task = TrainTask(s_model, meth, taps, seg).to(dev).train()
    opt = torch.optim.SGD([p for p in task.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)
    # Same mixed precision as the trainer: fp16 + GradScaler on CUDA, bf16 on CPUs that run it natively.
    amp_dtype = amp_dtype_for(dev) if amp else None
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    x = torch.randn(batch, 3, *size, device=dev)
    y = torch.randint(0, k, (batch, *size), device=dev)
    # "none" still runs the teacher forward on the default methods' taps: the ratio isolates the loss.
    t_taps = taps or ["logits"]
    weights = meth.loss_weights() if meth is not None else {}

    def step() -> None:
        with torch.autocast(dev.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            with torch.no_grad(), record(t_model, t_taps) as tf:
                t_model(x)
                feats = dict(tf)
            terms = task(x, y, feats if meth is not None else None)
        loss = sum(weights.get(n, 1.0) * v.float() for n, v in terms.items())
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    times = []
    if dev.type == "cuda":
        for _ in range(warmup):
            step()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        for _ in range(steps):
            t0 = time.perf_counter()
            step()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        mem = {"peak_allocated_mib": torch.cuda.max_memory_allocated() / 2**20,
               "peak_reserved_mib": torch.cuda.max_memory_reserved() / 2**20, "baseline_mib": base / 2**20}
        peak = mem["peak_allocated_mib"]
    else:
        # From before the first step: after warm-up the allocator already holds the activations.
        with CpuPeakMemory() as pm:
            for _ in range(warmup):
                step()
            for _ in range(steps):
                t0 = time.perf_counter()
                step()
                times.append(time.perf_counter() - t0)
        mem = {"peak_rss_growth_mib": pm.peak_delta / 2**20, "method": pm.method}
        peak = mem["peak_rss_growth_mib"]
    extra = sum(p.numel() for p in meth.parameters()) if meth is not None else 0
    return {"method": method, "median_step_s": statistics.median(times), "steps": steps, "peak_mib": peak,
            "amp_dtype": str(amp_dtype).replace("torch.", "") if amp_dtype else "fp32",
            "memory": mem, "method_params": extra}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--child", nargs="*", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        method, teacher, student, h, w, batch, device, steps, warmup, amp = args.child
        res = one(method, teacher, student, (int(h), int(w)), int(batch), device, int(steps), int(warmup), amp == "1")
        print("RESULT " + json.dumps(res))
        return

    import torch

    from kdcompress.profiling.latency import environment

    if args.device == "cuda":
        if not torch.cuda.is_available():
            sys.exit("no CUDA device: run without --device cuda for the CPU benchmark")
        # The papers' shapes: DeepLabV3+-R101 teacher, MBV2 and R18 students, 512x1024, batch 4, AMP.
        configs = [("deeplabv3plus-r101", "deeplabv3plus-mbv2"), ("deeplabv3plus-r101", "deeplabv3plus-r18")]
        size, batch, steps, warmup, amp = (512, 1024), 4, args.steps or 20, 5, True
    else:
        # The built-in recipe's shapes (profiles/recipes/digits.yaml).
        configs = [("deeplabv3plus-r18", "deeplabv3plus-mbv2")]
        size, batch, steps, warmup, amp = (96, 96), 16, args.steps or 10, 2, True
    rows = []
    for teacher, student in configs:
        for method in all_methods():
            cmd = [sys.executable, __file__, "--child", method, teacher, student, str(size[0]), str(size[1]),
                   str(batch), args.device, str(steps), str(warmup), "1" if amp else "0"]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            res = json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:])
            res.update(teacher=teacher, student=student)
            rows.append(res)
            print(f"{teacher} -> {student} {method:7s} step {1000 * res['median_step_s']:8.1f} ms  "
                  f"peak {res['peak_mib']:8.1f} MiB", flush=True)
        base = next(r for r in rows if r["method"] == "none" and r["student"] == student and r["teacher"] == teacher)
        for r in rows:
            if r["student"] == student and r["teacher"] == teacher:
                r["time_ratio"] = r["median_step_s"] / base["median_step_s"]
                r["memory_ratio"] = r["peak_mib"] / base["peak_mib"] if base["peak_mib"] > 0 else None
    print(f"\n{'teacher -> student':45s} {'method':7s} {'time x none':>11s} {'memory x none':>13s}")
    for r in rows:
        mr = "n/a" if r["memory_ratio"] is None else f"{r['memory_ratio']:.3f}"
        print(f"{r['teacher'] + ' -> ' + r['student']:45s} {r['method']:7s} {r['time_ratio']:11.3f} {mr:>13s}")
    out = {"benchmark": "kd_overhead", "device": args.device, "input_size": list(size), "batch": batch, "amp": amp,
           "steps": steps, "warmup": warmup, "memory_measure": "CUDA max_memory_allocated" if args.device == "cuda"
           else "peak RSS growth from before the first step (warm-up included)", "environment": environment(args.device), "rows": rows}
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"kd_overhead_{args.device}.json"
    path.write_text(json.dumps(out, indent=2))
    print(f"saved {path}")


if __name__ == "__main__":
    main()
