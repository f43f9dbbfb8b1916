"""One training loop for teachers, plain students and distilled students.

Design points:

* Steps, not epochs, drive the loop; the sampler is a pure function of (seed, epoch, rank), and
  each sample's augmentation is seeded by (seed, epoch, index). A resumed run therefore sees
  exactly the batches the uninterrupted run would have seen, without replaying the loader.
* The model checkpoint (``model.pt``) holds the student's weights alone plus metadata; the
  resumable state (``state.pt``) holds optimizer, scheduler, step, RNG states and the
  distillation method's own modules. Both are written atomically, model first.
* Under ``torchrun`` the student and the method are wrapped together in DDP; the frozen
  teacher runs under ``no_grad`` outside it. Rank 0 alone logs and writes.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

import kdcompress
from kdcompress.config import DataConfig, Recipe, TrainConfig, role_train, to_yaml
from kdcompress.data import build_dataset, dataset_info
from kdcompress.engine import distributed as dist_utils
from kdcompress.engine.checkpoint import (
    load_model,
    load_state,
    save_model_checkpoint,
    save_state,
    sha256_file,
    atomic_write_text,
)
from kdcompress.engine.evaluate import evaluate_model
from kdcompress.errors import ConfigError, KdError, NonFiniteLossError
from kdcompress.models import build_model, resolve_model_name
from kdcompress.taps import record, tap_shapes
from kdcompress.tasks import Task, task_for
from kdcompress.progress import PlainProgress, is_tty

MODEL_FILE = "model.pt"
STATE_FILE = "state.pt"
CONFIG_FILE = "config.yaml"
LOG_FILE = "metrics.jsonl"


# ----------------------------------------------------------------------------- data


class EpochSampler(Sampler):
    """Yields ``(epoch, index)`` keys: a seeded permutation per epoch, sharded by rank.

    Starting at any step is free (``start_batch``), which is what makes resume exact.
    """

    def __init__(self, n: int, batch_size: int, seed: int, rank: int, world: int, start_step: int) -> None:
        self.n, self.batch, self.seed, self.rank, self.world = n, batch_size, seed, rank, world
        self.per_rank = n // world
        self.steps_per_epoch = self.per_rank // batch_size
        if self.steps_per_epoch < 1:
            raise ConfigError(f"Training split has {n} images: too few for batch size {batch_size * world}. "
                              f"Lower train.batch_size or add data.")
        self.start_step = start_step

    def __iter__(self) -> Iterator[tuple[int, int]]:
        step = self.start_step
        while True:
            epoch, within = divmod(step, self.steps_per_epoch)
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            perm = torch.randperm(self.n, generator=g)[: self.per_rank * self.world]
            mine = perm[self.rank::self.world].tolist()
            for b in range(within, self.steps_per_epoch):
                for i in mine[b * self.batch:(b + 1) * self.batch]:
                    yield epoch, i
            step = (epoch + 1) * self.steps_per_epoch


class SeededAugment(Dataset):
    """Seeds each sample's augmentation from (seed, epoch, index) without touching global RNG."""

    def __init__(self, base: Dataset, seed: int) -> None:
        self.base, self.seed = base, seed

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> Any:
        epoch, idx = key
        state = random.getstate()
        random.seed((self.seed * 1_000_003 + epoch) * 10_000_019 + idx)
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed((self.seed * 7919 + epoch) * 1_000_003 + idx)
                return self.base[idx]
        finally:
            random.setstate(state)


def data_options(data: DataConfig) -> dict[str, Any]:
    return dict(data.options)


def build_datasets(data: DataConfig, task: Task | None = None) -> tuple[Dataset, Dataset]:
    """Train and val splits with the task's transforms (segmentation: crops; detection: box-aware resize)."""
    if len(data.crop_size) != 2:
        raise ConfigError(f"data.crop_size must be [H, W], got {data.crop_size}.")
    task = task or task_for(dataset_info(data.name, **data_options(data)))
    train = build_dataset(data.name, data.root, "train", task.train_transform(data), **data_options(data))
    val = build_dataset(data.name, data.root, "val", task.val_transform(data), **data_options(data))
    return train, val


# ----------------------------------------------------------------------------- schedule


def lr_lambda(t: TrainConfig, total: int) -> Callable[[int], float]:
    """Multiplier of the base lr at a step: poly / cosine with optional linear warm-up, or one-cycle."""

    def fn(step: int) -> float:
        if t.schedule == "onecycle":
            peak = max(1, int(0.3 * total))
            if step < peak:
                return 1 / 25 + (1 - 1 / 25) * step / peak
            p = (step - peak) / max(1, total - peak)
            return 1e-4 + (1 - 1e-4) * 0.5 * (1 + math.cos(math.pi * min(1.0, p)))
        if step < t.warmup_steps:
            return (step + 1) / t.warmup_steps
        p = min(1.0, step / max(1, total))
        if t.schedule == "step":
            return 0.1 ** sum(p >= m for m in t.milestones)
        if t.schedule == "poly":
            return (1 - p) ** t.power
        return 0.5 * (1 + math.cos(math.pi * p))

    return fn


def distill_weight(step: int, warmup: int, cooldown: int = 0, total: int = 0) -> float:
    """Multiplier of every distillation term: 0 at step 0, linear to 1 at ``warmup``, then 1 until
    the last ``cooldown`` steps of ``total``, over which it falls linearly to 1/cooldown at the last step.

    A student near chance gives the methods' adaptive parts (masks, attention) nothing sensible
    to read; the warm-up lets the task loss shape it first. The cool-down lets the task loss
    alone finish the schedule (early-stopped KD)."""
    up = 1.0 if warmup <= 0 else min(1.0, step / warmup)
    down = 1.0 if cooldown <= 0 else min(1.0, (total - step) / cooldown)
    return min(up, down)


def amp_dtype_for(device: torch.device) -> torch.dtype | None:
    """Mixed precision where the device runs it natively: fp16 on CUDA, bf16 on CPUs with
    AVX512-BF16/AMX (oneDNN), otherwise none (emulated bf16 would be slower than fp32)."""
    if device.type == "cuda":
        return torch.float16
    if device.type == "cpu" and torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return torch.bfloat16
    return None


def build_optimizer(params: list[nn.Parameter], t: TrainConfig) -> torch.optim.Optimizer:
    """SGD or AdamW with torch's fused kernels where every parameter lives on a CPU or CUDA device:
    one pass over all tensors instead of a Python loop per tensor (``benchmarks/optimizer_step.py``)."""
    fused = bool(params) and all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    if t.optimizer == "sgd":
        return torch.optim.SGD(params, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay, fused=fused or None)
    return torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay, fused=fused or None)


# ----------------------------------------------------------------------------- model + method


class TrainTask(nn.Module):
    """Student (+ distillation method) as one module so DDP syncs both; returns named loss terms."""

    def __init__(self, student: nn.Module, method: nn.Module | None, taps: list[str], task: Task) -> None:
        super().__init__()
        self.student, self.method = student, method
        self.taps, self.task_def = taps, task

    def forward(self, images: torch.Tensor, targets: Any,
                teacher_feats: dict[str, torch.Tensor] | None,
                keep_feats: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Named loss terms; ``keep_feats`` (a dict) receives the student's tapped maps for probes."""
        if self.method is None:
            return {"task": self.task_def.training_loss(self.student, images, targets)}
        with record(self.student, self.taps) as feats:
            terms = {"task": self.task_def.training_loss(self.student, images, targets)}
            if teacher_feats is not None:
                terms.update(self.method(dict(feats), teacher_feats))
            if keep_feats is not None:
                keep_feats.update(feats)
        return terms


def gradient_ratio(terms: dict[str, torch.Tensor], weights: dict[str, float],
                   feats: dict[str, torch.Tensor]) -> float | None:
    """‖∂(Σ w·distill terms)/∂F‖ ÷ ‖∂task/∂F‖ at the student's tapped maps F (graph kept).

    Says whether a method's signal reaches the student at the strength of the task's, which the
    raw loss values cannot (weights and scales differ per method)."""
    maps = [f for f in feats.values() if f.requires_grad]
    distill = [weights.get(k, 1.0) * v.float() for k, v in terms.items() if k != "task"]
    if not maps or not distill:
        return None

    def norm(loss: torch.Tensor) -> float:
        grads = torch.autograd.grad(loss, maps, retain_graph=True, allow_unused=True)
        return math.sqrt(sum(float(g.float().pow(2).sum()) for g in grads if g is not None))

    task = norm(terms["task"].float())
    return norm(sum(distill)) / task if task > 0 else None


def load_teacher(path: str, num_classes: int, device: torch.device,
                 task: str = "segmentation") -> tuple[nn.Module, dict[str, Any]]:
    teacher, meta = load_model(path, device)
    if meta.get("task", "segmentation") != task:
        raise KdError(f"Teacher '{path}' is a {meta.get('task', 'segmentation')} checkpoint but the dataset is a "
                      f"{task} dataset. Use a {task} teacher trained on this dataset.")
    if int(meta["num_classes"]) != num_classes:
        raise KdError(f"Teacher '{path}' predicts {meta['num_classes']} classes but the dataset has {num_classes}. "
                      f"Use a teacher trained on this dataset.")
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher.eval(), meta


# ----------------------------------------------------------------------------- results


@dataclass
class TrainResult:
    out_dir: Path
    model_path: Path
    step: int
    metrics: dict[str, Any] = field(default_factory=dict)
    wall_s: float = 0.0
    grad_ratio: dict[str, float | None] = field(default_factory=dict)  # distill ÷ task gradient at the taps
    headline: str = "mIoU"  # the task's headline metric key in ``metrics``


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]),
                  int(np_state[3]), float(np_state[4])],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), n[2], n[3], n[4]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def check_out_dir(out_dir: Path, resume: bool, force: bool) -> None:
    """Refuse to mix two runs in one folder. Touches nothing: called before any input is trusted.

    A folder holding no checkpoint (e.g. one left by a run that failed on bad input) counts as
    empty; ``--force`` deletes nothing, new files replace old ones atomically when ready."""
    if out_dir.exists() and not out_dir.is_dir():
        raise KdError(f"--out '{out_dir}' is a file, not a folder. Choose a folder path.")
    has_run = (out_dir / MODEL_FILE).is_file() or (out_dir / STATE_FILE).is_file()
    if has_run and not (resume or force):
        raise KdError(f"Output folder '{out_dir}' already holds a run. Pass --resume to continue it, "
                      f"--force to overwrite, or choose another --out.")
    if resume and not (out_dir / STATE_FILE).is_file():
        raise KdError(f"Nothing to resume in '{out_dir}' (no {STATE_FILE}). Drop --resume to start a new run.")


def make_out_dir(out_dir: Path) -> None:
    """Create the run folder, check it is writable, sweep temp files a killed run left behind."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise KdError(f"Output folder '{out_dir}' is not writable ({e.strerror}). Choose another --out.") from None
    for stale in out_dir.glob(".*.tmp"):  # atomic_write's temp files of an interrupted save
        stale.unlink(missing_ok=True)


def _trim_log(path: Path, step: int | None) -> None:
    """Keep the log lines up to ``step`` (resume) or none (a fresh run), atomically."""
    if not path.is_file():
        return
    keep = []
    if step is not None:
        for line in path.read_text().splitlines():
            try:
                if int(json.loads(line).get("step", 0)) <= step:
                    keep.append(line)
            except (ValueError, AttributeError):
                continue
    atomic_write_text(path, "".join(x + "\n" for x in keep))


def _resume_key(tcfg: TrainConfig, recipe: Recipe, role: str, arch: str, method: str) -> dict[str, Any]:
    """What a resumed run must share with the interrupted one (steps may grow; device may move)."""
    train_cfg = {k: v for k, v in asdict(tcfg).items() if k not in ("steps", "epochs", "device", "val_every",
                                                                     "ckpt_every", "log_every")}
    d = asdict(recipe.distill) if role == "student" else {}
    return {"arch": arch, "method": method, "train": train_cfg, "data": asdict(recipe.data),
            "distill": {k: v for k, v in d.items() if k != "teacher_checkpoint"},
            "pretrained": getattr(recipe, role).pretrained}


def _diff_keys(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    old, new = json.loads(json.dumps(old)), json.loads(json.dumps(new))
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _diff_keys(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k} ({a!r} -> {b!r})")
    return out


def _interrupted(out_dir: Path, step: int, total: int) -> "TrainingInterrupted":
    saved = load_state(out_dir / STATE_FILE)["step"] if (out_dir / STATE_FILE).is_file() else None
    where = (f"last checkpoint: {out_dir / MODEL_FILE} at step {saved}" if saved is not None
             else "no checkpoint was written yet (set train.ckpt_every to save periodically)")
    return TrainingInterrupted(f"Interrupted at step {step}/{total}; {where}. Continue with the same command "
                               f"plus --resume.")


def worker_message(text: str) -> str:
    """The original one-line message of an error re-raised from a DataLoader worker."""
    if "Original Traceback" not in text:
        return text
    last = [ln for ln in text.strip().splitlines() if ln.strip()][-1]
    return last.split(": ", 1)[1] if ": " in last else last


class TrainingInterrupted(KdError):
    """Ctrl-C: say where training stopped and how to continue (exit code 130, as shells expect)."""

    exit_code = 130


# ----------------------------------------------------------------------------- the loop


def train(recipe: Recipe, role: str, out_dir: str | Path, *, resume: bool = False, force: bool = False,
          progress: bool = True, on_step: Callable[[int, dict[str, float]], None] | None = None) -> TrainResult:
    """Train ``recipe.<role>.model``; Ctrl-C ends in a TrainingInterrupted naming the step and the checkpoint."""
    reached: dict[str, int] = {"step": 0, "total": 0}
    try:
        return _train(recipe, role, out_dir, resume=resume, force=force, progress=progress, on_step=on_step,
                      reached=reached)
    except KeyboardInterrupt:
        raise _interrupted(Path(out_dir), reached["step"], reached["total"]) from None


def _models(recipe: Recipe, role: str, info: Any, device: torch.device,
            progress: bool) -> tuple[str, nn.Module, nn.Module | None, dict[str, Any], nn.Module | None, list[str]]:
    """(arch, student, teacher, teacher metadata, distillation method, taps), each checked against the others."""
    from kdcompress.methods import METHODS, build_method

    mcfg = getattr(recipe, role)
    distill = recipe.distill if role == "student" else None
    method_name = distill.method if distill else "none"
    method_cls = METHODS.get(method_name)
    arch = resolve_model_name(mcfg.model, recipe.teacher.model)
    from kdcompress.models import backbone_of
    from kdcompress.pretrain import resolve_pretrained

    weights = resolve_pretrained(mcfg.pretrained, backbone_of(arch), data_name=recipe.data.name,
                                 data_seed=int(recipe.data.options.get("seed", 0)), cfg=recipe.pretrain,
                                 log=print if dist_utils.is_main() and progress else (lambda _m: None))
    student = build_model(arch, info.num_classes, mcfg.output_stride, weights or False).to(device)

    teacher, method, taps = None, None, []
    teacher_meta: dict[str, Any] = {}
    inherit = list(distill.inherit) if distill is not None else []
    if method_cls.needs_teacher or inherit:  # `none` + inherit: the inheritance-only control
        if not distill or not distill.teacher_checkpoint:
            raise ConfigError(f"Method '{method_name}' needs a teacher checkpoint: pass --teacher PATH."
                              if method_cls.needs_teacher else
                              f"distill.inherit {inherit} copies teacher weights, but no teacher is given. "
                              f"Pass --teacher or set distill.inherit: [].")
        teacher, teacher_meta = load_teacher(distill.teacher_checkpoint, info.num_classes, device, info.task)
    if inherit:
        from kdcompress.methods.base import inherit_from_teacher

        inherited = inherit_from_teacher(student, teacher, distill.inherit)
        if not inherited:
            raise ConfigError(f"distill.inherit {distill.inherit}: no student weight under these prefixes matches the "
                              f"teacher's in name and shape. Student modules: "
                              f"{', '.join(n for n, _ in student.named_children())}.")
    if method_name != "none":
        crop = tuple(recipe.data.crop_size)
        s_shapes = tap_shapes(student, crop, batch=1)  # every tap: build_method validates names
        t_shapes = tap_shapes(teacher, crop, batch=1) if teacher is not None else s_shapes
        # a model may name the taps its task distils (detectors: FPN levels) unless the recipe names taps
        default_taps = getattr(student, "distill_taps", None) if method_cls.default_taps and \
            method_cls.reads == "features" else None
        method = build_method(method_name, s_shapes, t_shapes, info.num_classes,
                              taps=distill.taps or default_taps or None, student_name=arch,
                              teacher_name=teacher_meta.get("arch", "teacher"),
                              **(distill.hparams if distill else {})).to(device)
        taps = list(method.taps)
    if method is None:  # inheritance only: the teacher's weights are copied, its features never read
        teacher = None
    return arch, student, teacher, teacher_meta, method, taps


def _train(recipe: Recipe, role: str, out_dir: str | Path, *, resume: bool, force: bool, progress: bool,
           on_step: Callable[[int, dict[str, float]], None] | None, reached: dict[str, int]) -> TrainResult:
    """Train ``recipe.<role>.model`` (distilling from the recipe's teacher if ``role == 'student'``
    and ``recipe.distill.method`` is not ``none``). Returns where the model checkpoint is."""
    if role not in ("teacher", "student"):
        raise ConfigError(f"role must be 'teacher' or 'student', got {role!r}.")
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    tcfg = role_train(recipe, role)
    device = dist_utils.resolve_device(tcfg.device)
    rank, world = dist_utils.init_distributed(device)
    if tcfg.batch_size % world:
        raise ConfigError(f"train.batch_size {tcfg.batch_size} is not divisible by the {world} processes.")
    check_out_dir(out_dir, resume, force)
    seed_everything(tcfg.seed)

    info = dataset_info(recipe.data.name, **data_options(recipe.data))
    task_def = task_for(info)
    train_set, val_set = build_datasets(recipe.data, task_def)

    distill = recipe.distill if role == "student" else None
    arch, student, teacher, teacher_meta, method, taps = _models(recipe, role, info, device, progress)
    method_name = distill.method if distill else "none"

    task = TrainTask(student, method, taps, task_def).to(device)
    model: nn.Module = task
    if world > 1:
        model = nn.parallel.DistributedDataParallel(task, device_ids=[device.index] if device.type == "cuda" else None)

    params = [p for p in task.parameters() if p.requires_grad]
    student_params = [p for p in task.student.parameters() if p.requires_grad]
    method_params = [p for p in method.parameters() if p.requires_grad] if method is not None else []
    optimizer = build_optimizer(params, tcfg)
    per_rank_batch = tcfg.batch_size // world
    steps_per_epoch = (len(train_set) // world) // per_rank_batch
    total = tcfg.steps if tcfg.steps is not None else tcfg.epochs * max(1, steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(tcfg, total))
    from kdcompress.config import distill_ramps

    warm = cool = 0
    if distill is not None and method is not None:
        warm, cool = distill_ramps(method.default_warmup if distill.warmup is None else distill.warmup,
                                   distill.cooldown, total)
    amp_dtype = amp_dtype_for(device) if tcfg.amp else None
    use_amp = amp_dtype is not None
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)

    step = 0
    distill_scale = 1.0  # grad_balance's factor on every distillation term (set at step 0)
    balancing = distill is not None and method is not None and distill.grad_balance is not None
    resume_key = json.loads(json.dumps(_resume_key(tcfg, recipe, role, arch, method_name)))  # plain lists/dicts
    if resume:
        state = load_state(out_dir / STATE_FILE)
        if state.get("arch") != arch or state.get("method") != method_name:
            raise KdError(f"'{out_dir / STATE_FILE}' belongs to a {state.get('arch')}/{state.get('method')} run, "
                          f"not {arch}/{method_name}. Use the matching options or another --out.")
        if "resume_key" in state:
            changed = _diff_keys(state["resume_key"], resume_key)
            if changed:
                raise KdError(f"--resume with changed settings: {'; '.join(changed)}. Resume with the original "
                              f"settings (only train.steps may grow) or start a new run with --force.")
        if int(state["step"]) > total:
            raise KdError(f"'{out_dir}' is at step {state['step']}, beyond the requested {total} steps. "
                          f"Pass --steps >= {state['step']} to resume it.")
        try:
            task.load_state_dict(state["task"])
        except RuntimeError as e:  # same settings, other modules: a method default changed between versions
            first = (str(e).split("\n")[1] if "\n" in str(e) else str(e)).strip()
            first = first if len(first) <= 160 else first[:157] + "..."
            raise KdError(f"'{out_dir / STATE_FILE}' does not fit the {method_name} run built from today's settings "
                          f"({first}): a default of the method changed since it was written. Resume with the "
                          f"kdcompress version that wrote it, or start a new run with --force.") from None
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        step = int(state["step"])
        distill_scale = float(state.get("distill_scale", 1.0))
        _set_rng_state(state["rng"])

    meta = {
        "arch": arch, "num_classes": info.num_classes, "output_stride": student.output_stride,
        "class_names": list(info.class_names), "mean": list(train_set.transform.mean),
        "std": list(train_set.transform.std), "task": info.task,
        # The export's default input: the validation images' own size when the dataset fixes one, so
        # `evaluate` and export verification score identical images; else the training crop.
        "input_size": list(info.image_size or task_def.export_size(recipe.data)),
        "resize": recipe.data.resize,
        "category_ids": list(info.category_ids) if getattr(info, "category_ids", None) else None,
        "ignore_index": info.ignore_index, "dataset": recipe.data.name, "data_root": recipe.data.root,
        "data_options": data_options(recipe.data), "role": role, "method": method_name,
        "teacher": teacher_meta.get("arch"), "recipe": recipe.name, "kdcompress_version": kdcompress.__version__,
    }
    if dist_utils.is_main():
        make_out_dir(out_dir)  # every input is checked by now: only now is anything written
        _trim_log(out_dir / LOG_FILE, step if resume else None)
    dist_utils.barrier()
    if dist_utils.is_main():
        atomic_write_text(out_dir / CONFIG_FILE, to_yaml(asdict(recipe) | {"resolved": {
            "role": role, "model": arch, "train": asdict(tcfg), "taps": taps, "world_size": world}}))

    sampler = EpochSampler(len(train_set), per_rank_batch, tcfg.seed, rank, world, step)
    loader = DataLoader(SeededAugment(train_set, tcfg.seed), batch_size=per_rank_batch, sampler=sampler,
                        num_workers=recipe.data.workers, collate_fn=task_def.collate, drop_last=True,
                        pin_memory=device.type == "cuda", persistent_workers=recipe.data.workers > 0,
                        generator=torch.Generator().manual_seed(tcfg.seed))  # keeps the global RNG untouched

    def save(metrics: dict[str, Any]) -> Path:
        # State first, then the model naming the state's hash (``paired``): a crash in between leaves
        # an older model.pt beside a newer state.pt (resume continues from the state), never a model alone.
        s = save_state(out_dir / STATE_FILE, {
            "arch": arch, "method": method_name, "step": step, "task": task.state_dict(),
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(), "rng": _rng_state(), "resume_key": resume_key,
            "distill_scale": distill_scale,
        })
        return save_model_checkpoint(out_dir / MODEL_FILE, task.student, meta | {
            "step": step, "total_steps": total, "metrics": metrics, "state_sha256": sha256_file(s)})

    def validate() -> dict[str, Any]:
        dist_utils.broadcast_buffers(task.student)
        out = evaluate_model(task.student, val_set, task_def, batch_size=recipe.data.val_batch_size, device=device,
                             max_images=recipe.data.max_val_images, progress=False,
                             amp=device.type == "cuda" and use_amp)
        log({"step": step, "val": out})
        return out

    log_path = out_dir / LOG_FILE

    def log(entry: dict[str, Any]) -> None:
        if dist_utils.is_main():
            with open(log_path, "a") as f:
                f.write(json.dumps(entry) + "\n")

    teacher_taps = taps if teacher is not None else []
    last_metrics: dict[str, Any] = {}
    grad_ratios: dict[str, float | None] = {}
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    columns = [TextColumn(f"[bold]{role}[/] {arch}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn(), TextColumn("{task.fields[terms]}")]
    task.train()
    window_t, window_imgs = time.perf_counter(), 0
    show = progress and dist_utils.is_main()
    plain = PlainProgress(f"{role} {arch}", total, tcfg.log_every, start=step) if show and not is_tty() else None
    terms_text = ""
    with Progress(*columns, disable=not show or plain is not None) as bar:
        ptask = bar.add_task("train", total=total, completed=step, terms="")
        batches = iter(loader)
        while step < total:
            try:
                images, targets = next(batches)
            except KdError as e:  # from a DataLoader worker: its message carries the worker's traceback
                raise type(e)(worker_message(str(e))) from None
            images = images.to(device, non_blocking=True)
            targets = task_def.targets_to(targets, device)
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=use_amp):
                t_feats = None
                if teacher is not None:
                    with torch.no_grad(), record(teacher, teacher_taps) as tf:
                        task_def.features(teacher, images)
                        t_feats = {k: v.detach() for k, v in tf.items()}
                first = step == 0 and t_feats is not None
                probing = (first or step == total - 1) and t_feats is not None and (world == 1 or balancing)
                probe: dict[str, torch.Tensor] | None = {} if probing else None
                terms = model(images, targets, t_feats, probe)
            weights = method.loss_weights() if method is not None else {}
            if probe:  # at the first and last step, with full (un-warmed) weights
                ratio = gradient_ratio(terms, weights, probe)
                if first and balancing and ratio:  # grad_balance: fixed once, kept for the whole run (and resume)
                    distill_scale = float(distill.grad_balance) / dist_utils.all_reduce_mean({"r": ratio}, device)["r"]
                    log({"step": step, "distill_scale": distill_scale, "grad_ratio_unscaled": ratio})
                ratio = ratio * distill_scale if ratio is not None else None  # what the student actually receives
                grad_ratios["start" if step == 0 else "end"] = ratio
                log({"step": step, "grad_ratio": ratio})
            ramp = distill_weight(step, warm, cool, total)
            weighted = {k: (1.0 if k == "task" else ramp * distill_scale) * weights.get(k, 1.0) * v.float()
                        for k, v in terms.items()}
            loss = sum(weighted.values())
            bad = [k for k, v in weighted.items() if not torch.isfinite(v).all()]
            if dist_utils.any_true(bool(bad), device):
                kept = f"last good checkpoint: {out_dir / MODEL_FILE}" if (out_dir / MODEL_FILE).exists() \
                    else "no checkpoint was written yet"
                raise NonFiniteLossError(
                    f"Loss term '{bad[0] if bad else '?'}' became non-finite at step {step + 1} ({kept}). "
                    f"Lower train.lr or the term's weight, or set train.grad_clip.")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if method is not None:
                train_student, train_method = method.trainable(step)
                for group, on in ((student_params, train_student), (method_params, train_method)):
                    if not on:  # a frozen phase: no gradient, so the optimizer leaves them (and their decay) alone
                        for p in group:
                            p.grad = None
            if tcfg.grad_clip:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(params, tcfg.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            step += 1
            reached.update(step=step, total=total)
            window_imgs += images.shape[0] * world
            logs = {k: float(v.detach()) for k, v in terms.items()}
            if step % 10 == 0 or step == total:
                logs = dist_utils.all_reduce_mean(logs, device)
                now = time.perf_counter()
                ips = window_imgs / max(now - window_t, 1e-9)
                window_t, window_imgs = now, 0
                terms_text = " ".join(f"{k} {v:.3f}" for k, v in logs.items()) + f" | {ips:.1f} img/s"
                bar.update(ptask, terms=terms_text)
                log({"step": step, "lr": scheduler.get_last_lr()[0], "img_s": ips, **logs})
            if plain is not None:
                plain.update(step, terms_text)
            bar.update(ptask, completed=step)
            if on_step is not None:
                on_step(step, logs)
            is_val = tcfg.val_every and step % tcfg.val_every == 0 and step < total
            if is_val:
                last_metrics = validate()
                task.train()
            if tcfg.ckpt_every and step % tcfg.ckpt_every == 0 and step < total:
                if dist_utils.is_main():
                    save(last_metrics)
                dist_utils.barrier()
    model_path = out_dir / MODEL_FILE
    if dist_utils.is_main():
        save(last_metrics)  # the trained model is safe before validation can fail
    last_metrics = validate()
    if dist_utils.is_main():
        model_path = save(last_metrics)
    dist_utils.barrier()
    return TrainResult(out_dir, model_path, step, last_metrics, time.perf_counter() - t0, grad_ratios,
                       task_def.headline)
