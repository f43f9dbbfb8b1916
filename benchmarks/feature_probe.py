"""How far does each method move the student's features toward the teacher's, and what stands in between?

CanKD's loss compares IN(Can(y_s, y_t)) with IN(y_t), and the block reads the teacher's map (its keys and
values). So a falling loss can mean that the student's map moved toward the teacher's, or that the block
learned to bridge a gap the student keeps. ``benchmarks/efficacy.py`` found CanKD's students end with a
linear CKA to the teacher below the CE-only control's; this probe measures, on the finished (cached) runs
of that benchmark and on validation images:

* for every row: ``r2``, the share of the teacher's instance-normalised ``stage4`` map that a least-squares
  1×1 map (ridge) predicts from the student's, fitted on half the images and scored on the other half.
  Unlike linear CKA it ignores any invertible linear change of the student's channels, which CanKD's
  adapter and block are free to apply. ``r2_raw``: the same on the raw maps (no instance norm), where the
  teacher's channels count by their variance, as in plain MSE. ``*_init``: the pretrained student's.
* for CanKD rows, with the trained adapter and block: ``loss_block`` (the loss as trained),
  ``loss_no_block`` (IN-MSE between the adapted student map and the teacher's: the block removed),
  ``loss_shuffled`` (the block given another image's teacher keys/values, scored against the student's own
  image's teacher map: does the block carry image-specific teacher content?), and
  ``branch_ratio`` = ‖block(y_s) − y_s‖ ÷ ‖y_s‖ (how much the block changes the student's map).
* once: ``attnfd_target_cosine``, the cosine between each image's teacher ``backbone`` map and the copy
  AttnFD distils toward by default (through the frozen, seeded teacher-side CBAM): how far that gate moves
  the target away from the teacher's own map.

Reads the runs of ``efficacy.py --recipe digits-full`` (run that first); trains nothing.

    python benchmarks/feature_probe.py     # the five-seed rows -> results/feature_probe.json
    python benchmarks/feature_probe.py --rows cankd cankd:block=0 --seeds 0 1 2 --out results/x.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from efficacy import teacher_key  # noqa: E402  (the benchmark's own cache layout)

ROWS = ["none", "kd", "mse", "cankd", "acam:taps=backbone", "attnfd:taps=backbone"]
TAP = "stage4"


def ridge_r2(xs: Any, ys: Any, lam: float = 1e-3) -> float:
    """1 − held-out MSE / variance of Y for Y ≈ X W + b fitted on the first half of the rows."""
    import torch

    n = xs.shape[0] // 2
    x_fit, y_fit, x_val, y_val = xs[:n], ys[:n], xs[n:], ys[n:]
    mx, my = x_fit.mean(0), y_fit.mean(0)
    a = (x_fit - mx).T @ (x_fit - mx)
    a += lam * a.diagonal().mean() * torch.eye(a.shape[0], dtype=a.dtype)
    w = torch.linalg.solve(a, (x_fit - mx).T @ (y_fit - my))
    resid = (y_val - my - (x_val - mx) @ w).pow(2).sum()
    return float(1 - resid / (y_val - y_val.mean(0)).pow(2).sum())


def positions(feat: Any, normalise: bool = True) -> Any:
    """B×C×H×W map (instance-normalised unless ``normalise=False``) → (B·H·W)×C rows, float64 for the solve."""
    import torch.nn.functional as F

    feat = F.instance_norm(feat.double()) if normalise else feat.double()
    return feat.permute(0, 2, 3, 1).flatten(0, 2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="digits-full")
    ap.add_argument("--rows", nargs="+", default=ROWS)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--images", type=int, default=200, help="validation images (half fit, half score)")
    ap.add_argument("--work", type=Path, default=None, help="efficacy cache (default $KDCOMPRESS_CACHE/efficacy)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "feature_probe.json")
    args = ap.parse_args()

    import torch
    import torch.nn.functional as F
    import yaml

    from kdcompress.config import load_recipe
    from kdcompress.data import dataset_info
    from kdcompress.data.digits import cache_dir
    from kdcompress.engine.checkpoint import atomic_write_text, load_model
    from kdcompress.engine.trainer import build_datasets, seed_everything
    from kdcompress.methods import build_method
    from kdcompress.methods.attnfd import TEACHER_CBAM_SEED, frozen_cbam
    from kdcompress.methods.base import resize_to
    from kdcompress.methods.cankd import instance_norm_mse
    from kdcompress.models import backbone_of, build_model
    from kdcompress.pretrain import resolve_pretrained
    from kdcompress.profiling.latency import environment
    from kdcompress.taps import record, tap_shapes
    from kdcompress.tasks import task_for

    base = load_recipe(args.recipe, [])
    task = task_for(dataset_info(base.data.name, **base.data.options))
    work = args.work or cache_dir() / "efficacy"
    tckpt = work / f"teacher-{hashlib.sha256(teacher_key(base).encode()).hexdigest()[:12]}" / "model.pt"
    if not tckpt.is_file():
        raise SystemExit(f"no cached teacher at {tckpt}: run benchmarks/efficacy.py --recipe {args.recipe} first")
    teacher, _ = load_model(tckpt)
    teacher.eval()
    _, val_set = build_datasets(base.data, task)
    images, _ = task.collate([val_set[i] for i in range(min(args.images, len(val_set)))])
    chunks = images.split(50)  # the validation batch size: BN in the block sees batches as in training

    def feats(model: Any, tap: str = TAP) -> Any:
        """The model's ``tap`` map on every probe image (eval mode)."""
        model.eval()
        with torch.no_grad(), record(model, [tap]) as f:
            return torch.cat([(model(x), f[tap].float())[1] for x in chunks])

    t_map = feats(teacher)
    t_rows, t_raw = positions(t_map), positions(t_map, normalise=False)
    t_backbone = feats(teacher, "backbone")
    with torch.no_grad():
        gated = frozen_cbam(t_backbone.shape[1], TEACHER_CBAM_SEED)(t_backbone)  # AttnFD's first tap
    cosine = F.cosine_similarity(t_backbone.flatten(1), gated.flatten(1), dim=1)
    attnfd_cos = {"mean": float(cosine.mean()), "min": float(cosine.min())}
    print(f"AttnFD's default target against the teacher's backbone map: cosine {attnfd_cos['mean']:.3f} "
          f"(min {attnfd_cos['min']:.3f})", flush=True)

    def r2(s_map: Any, normalise: bool = True) -> float:
        if s_map.shape[-2:] != t_map.shape[-2:]:
            s_map = F.interpolate(s_map, size=t_map.shape[-2:], mode="bilinear", align_corners=False)
        return ridge_r2(positions(s_map, normalise), t_rows if normalise else t_raw)

    seed_everything(0)
    pre = resolve_pretrained(base.student.pretrained, backbone_of(base.student.model), data_name=base.data.name,
                             data_seed=int(base.data.options.get("seed", 0)), cfg=base.pretrain)
    init_student = build_model(base.student.model, int(teacher.num_classes), base.student.output_stride, pre or False)
    init_map = feats(init_student)
    r2_init, r2_raw_init = r2(init_map), r2(init_map, normalise=False)
    print(f"teacher {tckpt.parent.name}; pretrained student: R² {r2_init:.3f}, raw {r2_raw_init:.3f}", flush=True)

    def run_dir(label: str, seed: int) -> Path | None:
        for d in sorted(work.glob(f"{label.split(':')[0]}-s{seed}-*")):
            res, cfg = d / "result.json", d / "config.yaml"
            if res.is_file() and cfg.is_file() and json.loads(res.read_text())["method"] == label and \
                    yaml.safe_load(cfg.read_text())["distill"]["teacher_checkpoint"] == str(tckpt):
                return d
        return None

    runs: list[dict[str, Any]] = []
    for label in args.rows:
        for seed in args.seeds:
            d = run_dir(label, seed)
            if d is None:
                print(f"{label} seed {seed}: no finished run, skipped", flush=True)
                continue
            student, _ = load_model(d / "model.pt")
            s_map = feats(student)
            row: dict[str, Any] = {"row": label, "seed": seed, "mIoU": json.loads((d / "result.json").read_text())["mIoU"],
                                   "r2": r2(s_map), "r2_raw": r2(s_map, normalise=False)}
            if label.split(":")[0] == "cankd":
                cfg = yaml.safe_load((d / "config.yaml").read_text())["distill"]
                crop = tuple(base.data.crop_size)
                method = build_method("cankd", tap_shapes(student, crop), tap_shapes(teacher, crop),
                                      int(teacher.num_classes), taps=cfg["taps"], **cfg["hparams"])
                task_state = torch.load(d / "state.pt", weights_only=True)["task"]
                method.load_state_dict({k.removeprefix("method."): v for k, v in task_state.items()
                                        if k.startswith("method.")})
                method.train()  # the block's BN on batch statistics, as the loss saw it
                tap = method.taps[0]
                s_tap, t_tap = (s_map, t_map) if tap == TAP else (feats(student, tap), feats(teacher, tap))
                block, adapter = method.can[tap] if tap in method.can else None, method.adapter[tap]
                vals: dict[str, list[float]] = {"loss_no_block": []} if block is None else \
                    {"loss_block": [], "loss_no_block": [], "loss_shuffled": [], "branch_ratio": []}
                with torch.no_grad():
                    for ys_raw, yt in zip(s_tap.split(50), t_tap.split(50)):
                        ys = resize_to(adapter(ys_raw), yt)
                        vals["loss_no_block"].append(float(instance_norm_mse(ys, yt)))
                        if block is None:  # the block=0 ablation
                            continue
                        z = block(ys, yt)
                        vals["loss_block"].append(float(instance_norm_mse(z, yt)))
                        # another image's teacher keys/values, scored against the student's own image
                        vals["loss_shuffled"].append(float(instance_norm_mse(block(ys, yt.roll(1, 0)), yt)))
                        vals["branch_ratio"].append(float((z - ys).norm() / ys.norm()))
                row |= {k: statistics.mean(v) for k, v in vals.items()}
            runs.append(row)
            print("  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()), flush=True)

    table = []
    for label in args.rows:
        rs = [r for r in runs if r["row"] == label]
        if rs:
            keys = [k for k in rs[0] if k not in ("row", "seed")]
            table.append({"row": label, "seeds": [r["seed"] for r in rs]} |
                         {k: statistics.mean(r[k] for r in rs) for k in keys})
    print(f"\n{'row':24s} {'mIoU':>6s} {'R²':>6s} {'raw':>6s}  (pretrained student: R² {r2_init:.3f}, raw {r2_raw_init:.3f})")
    for t in table:
        extra = "".join(f"  {k} {t[k]:.3f}" for k in ("loss_block", "loss_no_block", "loss_shuffled", "branch_ratio")
                        if k in t)
        print(f"{t['row']:24s} {100 * t['mIoU']:6.2f} {t['r2']:6.3f} {t['r2_raw']:6.3f}{extra}")
    out = {"benchmark": "feature_probe", "recipe": args.recipe, "tap": TAP, "images": len(images),
           "teacher": tckpt.parent.name, "r2_init": r2_init, "r2_raw_init": r2_raw_init,
           "attnfd_target_cosine": attnfd_cos, "table": table, "runs": runs,
           "environment": environment("cpu")}
    atomic_write_text(args.out, json.dumps(out, indent=2))
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
