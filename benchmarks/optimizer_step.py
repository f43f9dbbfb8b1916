"""Time of one optimizer step on the zoo models' parameters, per-tensor loop vs torch's fused kernels.

The trainer builds SGD/AdamW with ``fused=True`` on CPU and CUDA (``build_optimizer``); this measures
why, side by side in one process (median of ``--iters`` steps after 2 warm-up steps, random grads).

    python benchmarks/optimizer_step.py [--iters 10]

Saves ``benchmarks/results/optimizer_step.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "optimizer_step.json"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--models", nargs="+", default=["deeplabv3plus-r18", "deeplabv3plus-mbv2"])
    args = ap.parse_args()
    import torch

    from kdcompress.engine.checkpoint import atomic_write_text
    from kdcompress.models import build_model
    from kdcompress.profiling.latency import environment

    rows = []
    for name in args.models:
        net = build_model(name, 11)
        for p in net.parameters():
            p.grad = torch.randn_like(p)
        for opt_name, make in (("sgd", lambda ps, **k: torch.optim.SGD(ps, 0.01, momentum=0.9, weight_decay=1e-4, **k)),
                               ("adamw", lambda ps, **k: torch.optim.AdamW(ps, 0.003, weight_decay=1e-4, **k))):
            row = {"model": name, "optimizer": opt_name, "params": sum(p.numel() for p in net.parameters())}
            for label, kw in (("loop_ms", {"foreach": False}), ("foreach_ms", {"foreach": True}), ("fused_ms", {"fused": True})):
                opt = make(list(net.parameters()), **kw)
                for _ in range(2):
                    opt.step()
                times = []
                for _ in range(args.iters):
                    t0 = time.perf_counter()
                    opt.step()
                    times.append(1000 * (time.perf_counter() - t0))
                row[label] = statistics.median(times)
            row["fused_speedup_vs_loop"] = row["loop_ms"] / row["fused_ms"]
            rows.append(row)
            print(f"{name:22s} {opt_name:5s} loop {row['loop_ms']:7.1f} ms  foreach {row['foreach_ms']:7.1f} ms  "
                  f"fused {row['fused_ms']:7.1f} ms  ({row['fused_speedup_vs_loop']:.1f}x)", flush=True)
    atomic_write_text(RESULTS, json.dumps({"benchmark": "optimizer_step", "rows": rows, "iters": args.iters,
                                           "torch_threads": torch.get_num_threads(),
                                           "environment": environment("cpu")}, indent=2))
    print(f"saved {RESULTS}")


if __name__ == "__main__":
    main()
