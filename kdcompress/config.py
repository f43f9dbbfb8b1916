"""Typed run configuration: YAML recipe + dotted ``--set`` overrides, unknown keys rejected.

A recipe is plain data (no object instantiation). Sections:

* ``data``    – dataset name/root/options and augmentation (crop, scale range).
* ``train``   – the schedule shared by every run of the recipe.
* ``teacher`` / ``student`` – model name and per-role overrides of ``train`` keys.
* ``distill`` – method, taps and hyperparameters.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, get_type_hints

import yaml

from kdcompress.errors import ConfigError
from kdcompress.pretrain import PretrainConfig


@dataclass
class DataConfig:
    name: str = "digits"
    root: str | None = None
    crop_size: list[int] = field(default_factory=lambda: [96, 96])
    scale_range: list[float] = field(default_factory=lambda: [0.5, 2.0])
    flip: bool = True
    # detection: [shorter side, longer-side cap] images are resized to (COCO: [800, 1333]); null = crop_size
    resize: list[int] | None = None
    options: dict[str, Any] = field(default_factory=dict)  # passed to the dataset builder
    workers: int = 0
    val_batch_size: int = 8
    max_val_images: int | None = None


@dataclass
class TrainConfig:
    steps: int | None = None  # total optimizer steps; wins over epochs
    epochs: int | None = None
    batch_size: int = 16  # global batch (split across DDP ranks)
    optimizer: str = "sgd"  # sgd | adamw
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    schedule: str = "poly"  # poly | cosine | onecycle | step
    # step: lr x 0.1 at each of these fractions of the schedule (mmdet 1x/2x: epochs 8, 11 of 12 / 16, 22 of 24)
    milestones: list[float] = field(default_factory=lambda: [0.667, 0.917])
    power: float = 0.9
    warmup_steps: int = 0
    grad_clip: float | None = None
    amp: bool = True  # fp16 on CUDA, bf16 on CPUs with native bf16 (trainer.amp_dtype_for)
    val_every: int = 0  # 0: only at the end
    ckpt_every: int = 0  # 0: only at the end
    log_every: int = 50  # plain progress line every N steps when output is not a terminal (CI logs)
    seed: int = 0
    device: str = "auto"


@dataclass
class ModelConfig:
    model: str = "deeplabv3plus-mbv2"
    output_stride: int | None = None
    pretrained: bool | str = False  # false | imagenet (true) | digits (built-in pretraining) | weights file
    train: dict[str, Any] = field(default_factory=dict)  # overrides of TrainConfig keys for this role


@dataclass
class DistillConfig:
    method: str = "none"
    taps: list[str] | None = None
    hparams: dict[str, float] = field(default_factory=dict)
    teacher_checkpoint: str | None = None
    # ramp the distillation weight 0 -> 1 over a fraction of the schedule (< 1) or a step count (>= 1);
    # None: the method's own default (DistillMethod.default_warmup)
    warmup: float | None = None
    # ramp it back 1 -> 0 over the last fraction (< 1) or steps (>= 1) of the schedule; 0 = off. Early-stopped KD
    # (Cho & Hariharan, ICCV 2019): a student that is helped early can be held back late by matching the teacher
    cooldown: float = 0.0
    # ACAM-KD's "inheritance": student modules under these prefixes start from the teacher's weights
    # wherever name and shape match (e.g. [head]; detectors: [neck, head]); [] = off
    inherit: list[str] = field(default_factory=list)
    # scale every distillation term once, at the first step, so that its gradient at the student's taps is this
    # multiple of the task loss's (the logged grad ratio); null = the method's weights as they are. Makes weights
    # tuned on one task's features usable on another's (FPN levels swamp a detector's loss ~400x at mu = 5)
    grad_balance: float | None = None


@dataclass
class Recipe:
    name: str = "custom"
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    teacher: ModelConfig = field(default_factory=lambda: ModelConfig(model="deeplabv3plus-r101"))
    student: ModelConfig = field(default_factory=ModelConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)  # the built-in `pretrained: digits`
    pipeline: dict[str, Any] = field(default_factory=dict)  # stage options for `kdcompress pipeline`


def check_unknown(given: Any, valid: Any, where: str, source: str = "recipe") -> None:
    """The one unknown-key check: names every unknown key and lists the valid ones."""
    unknown = sorted(set(given) - set(valid))
    if unknown:
        keys = ", ".join(repr(f"{where}.{k}".lstrip(".")) for k in unknown)
        raise ConfigError(f"Unknown key{'s' if len(unknown) > 1 else ''} {keys} in {source}. "
                          f"Valid keys{' of ' + where if where else ''}: {', '.join(sorted(valid))}")


# Ranges of numeric keys (type checks come from the dataclass annotations): (test, what it means).
_POS = (lambda v: v > 0, "a positive number")
_NONNEG = (lambda v: v >= 0, "a number >= 0")
_ONE_UP = (lambda v: v >= 1, "a whole number >= 1")
RANGES: dict[str, tuple[Any, str]] = {
    "lr": _POS, "power": _POS, "grad_clip": _POS, "momentum": (lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "weight_decay": _NONNEG, "warmup_steps": _NONNEG, "val_every": _NONNEG, "ckpt_every": _NONNEG,
    "workers": _NONNEG, "steps": _ONE_UP, "epochs": _ONE_UP, "batch_size": _ONE_UP, "log_every": _ONE_UP,
    "val_batch_size": _ONE_UP, "max_val_images": _ONE_UP, "output_stride": (lambda v: v in (8, 16), "8 or 16"),
    "verify_images": _ONE_UP, "calib_images": _ONE_UP, "max_eval_images": _ONE_UP, "profile_iters": _ONE_UP,
    "profile_threads": _ONE_UP, "min_miou": (lambda v: 0 <= v <= 1, "a fraction in [0, 1]"),
    "max_export_drop": (lambda v: 0 <= v <= 1, "a fraction in [0, 1]"), "min_fps": _POS, "max_latency_ms": _POS,
    "grad_balance": _POS,
}
PAIRS = {"crop_size": (True, "[H, W] with two whole numbers >= 1"),
         "resize": (True, "[shorter, longer] with two whole numbers >= 1"), "profile_size": (True, "[H, W] with two whole numbers >= 1"),
         "scale_range": (False, "[min, max] with 0 < min <= max")}


def _describe(hint: Any) -> str:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args) + (" or null" if type(None) in typing.get_args(hint) else "")
    names = {int: "a whole number", float: "a number", bool: "true or false", str: "a string",
             list: "a list", dict: "a mapping", tuple: "a list"}
    origin = typing.get_origin(hint)
    if origin in (list, tuple) and args and args[0] is not Ellipsis:
        plural = {int: "whole numbers", float: "numbers", str: "strings", bool: "true/false values"}
        return f"a list of {plural.get(args[0], _describe(args[0]))}"
    return names.get(origin or hint, str(hint))


def _matches(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is Any:
        return True
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin in (list, tuple):
        inner = typing.get_args(hint)[:1]
        return isinstance(value, (list, tuple)) and all(_matches(v, inner[0]) for v in value) if inner else \
            isinstance(value, (list, tuple))
    if origin is dict or hint is dict:
        return isinstance(value, dict)
    return True


def check_fields(obj: Any, where: str) -> None:
    """Type and range of every field of a config dataclass: one line naming key, value and expectation."""
    hints = get_type_hints(type(obj))
    for f in fields(obj):
        value, key = getattr(obj, f.name), f"{where}.{f.name}".lstrip(".")
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            continue
        rng = RANGES.get(f.name)
        if not _matches(value, hint):
            nullable = type(None) in typing.get_args(hint)
            want = f"{rng[1]}{' or null' if nullable else ''}" if rng is not None else _describe(hint)
            raise ConfigError(f"{key} must be {want}, got {value!r}.")
        if value is None:
            continue
        if f.name in PAIRS:
            whole, what = PAIRS[f.name]
            ok = len(value) == 2 and (all(v >= 1 for v in value) if whole else 0 < value[0] <= value[1])
            if not ok:
                raise ConfigError(f"{key} must be {what}, got {value!r}.")
        if rng is not None and isinstance(value, (int, float)) and not isinstance(value, bool) and not rng[0](value):
            raise ConfigError(f"{key} must be {rng[1]}, got {value!r}.")


def _build(cls: type, data: dict[str, Any], where: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"'{where or 'recipe'}' must be a mapping, got {type(data).__name__}.")
    hints = get_type_hints(cls)
    check_unknown(data, [f.name for f in fields(cls)], where)
    kwargs = {}
    for k, v in data.items():
        t = hints[k]
        kwargs[k] = _build(t, v, f"{where}.{k}".lstrip(".")) if dataclasses.is_dataclass(t) else v
    obj = cls(**kwargs)
    check_fields(obj, where)
    return obj


def recipe_from_dict(data: dict[str, Any]) -> Recipe:
    recipe = _build(Recipe, data or {}, "")
    validate_train(recipe.train)
    recipe.pretrain.check()
    return recipe


def distill_ramp_steps(value: float, total: int, key: str = "warmup") -> int:
    """``distill.<key>`` (warmup / cooldown) in steps: a fraction (< 1) of ``total`` or a step count."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ConfigError(f"distill.{key} must be a fraction of the schedule (< 1) or a step count, got {value!r}.")
    steps = round(value * total) if value < 1 else int(value)
    if value >= 1 and value != int(value):
        raise ConfigError(f"distill.{key} >= 1 counts steps and must be whole, got {value}.")
    if steps > total:
        raise ConfigError(f"distill.{key} is {steps} steps, longer than the {total}-step schedule. "
                          f"Use a fraction (e.g. 0.1) or fewer steps.")
    return steps


def distill_ramps(warmup: float, cooldown: float, total: int) -> tuple[int, int]:
    """(warm-up, cool-down) in steps; the two must fit in the schedule together."""
    warm, cool = distill_ramp_steps(warmup, total, "warmup"), distill_ramp_steps(cooldown, total, "cooldown")
    if warm + cool > total:
        raise ConfigError(f"distill.warmup ({warm} steps) and distill.cooldown ({cool} steps) overlap in the "
                          f"{total}-step schedule. Shorten one of them.")
    return warm, cool


def validate_train(t: TrainConfig) -> None:
    if t.optimizer not in ("sgd", "adamw"):
        raise ConfigError(f"train.optimizer must be 'sgd' or 'adamw', got {t.optimizer!r}.")
    if t.schedule not in ("poly", "cosine", "onecycle", "step"):
        raise ConfigError(f"train.schedule must be poly, cosine, onecycle or step, got {t.schedule!r}.")
    if not all(0 < m < 1 for m in t.milestones) or list(t.milestones) != sorted(t.milestones):
        raise ConfigError(f"train.milestones must be increasing fractions of the schedule in (0, 1), "
                          f"got {t.milestones!r}.")
    if t.steps is None and t.epochs is None:
        raise ConfigError("Set train.steps or train.epochs (e.g. --steps 1000).")
    for key in ("steps", "epochs"):
        v = getattr(t, key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ConfigError(f"train.{key} must be a whole number >= 1, got {v!r}.")
    if isinstance(t.batch_size, bool) or not isinstance(t.batch_size, int) or t.batch_size < 1:
        raise ConfigError(f"train.batch_size must be a whole number >= 1, got {t.batch_size!r}.")
    if isinstance(t.lr, bool) or not isinstance(t.lr, (int, float)) or not t.lr > 0:
        raise ConfigError(f"train.lr must be a positive number, got {t.lr!r}.")



def recipe_path(name_or_path: str) -> Path:
    """A path to a YAML file, or the name of a preset shipped in profiles/recipes/."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.exists():
        if not p.is_file():
            raise ConfigError(f"Recipe file '{p}' does not exist.")
        return p
    pkg = importlib.resources.files("kdcompress.profiles") / "recipes" / f"{name_or_path}.yaml"
    if not pkg.is_file():
        raise ConfigError(f"Unknown recipe '{name_or_path}'. Built-in recipes: {', '.join(list_presets('recipes'))}, "
                          f"or pass a path to a .yaml file.")
    return Path(str(pkg))


def list_presets(kind: str) -> list[str]:
    root = importlib.resources.files("kdcompress.profiles") / kind
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".yaml"))


TARGET_KEYS = {
    "name": None,
    "export": {"to", "precision", "input_size", "dynamic_batch", "dynamic_spatial", "opset", "calib_images",
               "workspace_mb"},
    "profile": {"backend", "device", "batch", "input_size", "threads"},
    "tolerances": None,  # the tasks' own Tolerances fields (checked below)
}


def _tolerance_keys() -> set[str]:
    """Every tolerance any task defines: a target names no task, so the export checks the task's own."""
    from dataclasses import fields as dc_fields

    from kdcompress.tasks import TASKS

    keys: set[str] = set()
    for name in TASKS.names():
        for tol in TASKS.get(name).tolerances.values():
            keys |= {f.name for f in dc_fields(tol)}
    return keys


def load_target(name_or_path: str) -> dict[str, Any]:
    """A deployment-target preset (profiles/targets/): export + profile settings and tolerances."""
    p = Path(name_or_path)
    if not (p.suffix in (".yaml", ".yml") or p.exists()):
        p = Path(str(importlib.resources.files("kdcompress.profiles") / "targets" / f"{name_or_path}.yaml"))
        if not p.is_file():
            raise ConfigError(f"Unknown target '{name_or_path}'. Built-in targets: {', '.join(list_presets('targets'))}, "
                              f"or pass a path to a .yaml file.")
    data = load_yaml(p)
    check_unknown(data, TARGET_KEYS, "", f"target '{p}'")
    for section, keys in data.items():
        allowed = _tolerance_keys() if section == "tolerances" else TARGET_KEYS[section]
        if allowed is not None:
            if not isinstance(keys or {}, dict):
                raise ConfigError(f"{section} in target '{p}' must be a mapping, got {keys!r}.")
            check_unknown(keys or {}, allowed, section, f"target '{p}'")
    return {"name": data.get("name", p.stem), "export": data.get("export") or {}, "profile": data.get("profile") or {},
            "tolerances": data.get("tolerances") or {}}


def load_yaml(path: str | Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"Recipe '{path}' is not valid YAML: {str(e).splitlines()[0]}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"Recipe '{path}' must be a YAML mapping at top level.")
    return data


def apply_overrides(data: dict[str, Any], overrides: list[str] | dict[str, Any]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides (value parsed as YAML) to a nested dict, in place."""
    items = overrides.items() if isinstance(overrides, dict) else (_split(o) for o in overrides)
    for key, value in items:
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            nxt = node.setdefault(part, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"Cannot set '{key}': '{part}' is not a section.")
            node = nxt
        node[parts[-1]] = value
    return data


def _split(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ConfigError(f"Override '{item}' must look like key.sub=value (e.g. --set train.lr=0.01).")
    key, raw = item.split("=", 1)
    value = yaml.safe_load(raw) if raw.strip() else None
    if isinstance(value, str):  # YAML 1.1 reads "1e-4" as a string; users mean a number
        try:
            value = float(value)
        except ValueError:
            pass
    return key.strip(), value


def load_recipe(name_or_path: str | None, overrides: list[str] | dict[str, Any] = ()) -> Recipe:
    data = load_yaml(recipe_path(name_or_path)) if name_or_path else {}
    apply_overrides(data, overrides)
    return recipe_from_dict(data)


def role_train(recipe: Recipe, role: str) -> TrainConfig:
    """The recipe's ``train`` section with the role's overrides applied (checked)."""
    base = asdict(recipe.train)
    mc: ModelConfig = getattr(recipe, role)
    check_unknown(mc.train, base, f"{role}.train")
    base.update(mc.train)
    t = TrainConfig(**base)
    check_fields(t, f"{role}.train")  # recipe.train passed at load: a failure here is the role's own key
    validate_train(t)
    return t


def to_yaml(obj: Any) -> str:
    return yaml.safe_dump(asdict(obj) if dataclasses.is_dataclass(obj) else obj, sort_keys=False)
