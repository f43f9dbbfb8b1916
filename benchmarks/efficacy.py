"""Efficacy on the built-in dataset: does each method beat plain training and logit KD?

One teacher is trained once with the recipe's teacher schedule (cached), then the student is
trained with every method over several seeds on the *same* schedule. Prints and saves a table
like AttnFD Table 1: mIoU mean ± std, gain over ``none``, share of the teacher–student gap
recovered. Each finished run is cached, so an interrupted benchmark continues where it stopped.

    python benchmarks/efficacy.py                       # recipe digits, 3 seeds, all methods
    python benchmarks/efficacy.py --seeds 0 1 --methods none attnfd attnfd:alpha=50

A method given as ``name:key=value,...`` is a variant with those hyperparameters (its own row);
plain names run with the method's defaults (the recipe's ``distill.hparams`` are not applied, so
every method is measured as specified).

Saves ``benchmarks/results/efficacy.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import asdict
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
METHODS = ["none", "kd", "mse", "attnfd", "acam", "cankd"]


def parse_variant(label: str) -> tuple[str, dict[str, float]]:
    """'attnfd:alpha=50,...' -> ('attnfd', {'alpha': 50.0}); a plain name has no overrides."""
    method, _, rest = label.partition(":")
    hparams = {}
    for item in filter(None, rest.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"bad method variant {label!r}: write name:key=value[,key=value]")
        hparams[key] = float(value)
    return method, hparams


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="digits")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--methods", nargs="+", default=METHODS)
    ap.add_argument("--set", dest="sets", action="append", default=[], help="recipe override, e.g. student.train.steps=300")
    ap.add_argument("--teacher", type=Path, default=None,
                    help="use this teacher checkpoint (e.g. from `kdcompress pipeline digits`) instead of training one")
    ap.add_argument("--work", type=Path, default=None, help="cache folder (default $KDCOMPRESS_CACHE/efficacy)")
    ap.add_argument("--out", type=Path, default=RESULTS / "efficacy.json")
    args = ap.parse_args()

    import torch

    from kdcompress.config import load_recipe, role_train
    from kdcompress.data.digits import cache_dir
    from kdcompress.engine.checkpoint import atomic_write_text, load_model_checkpoint
    from kdcompress.engine.trainer import train
    from kdcompress.profiling.latency import environment

    base = load_recipe(args.recipe, args.sets)
    work = args.work or cache_dir() / "efficacy"
    t_start = time.perf_counter()

    key = json.dumps([asdict(base.data), asdict(base.teacher), asdict(role_train(base, "teacher"))], sort_keys=True)
    import hashlib

    tdir = args.teacher.parent if args.teacher else work / f"teacher-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
    tckpt = args.teacher or tdir / "model.pt"
    meta = load_model_checkpoint(tckpt)["meta"] if tckpt.is_file() else {}
    if meta and meta.get("step") == meta.get("total_steps"):
        teacher_miou = meta["metrics"]["mIoU"]
        teacher_wall = None
        print(f"teacher (cached): {tckpt}  mIoU {teacher_miou:.4f}", flush=True)
    else:
        res = train(base, "teacher", tdir, resume=(tdir / "state.pt").is_file(), force=True)
        teacher_miou, teacher_wall = res.metrics["mIoU"], res.wall_s
        print(f"teacher: mIoU {teacher_miou:.4f} in {res.wall_s:.0f} s", flush=True)

    runs = []
    for label in args.methods:
        method, hparams = parse_variant(label)
        for seed in args.seeds:
            r = load_recipe(args.recipe, args.sets + [f"student.train.seed={seed}", f"distill.method={method}",
                                                      f"distill.teacher_checkpoint={tckpt}"])
            r.distill.hparams = hparams
            rkey = json.dumps([asdict(r.data), asdict(r.student), asdict(role_train(r, "student")),
                               asdict(r.distill), str(tdir)], sort_keys=True)
            rdir = work / f"{method}-s{seed}-{hashlib.sha256(rkey.encode()).hexdigest()[:12]}"
            cached = rdir / "result.json"
            if cached.is_file():
                row = json.loads(cached.read_text())
            else:
                res = train(r, "student", rdir, force=True, progress=True)
                row = {"method": label, "seed": seed, "mIoU": res.metrics["mIoU"], "wall_s": res.wall_s}
                atomic_write_text(cached, json.dumps(row))  # an interrupted run never leaves half a result
            runs.append(row)
            print(f"{label:16s} seed {seed}: mIoU {row['mIoU']:.4f} ({row['wall_s']:.0f} s)", flush=True)

    none = [x["mIoU"] for x in runs if x["method"] == "none"]
    none_mean = statistics.mean(none) if none else float("nan")
    gap = teacher_miou - none_mean
    table = []
    for method in args.methods:
        vals = [x["mIoU"] for x in runs if x["method"] == method]
        mean = statistics.mean(vals)
        table.append({"method": method, "mIoU_mean": mean, "mIoU_std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
                      "gain_over_none": mean - none_mean, "gap_recovered": (mean - none_mean) / gap if gap > 0 else None,
                      "runs": vals, "mean_wall_s": statistics.mean(x["wall_s"] for x in runs if x["method"] == method)})
    print(f"\nteacher {base.teacher.model}: mIoU {100 * teacher_miou:.2f}   student {base.student.model}, "
          f"{role_train(base, 'student').steps} steps, seeds {args.seeds}")
    print(f"{'method':16s} {'mIoU (%)':>14s} {'gain':>7s} {'gap rec.':>9s}")
    for t in table:
        rec = "n/a" if t["gap_recovered"] is None else f"{100 * t['gap_recovered']:.0f} %"
        print(f"{t['method']:16s} {100 * t['mIoU_mean']:7.2f} ± {100 * t['mIoU_std']:4.2f} "
              f"{100 * t['gain_over_none']:+7.2f} {rec:>9s}")
    out = {"benchmark": "efficacy", "recipe": base.name, "teacher": {"model": base.teacher.model, "mIoU": teacher_miou,
                                                                     "wall_s": teacher_wall,
                                                                     "train": asdict(role_train(base, "teacher"))},
           "student": {"model": base.student.model, "train": asdict(role_train(base, "student"))},
           "overrides": args.sets, "seeds": args.seeds, "table": table, "runs": runs,
           "wall_s": time.perf_counter() - t_start,
           "runs_wall_s": sum(x["wall_s"] for x in runs), "torch_threads": torch.get_num_threads(),
           "environment": environment("cpu")}
    atomic_write_text(args.out, json.dumps(out, indent=2))
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
