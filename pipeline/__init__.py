"""``kdcompress pipeline``: teacher -> plain student -> distilled student -> evaluate -> export -> profile -> gates.

Every stage writes its outputs into one run folder and records a fingerprint (the part of the
resolved recipe it depends on plus the hashes of its inputs) in ``pipeline.json``. A re-run skips
a stage only if its fingerprint matches *and* its outputs still check out (checkpoint loads and
finished its schedule, artifact sidecar matches the checkpoint and passed verification).
"""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from rich.console import Console

from kdcompress.config import Recipe, role_train, to_yaml
from kdcompress.engine.checkpoint import atomic_write_text, load_model_checkpoint, paired, sha256_file
from kdcompress.errors import ConfigError, GateError, KdError, MissingDependencyError

PIPELINE_FILE = "pipeline.json"
GATE_KEYS = ("min_miou", "max_export_drop", "min_fps", "max_latency_ms", "gate_artifact")
#: The three models by role id (the keys of every stage record); the labels are for display only.
MODEL_LABELS = {"teacher": "teacher", "baseline": "student (plain)", "student": "student (distilled)"}
ARTIFACT_TARGETS = ("onnx", "ort-int8")  # pipeline.export; TensorRT through pipeline.tensorrt or pipeline.target


@dataclass
class ModelRecord:
    """A trained (or given) checkpoint of one role: what the later stages and the report read."""

    checkpoint: str
    sha256: str
    metric: float | None  # the task's headline on the validation split at the end of training
    steps: int | None
    train_wall_s: float | None = None
    log: str | None = None
    given: bool = False


@dataclass
class ExportRecord:
    """One verified artifact (or why it was skipped)."""

    target: str
    artifact: str | None = None
    sidecar: str | None = None
    precision: str | None = None
    metric_torch: float | None = None  # the task's headline of PyTorch and of the artifact, same images
    metric_artifact: float | None = None
    drop: float | None = None
    parity: dict[str, Any] | None = None  # the task's parity report (segmentation: max_abs, argmax_agreement)
    timings: dict[str, float] | None = None
    skipped: str | None = None


@dataclass
class PipelineOptions:
    """The recipe's ``pipeline:`` section (unknown keys rejected)."""

    baseline: bool = True  # train a plain student on the same budget, for the comparison
    export: tuple[str, ...] = ("onnx", "ort-int8")  # onnx always; ort-int8 optional
    tensorrt: str = "off"  # off | auto (when installed) | fp16 | int8 (required)
    target: str | None = None  # a deployment preset (profiles/targets): its export, tolerances and profile settings
    max_eval_images: int | None = None
    verify_images: int = 8
    calib_images: int = 32
    profile_size: list[int] | None = None  # [H, W]; default: the distilled student's export size
    profile_iters: int = 30
    profile_threads: int | None = None
    min_miou: float | None = None
    max_export_drop: float | None = None
    min_fps: float | None = None
    max_latency_ms: float | None = None
    gate_artifact: str = "onnx"  # which artifact's FPS / latency the speed gates read: onnx | ort-int8 | torch

    @staticmethod
    def from_recipe(recipe: Recipe) -> "PipelineOptions":
        from kdcompress.config import check_fields, check_unknown

        check_unknown(recipe.pipeline, PipelineOptions.__dataclass_fields__, "pipeline")
        opts = PipelineOptions(**recipe.pipeline)
        check_fields(opts, "pipeline")
        opts.export = tuple(opts.export)
        bad = [t for t in opts.export if t not in ARTIFACT_TARGETS]
        if bad:
            raise ConfigError(f"pipeline.export accepts onnx and ort-int8 (TensorRT via pipeline.tensorrt), got {bad}.")
        if opts.tensorrt not in ("off", "auto", "fp16", "int8"):
            raise ConfigError(f"pipeline.tensorrt must be off, auto, fp16 or int8, got {opts.tensorrt!r}.")
        if opts.gate_artifact not in ("onnx", "ort-int8", "tensorrt", "target", "torch"):
            raise ConfigError(f"pipeline.gate_artifact must be onnx, ort-int8, tensorrt, target or torch, "
                              f"got {opts.gate_artifact!r}.")
        if opts.target is not None:
            from kdcompress.config import load_target

            load_target(opts.target)  # unknown name, bad YAML or unknown keys: one line, before anything runs
        return opts

    def target_preset(self) -> dict[str, Any] | None:
        from kdcompress.config import load_target

        return load_target(self.target) if self.target is not None else None


def _sha(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]




class Pipeline:
    """Runs the stages in order; ``state`` (pipeline.json) is rewritten atomically after each."""

    def __init__(self, recipe: Recipe, out: Path, *, force: bool = False, resume: bool = False,
                 progress: bool = True, console: Console | None = None) -> None:
        self.recipe, self.out, self.resume, self.progress = recipe, Path(out), resume, progress
        self.opts = PipelineOptions.from_recipe(recipe)
        self.console = console or Console(stderr=True)
        # Gates judge a run; they do not change it, so changing one does not make this "another run".
        fp = asdict(recipe)
        fp["pipeline"] = {k: v for k, v in recipe.pipeline.items() if k not in GATE_KEYS}
        self.recipe_sha = _sha(fp)
        self.state: dict[str, Any] = {"recipe_sha": self.recipe_sha, "stages": {}}
        self._prepare_folder(force)

    # ------------------------------------------------------------------ folder and state

    def _prepare_folder(self, force: bool) -> None:
        state_file = self.out / PIPELINE_FILE
        if self.out.exists() and any(self.out.iterdir()):
            if not state_file.is_file():
                if not force:
                    raise KdError(f"Output folder '{self.out}' exists and is not a pipeline run. Choose another --out "
                                  f"or pass --force to use it anyway.")
            else:
                old = json.loads(state_file.read_text())
                if old.get("recipe_sha") != self.recipe_sha and not (force or self.resume):
                    raise KdError(f"Output folder '{self.out}' holds a run of another recipe. Pass --force to "
                                  f"replace it, --resume to continue it with this recipe, or choose another --out.")
                if force:
                    self._wipe()
                else:
                    self.state["stages"] = old.get("stages", {})
        self._preflight()
        try:
            self.out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise KdError(f"Cannot create '{self.out}' ({e.strerror}). Choose a writable --out.") from None
        atomic_write_text(self.out / "recipe.yaml", to_yaml(self.recipe))

    def _preflight(self) -> None:
        """Check names and the dataset before the run folder or recipe.yaml exist: a bad recipe
        leaves nothing that would make the corrected re-run fail."""
        from kdcompress.data import dataset_info
        from kdcompress.methods import METHODS
        from kdcompress.models import resolve_model_name

        r = self.recipe
        if self.out.exists() and not self.out.is_dir():
            raise KdError(f"--out '{self.out}' is a file, not a folder. Choose a folder path.")
        resolve_model_name(r.teacher.model)
        resolve_model_name(r.student.model, r.teacher.model)
        METHODS.get(r.distill.method)
        dataset_info(r.data.name, **dict(r.data.options))
        for role in ("teacher", "student"):
            role_train(r, role)

    def _wipe(self) -> None:
        for name in ("teacher", "student-none", "student", "plots", "artifacts"):
            shutil.rmtree(self.out / name, ignore_errors=True)
        for name in (PIPELINE_FILE, "report.json", "report.md", "recipe.yaml"):
            (self.out / name).unlink(missing_ok=True)

    def _save_state(self) -> None:
        atomic_write_text(self.out / PIPELINE_FILE, json.dumps(self.state, indent=2, default=str))

    def _stage(self, name: str, fingerprint: dict[str, Any], outputs_ok: Callable[[dict[str, Any]], bool],
               run: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """Run ``run`` unless the recorded stage has the same fingerprint and its outputs check out."""
        fp = _sha(fingerprint)
        rec = self.state["stages"].get(name)
        if rec and rec.get("fingerprint") == fp:
            try:
                if outputs_ok(rec["result"]):
                    self.console.print(f"[dim]✓ {name}: up to date, skipped[/]")
                    rec["skipped"] = True
                    return rec["result"]
            except (KdError, OSError, KeyError, ValueError, TypeError):
                pass
            self.console.print(f"[yellow]{name}: recorded outputs failed their check; running it again[/]")
        self.console.print(f"[bold cyan]▶ {name}[/]")
        t0 = time.perf_counter()
        result = run()
        self.state["stages"][name] = {"fingerprint": fp, "result": result, "wall_s": time.perf_counter() - t0,
                                      "skipped": False}
        self._save_state()
        return result

    # ------------------------------------------------------------------ training stages

    def _train(self, role: str, folder: str, recipe: Recipe) -> dict[str, Any]:
        from kdcompress.engine.trainer import MODEL_FILE, STATE_FILE, train

        out = self.out / folder
        resume = (out / STATE_FILE).is_file()
        if resume and not self.resume:
            if _finished(out / MODEL_FILE, role_train(recipe, role)):
                resume = True  # the schedule is complete; train() only re-validates and re-saves
            else:
                raise KdError(f"Stage '{folder}' was interrupted (found {out / STATE_FILE}). Pass --resume to continue "
                              f"it or --force to start the pipeline again.")
        res = train(recipe, role, out, resume=resume, force=not resume, progress=self.progress)
        headline = _task_of(res.model_path).headline
        return asdict(ModelRecord(str(res.model_path), sha256_file(res.model_path), res.metrics.get(headline), res.step,
                                  res.wall_s, str(out / "metrics.jsonl")))

    def _checkpoint_ok(self, result: dict[str, Any]) -> bool:
        path = Path(ModelRecord(**result).checkpoint)  # a record of an older layout fails here: run it again
        return path.is_file() and sha256_file(path) == result["sha256"] and bool(load_model_checkpoint(path))

    def run(self) -> dict[str, Any]:
        from kdcompress.engine.evaluation import evaluate_checkpoint

        t0 = time.perf_counter()
        r = self.recipe
        data_fp = asdict(r.data)

        # 1. teacher: given checkpoint, or trained here
        if r.distill.teacher_checkpoint:
            path = Path(r.distill.teacher_checkpoint)
            teacher = self._stage("teacher", {"given": str(path), "sha": sha256_file(path) if path.is_file() else None},
                                  self._checkpoint_ok, lambda: asdict(_given_teacher(path)))
        else:
            rt = copy.deepcopy(r)
            rt.distill.method = "none"
            teacher = self._stage("teacher", {"data": data_fp, "model": asdict(r.teacher),
                                              "train": asdict(role_train(r, "teacher"))},
                                  self._checkpoint_ok, lambda: self._train("teacher", "teacher", rt))

        student_fp = {"data": data_fp, "model": asdict(r.student), "train": asdict(role_train(r, "student"))}
        # 2. plain student with the same budget (the comparison the report and the claim rest on)
        baseline = None
        if self.opts.baseline:
            rb = copy.deepcopy(r)
            rb.distill.method, rb.distill.inherit = "none", []  # plain: no teacher signal, no teacher weights
            baseline = self._stage("baseline", student_fp, self._checkpoint_ok,
                                   lambda: self._train("student", "student-none", rb))
        # 3. distilled student
        rs = copy.deepcopy(r)
        rs.distill.teacher_checkpoint = teacher["checkpoint"]
        student = self._stage("student", student_fp | {"distill": asdict(r.distill), "teacher": teacher["sha256"]},
                              self._checkpoint_ok, lambda: self._train("student", "student", rs))

        records = {"teacher": ModelRecord(**teacher), "student": ModelRecord(**student)}
        if baseline is not None:
            records["baseline"] = ModelRecord(**baseline)
        models = {k: asdict(records[k]) for k in MODEL_LABELS if k in records}  # display order
        # 4. evaluate all three on the validation split (the one evaluation path: same images as the export)
        evaluation = self._stage(
            "evaluate", {k: v["sha256"] for k, v in models.items()} | {"max": self.opts.max_eval_images},
            lambda res: list(res) == list(models),
            lambda: {k: evaluate_checkpoint(v["checkpoint"], max_images=self.opts.max_eval_images, device="auto",
                                            progress=self.progress) for k, v in models.items()})

        # 5. export: verified ONNX always, INT8 / TensorRT when asked
        preset = self.opts.target_preset()
        exports = self._stage("export", {"student": student["sha256"], "opts": [self.opts.export, self.opts.tensorrt,
                                                                                 self.opts.max_eval_images,
                                                                                 self.opts.verify_images,
                                                                                 self.opts.calib_images, preset]},
                              _exports_ok, lambda: self._export(student["checkpoint"], preset))

        # 6. profile: teacher vs students, PyTorch vs ONNX Runtime (vs TensorRT), at the export's input size
        size = tuple(self.opts.profile_size or (preset or {}).get("profile", {}).get("input_size")
                     or load_model_checkpoint(Path(student["checkpoint"]))["meta"]["input_size"])
        targets = {k: v["checkpoint"] for k, v in models.items()}
        for name, exp in exports.items():
            if exp.get("artifact"):
                targets[f"student/{name}"] = exp["artifact"]
        profile = self._stage("profile", {"targets": {k: sha256_file(Path(v)) for k, v in targets.items()},
                                          "size": size, "iters": self.opts.profile_iters},
                              lambda res: True, lambda: self._profile(targets, size, (preset or {}).get("profile", {})))

        # 7. report + gates
        task = _task_of(Path(student["checkpoint"]))
        report = {"recipe": r.name, "run": str(self.out), "task": task.name, "headline": task.headline,
                  "labels": {k: MODEL_LABELS[k] for k in models} | {k: f"student {k.split('/', 1)[1]}"
                                                                      for k in targets if "/" in k},
                  "stages": {k: {"wall_s": v.get("wall_s"), "skipped": v.get("skipped")}
                             for k, v in self.state["stages"].items()},
                  "teacher": teacher, "baseline": baseline, "student": student, "evaluation": evaluation,
                  "exports": exports, "profile": profile, "wall_s": time.perf_counter() - t0}
        report["gates"] = self._gates(report)
        from kdcompress.pipeline.report import write_report

        write_report(self.out, report)
        failed = [g for g in report["gates"] if not g["passed"]]
        if failed:
            g = failed[0]
            raise GateError(f"Gate '{g['gate']}' failed: {g['value']:.4g} vs limit {g['limit']:.4g} "
                            f"({g['what']}). Report: {self.out / 'report.md'}")
        return report

    # ------------------------------------------------------------------ export / profile / gates

    def _export(self, ckpt: str, preset: dict[str, Any] | None) -> dict[str, Any]:
        """Verified ONNX always; INT8 / TensorRT when asked; the preset's export with its own tolerances."""
        from kdcompress.export import BACKENDS, export_checkpoint

        art = self.out / "artifacts"
        common = dict(max_eval_images=self.opts.max_eval_images, verify_images=self.opts.verify_images,
                      progress=self.progress)
        out: dict[str, Any] = {}
        out["onnx"] = _export_record("onnx", export_checkpoint(ckpt, "onnx", out_path=art / "student.onnx", **common))
        if "ort-int8" in self.opts.export:
            res = export_checkpoint(ckpt, "ort-int8", out_path=art / "student.int8.onnx",
                                    calib_images=self.opts.calib_images, **common)
            out["ort-int8"] = _export_record("ort-int8", res)
        if self.opts.tensorrt != "off":
            precision = "fp16" if self.opts.tensorrt == "auto" else self.opts.tensorrt
            name = f"tensorrt-{precision}"
            try:
                res = export_checkpoint(ckpt, "tensorrt", precision=precision, out_path=art / f"student.{precision}.engine",
                                        calib_images=self.opts.calib_images, **common)
                out[name] = _export_record(name, res)
            except MissingDependencyError as e:
                if self.opts.tensorrt != "auto":
                    raise
                self.console.print(f"[yellow]TensorRT stage skipped (pipeline.tensorrt: auto): {e}[/]")
                out[name] = asdict(ExportRecord(name, skipped=str(e)))
        if preset is not None:
            opts = dict(preset["export"])
            to = opts.pop("to", "onnx")
            precision = opts.pop("precision", None) or BACKENDS.get(to).default_precision
            size = opts.pop("input_size", None)
            opts.setdefault("calib_images", self.opts.calib_images)
            if to != "tensorrt":
                opts.pop("workspace_mb", None)
            res = export_checkpoint(ckpt, to, precision=precision, tolerances=preset["tolerances"] or None,
                                    input_size=tuple(size) if size else None,
                                    out_path=art / f"{preset['name']}{BACKENDS.get(to).suffix(precision)}",
                                    **common, **opts)
            out["target"] = _export_record(f"target {preset['name']}", res)
        return out

    def _profile(self, targets: dict[str, str], size: tuple[int, int], preset: dict[str, Any]) -> list[dict[str, Any]]:
        from kdcompress.profiling import profile_target

        rows = []
        for name, path in targets.items():
            row = profile_target(path, input_size=size, iters=self.opts.profile_iters,
                                 threads=self.opts.profile_threads if self.opts.profile_threads is not None
                                 else preset.get("threads"))
            row["label"] = name
            rows.append(row)
        return rows

    def _gates(self, report: dict[str, Any]) -> list[dict[str, Any]]:
        o = self.opts
        gates = []
        h = report["headline"]
        value = report["evaluation"]["student"][h]
        if o.min_miou is not None:
            gates.append({"gate": "min_miou", "what": f"distilled student {h}", "value": value, "limit": o.min_miou,
                          "passed": value >= o.min_miou})
        if o.max_export_drop is not None:
            for name, exp in report["exports"].items():
                if exp.get("drop") is not None:
                    gates.append({"gate": "max_export_drop", "what": f"{h} drop of {name} vs PyTorch",
                                  "value": exp["drop"], "limit": o.max_export_drop,
                                  "passed": exp["drop"] <= o.max_export_drop})
        produced = {k.split("-")[0] if k.startswith("tensorrt") else k: k for k in report["exports"]}
        key = "student" if o.gate_artifact == "torch" else f"student/{produced.get(o.gate_artifact, o.gate_artifact)}"
        row = next((p for p in report["profile"] if p["label"] == key), None)
        label = report["labels"].get(key, key)
        if (o.min_fps is not None or o.max_latency_ms is not None) and row is None:
            raise ConfigError(f"Speed gates read '{o.gate_artifact}', which this pipeline did not produce. "
                              f"Set pipeline.gate_artifact to one of: torch, {', '.join(produced)}.")
        if o.min_fps is not None:
            gates.append({"gate": "min_fps", "what": f"FPS of {label}", "value": row["fps"], "limit": o.min_fps,
                          "passed": row["fps"] >= o.min_fps})
        if o.max_latency_ms is not None:
            lat = row["latency_ms"]["median_ms"]
            gates.append({"gate": "max_latency_ms", "what": f"median latency of {label}", "value": lat,
                          "limit": o.max_latency_ms, "passed": lat <= o.max_latency_ms})
        return gates


def _finished(model_path: Path, tcfg: Any) -> bool:
    from kdcompress.engine.trainer import STATE_FILE

    if not paired(model_path, model_path.parent / STATE_FILE):  # a save cut between state.pt and model.pt
        return False
    meta = load_model_checkpoint(model_path)["meta"]
    return meta.get("total_steps") is not None and meta.get("step") == meta.get("total_steps")


def _task_of(checkpoint: Path) -> Any:
    from kdcompress.tasks import task_from_meta

    return task_from_meta(load_model_checkpoint(checkpoint)["meta"])


def _given_teacher(path: Path) -> ModelRecord:
    meta = load_model_checkpoint(path)["meta"]
    headline = _task_of(path).headline
    return ModelRecord(str(path), sha256_file(path), (meta.get("metrics") or {}).get(headline), meta.get("step"),
                       given=True)


def _export_record(name: str, res: Any) -> dict[str, Any]:
    parity = {k: v for k, v in res.parity.items() if k not in ("eval_config", "worst")}  # the report's part
    return asdict(ExportRecord(name, str(res.artifact), str(res.sidecar), res.precision, res.miou_torch,
                               res.miou_artifact, res.drop, parity, res.timings))


def _exports_ok(result: dict[str, Any]) -> bool:
    from kdcompress.export.metadata import read_sidecar

    for exp in result.values():
        rec = ExportRecord(**exp)
        if rec.artifact is None:
            continue
        art = Path(rec.artifact)
        if not art.is_file():
            return False
        side = read_sidecar(art)
        if not side.get("parity", {}).get("passed"):
            return False
    return True


def run_pipeline(recipe: Recipe, out: Path, **kwargs: Any) -> dict[str, Any]:
    return Pipeline(recipe, out, **kwargs).run()
