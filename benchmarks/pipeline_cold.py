"""Cold wall time of the README's main command, `kdcompress pipeline digits` (or another built-in recipe).

Cold means an empty ``$KDCOMPRESS_CACHE`` (dataset generation and the built-in pretraining
included) and an empty run folder; the install is excluded. Prints and saves the wall time, the
stage times from ``pipeline.json``, the three models' headline metric (mIoU, or mAP for ``digits-det``) and
the CPU model.

    python benchmarks/pipeline_cold.py                 # runs it (8.3 min on a 2-core AMD EPYC Zen 5)
    python benchmarks/pipeline_cold.py --record DIR --wall-s 1738   # record a run made by hand the same way
    python benchmarks/pipeline_cold.py --recipe digits-det          # -> results/pipeline_digits-det_cold.json

Saves ``benchmarks/results/pipeline_digits_cold.json`` (runs are appended, so two measurements sit
side by side).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def _commit() -> str | None:
    """The code that was measured (the checkout this script sits in)."""
    try:
        return subprocess.run(["git", "-C", str(Path(__file__).resolve().parent), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def summarize(run: Path, wall_s: float, how: str, recipe: str) -> dict:
    from kdcompress.profiling.latency import environment

    report = json.loads((run / "report.json").read_text())
    stages = json.loads((run / "pipeline.json").read_text())["stages"]
    h = report["headline"]
    return {
        "command": f"kdcompress pipeline {recipe}", "cold": True, "how": how, "wall_s": wall_s,
        "stage_wall_s": {k: v["wall_s"] for k, v in stages.items()},
        h: {k: v[h] for k, v in report["evaluation"].items()},
        "eval_images": {k: v.get("images") for k, v in report["evaluation"].items()},
        "exports": {k: {x: v.get(x) for x in ("metric_torch", "metric_artifact", "drop")} for k, v in report["exports"].items()},
        "git_commit": _commit(),
        "environment": environment("cpu"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--record", type=Path, help="a finished run folder (runs/pipeline-digits) made cold by hand")
    ap.add_argument("--wall-s", type=float, help="its wall time, measured by the shell")
    ap.add_argument("--recipe", default="digits", help="built-in recipe (digits, digits-full, digits-det)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    args.out = args.out or RESULTS / f"pipeline_{args.recipe}_cold.json"
    if args.record:
        if args.wall_s is None:
            sys.exit("--record needs --wall-s (the shell's measurement of the same run)")
        row = summarize(args.record, args.wall_s,
                        f"by hand: KDCOMPRESS_CACHE=<empty folder> kdcompress pipeline {args.recipe}", args.recipe)
    else:
        with tempfile.TemporaryDirectory(prefix="kd-cold-") as tmp:
            env = dict(os.environ, KDCOMPRESS_CACHE=str(Path(tmp) / "cache"))
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-m", "kdcompress", "pipeline", args.recipe, "--out", str(Path(tmp) / "run")],
                           env=env, check=True)
            row = summarize(Path(tmp) / "run", time.perf_counter() - t0, "benchmarks/pipeline_cold.py", args.recipe)
    runs = json.loads(args.out.read_text())["runs"] if args.out.is_file() else []
    runs.append(row)
    from kdcompress.engine.checkpoint import atomic_write_text

    atomic_write_text(args.out, json.dumps({"benchmark": "pipeline_cold", "runs": runs}, indent=2))
    print(f"cold pipeline: {row['wall_s']:.0f} s; stages " +
          ", ".join(f"{k} {v:.0f} s" for k, v in row["stage_wall_s"].items()) +
          "; " + "; ".join(f"{h} " + ", ".join(f"{k} {100 * v:.2f}" for k, v in row[h].items())
                           for h in ("mIoU", "mAP") if h in row))
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
