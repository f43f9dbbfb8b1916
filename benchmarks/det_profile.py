"""Detector efficiency like ACAM-KD Table 6: params, GMACs, memory, latency, FPS at 1088x800, batch 1.

Profiles the papers' teachers and students (RetinaNet / Faster R-CNN R101 and R50, FPN, 80 classes +
background) and the CPU-sized students, all in one run with the same settings, through the library's
``profile_many`` (the same code as ``kdcompress profile``). Random weights: latency includes
torchvision's post-processing, whose cost depends on how many boxes pass the score threshold.

    python benchmarks/det_profile.py                     # CPU, 3 timed iterations per model
    python benchmarks/det_profile.py --device cuda --iters 50
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
MODELS = ["retinanet-r101", "retinanet-r50", "fasterrcnn-r101", "fasterrcnn-r50", "fcos-r50",
          "retinanet-r18", "retinanet-mbv3"]
# ACAM-KD Table 6 (A100, mmdet, 1088x800): params M / GFLOPs (their 'FLOPs' are MACs) / memory MB / FPS
PAPER = {"retinanet-r101": (56.96, 283, 220, 30.7), "retinanet-r50": (37.97, 215, 148, 41.9),
         "fasterrcnn-r101": (60.75, 255, 244, 31.1), "fasterrcnn-r50": (41.75, 187, 171, 42.1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=MODELS)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    import torch

    from kdcompress.engine.checkpoint import atomic_write_text
    from kdcompress.profiling import profile_many

    torch.manual_seed(0)
    rows = profile_many(args.models, progress=True, input_size=(800, 1088), batch=1, device=args.device,
                        warmup=args.warmup, iters=args.iters, num_classes=81)
    print(f"{'model':18s} {'params M':>9s} {'GMACs':>7s} {'mem MB':>7s} {'latency ms':>11s} {'FPS':>6s}   paper "
          f"(params / GMACs / MB / FPS on A100)")
    for r in rows:
        lat = r["latency_ms"]["median_ms"]
        paper = PAPER.get(r["target"])
        print(f"{r['target']:18s} {r['params'] / 1e6:9.2f} {r['gmacs']:7.1f} {r.get('memory_mb') or 0:7.0f} "
              f"{lat:11.1f} {r['fps']:6.2f}   {paper or ''}")
    out = args.out or RESULTS / f"det_profile_{args.device}.json"
    atomic_write_text(out, json.dumps({"benchmark": "det_profile", "input_size": [800, 1088], "batch": 1,
                                       "paper_table6": PAPER, "rows": rows}, indent=2, default=str))
    print(f"saved {out}")


if __name__ == "__main__":
    main()
