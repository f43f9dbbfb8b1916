"""How repeatable is the built-in digits pretraining? Held-out accuracy per seed and precision.

Runs the same pretraining the pipeline runs (``kdcompress.pretrain``, seeded as the cache path seeds it)
into a temporary folder, once per (seed, precision), and saves the held-out accuracy of each. ``bf16`` is
what the trainer uses on CPUs with native bf16 (autocast), ``fp32`` switches autocast off. The cache is
not touched.

    python benchmarks/pretrain_stability.py                              # mbv2, digits-full's settings, seeds 0-2 bf16 + seed 0 fp32
    python benchmarks/pretrain_stability.py --backbone r18 --steps 200 --lr 0.01

Saves ``benchmarks/results/pretrain_stability_<backbone>_lr<lr>.json``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def run_one(backbone: str, seed: int, precision: str, steps: int, lr: float, image_size: int,
            batch_size: int = 32) -> dict:
    import torch

    from kdcompress import pretrain as P

    cfg = P.PretrainConfig(steps=steps, batch_size=batch_size, lr=lr, image_size=image_size, seed=seed)
    cfg.check()
    with tempfile.TemporaryDirectory() as tmp, torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)  # as ensure_digits_pretrained seeds it
        path = P._pretrain(backbone, 0, cfg, Path(tmp) / f"{backbone}.pth", print, fp32=precision == "fp32")
        record = P.read_pretrain_record(path)
    return {"seed": seed, "precision": precision, "held_out_accuracy": record["held_out_accuracy"],
            "wall_s": record["wall_s"]}


def main() -> None:
    from kdcompress.config import load_recipe

    full = load_recipe("digits-full").pretrain  # the defaults are the papers'-regime recipe's pretraining
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="mbv2")
    ap.add_argument("--steps", type=int, default=full.steps, help=f"default {full.steps}: digits-full's")
    ap.add_argument("--lr", type=float, default=full.lr, help=f"default {full.lr}: digits-full's")
    ap.add_argument("--image-size", type=int, default=full.image_size)
    ap.add_argument("--runs", nargs="+", default=["0:bf16", "1:bf16", "2:bf16", "0:fp32"], help="seed:precision")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    for r in args.runs:
        seed, _, prec = r.partition(":")
        if not seed.isdigit() or prec not in ("bf16", "fp32"):
            ap.error(f"run '{r}' must be seed:bf16 or seed:fp32, e.g. 0:bf16")

    import torch

    from kdcompress.profiling.latency import environment

    rows = []
    for r in args.runs:
        seed, _, prec = r.partition(":")
        if prec == "bf16" and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
            print(f"skip {r}: this CPU has no native bf16 (the trainer runs fp32 here)")
            continue
        row = run_one(args.backbone, int(seed), prec, args.steps, args.lr, args.image_size, full.batch_size)
        rows.append(row)
        print(f"{args.backbone} seed {seed} {prec}: held-out accuracy {100 * row['held_out_accuracy']:.1f} % "
              f"({row['wall_s']:.0f} s)", flush=True)
    out = {"benchmark": "pretrain_stability", "backbone": args.backbone,
           "config": {"steps": args.steps, "batch_size": full.batch_size, "lr": args.lr, "image_size": args.image_size},
           "runs": rows, "environment": environment("cpu")}
    path = args.out or RESULTS / f"pretrain_stability_{args.backbone}_lr{args.lr:g}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"saved {path}")


if __name__ == "__main__":
    main()
