"""Backbone weights: ImageNet files, user files, or the built-in ``digits`` classification pretraining.

The papers fine-tune ImageNet-pretrained backbones. Offline, the built-in substitute is a
classification task made from the same raw material as the ``digits`` scenes: one handwritten
digit (or none) on a textured background, 11 classes. It uses only the source digits of the
segmentation *train* split (a tenth of them held out to report accuracy), so the validation
handwriting stays unseen by every stage. The trained classifier is saved in torchvision's own
state-dict layout (``resnet18`` / ``mobilenet_v2`` keys) and goes through exactly the loader an
ImageNet file does (:func:`load_backbone_state`), so both paths are one code path.

Cache: ``$KDCOMPRESS_CACHE/pretrain/<backbone>-<key>.pth`` plus a JSON sidecar (settings,
accuracy, time, SHA-256). The key hashes backbone, data seed and every pretraining setting; a
cached file whose hash or keys do not check out is rebuilt with a warning line.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from kdcompress.engine.checkpoint import sha256_file
from kdcompress.errors import CheckpointError, ConfigError, KdError

PRETRAIN_VERSION = 1
NUM_CLASSES = 11  # digits 0-9 + "no digit"
HELD_OUT = 0.1  # share of the train-split source digits kept out of pretraining, to report accuracy


@dataclass
class PretrainConfig:
    """Settings of the built-in classification pretraining (all enter the cache key)."""

    steps: int = 300
    batch_size: int = 64
    lr: float = 0.003
    weight_decay: float = 0.0001
    image_size: int = 48
    eval_images: int = 512
    seed: int = 0

    def check(self) -> None:
        for key in ("steps", "batch_size", "image_size", "eval_images"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"pretrain.{key} must be a positive integer, got {v!r}.")
        if self.image_size < 32:
            raise ConfigError(f"pretrain.image_size must be >= 32 (a stride-32 backbone), got {self.image_size}.")
        for key in ("lr", "weight_decay"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0 or \
                    (key == "lr" and v == 0):
                raise ConfigError(f"pretrain.{key} must be a {'positive' if key == 'lr' else 'non-negative'} "
                                  f"number, got {v!r}.")


# ----------------------------------------------------------------------------- torchvision layout

def torchvision_classifier(backbone: str, num_classes: int = 1000) -> nn.Module:
    """The torchvision classification network whose state-dict layout a backbone loads."""
    from torchvision import models as tvm

    factories: dict[str, Callable[..., nn.Module]] = {
        "r18": tvm.resnet18, "r50": tvm.resnet50, "r101": tvm.resnet101, "mbv2": tvm.mobilenet_v2,
        "mbv3": tvm.mobilenet_v3_large}
    if backbone not in factories:
        raise KdError(f"No pretraining for backbone '{backbone}'. Backbones: {', '.join(factories)}")
    return factories[backbone](weights=None, num_classes=num_classes)


CLASSIFIER_PREFIXES = ("fc.", "classifier.")  # the task-specific layer, never loaded into a backbone


def load_backbone_state(net: nn.Module, path: str | Path) -> None:
    """Load a torchvision-layout state dict (ImageNet or built-in) into ``net``, classifier excluded.

    Every non-classifier key of ``net`` must be present with its shape; otherwise the file was
    made for another backbone and is refused with one line.
    """
    from kdcompress.engine.checkpoint import safe_load

    path = Path(path)
    state = safe_load(path)
    state = state.get("state_dict", state) if isinstance(state.get("state_dict"), dict) else state
    own = {k: v for k, v in net.state_dict().items() if not k.startswith(CLASSIFIER_PREFIXES)}
    missing = [k for k in own if k not in state]
    wrong = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or wrong:
        example = (missing or wrong)[0]
        raise CheckpointError(
            f"Pretrained weights '{path}' were made for another backbone ({len(missing)} missing, {len(wrong)} "
            f"mis-shaped keys, e.g. {example!r}). Use weights of this backbone or drop --pretrained.")
    net.load_state_dict({k: state[k] for k in own}, strict=False)


def imagenet_file(backbone: str) -> Path:
    """Where torchvision keeps the ImageNet file of ``backbone`` (downloaded there when online)."""
    from torchvision import models as tvm

    enum = {"r18": tvm.ResNet18_Weights, "r50": tvm.ResNet50_Weights, "r101": tvm.ResNet101_Weights,
            "mbv2": tvm.MobileNet_V2_Weights, "mbv3": tvm.MobileNet_V3_Large_Weights}[backbone].DEFAULT
    fname = enum.url.rsplit("/", 1)[-1]
    path = Path(torch.hub.get_dir()) / "checkpoints" / fname
    if not path.is_file():
        try:
            torch.hub.load_state_dict_from_url(enum.url, progress=False, check_hash=True)
        except Exception as e:  # URLError, OSError, RuntimeError from the hub downloader
            raise KdError(
                f"Cannot load ImageNet weights '{fname}' ({type(e).__name__}: offline?). Put the file in "
                f"$TORCH_HOME/hub/checkpoints/ (default ~/.cache/torch/hub/checkpoints/), use --pretrained digits, "
                f"or drop --pretrained.") from None
    return path


# ----------------------------------------------------------------------------- the built-in task

def _crop(rng: np.random.Generator, glyphs: np.ndarray, targets: np.ndarray, pool: np.ndarray,
          size: int, yy: np.ndarray, xx: np.ndarray) -> tuple[np.ndarray, int]:
    """One size×size RGB crop (uint8) and its class: a digit at the scenes' scale, or none (class 10)."""
    from PIL import Image

    from kdcompress.data.digits import _background, _contrast_colour, _resize, paste_digit

    canvas = _background(rng, size, yy, xx)
    label = np.zeros((size, size), dtype=np.uint8)
    inst = np.zeros((size, size), dtype=np.uint8)
    if rng.uniform() < 1 / NUM_CLASSES:
        return np.round(canvas * 255).astype(np.uint8), NUM_CLASSES - 1
    src = int(rng.choice(pool))
    s = int(rng.integers(round(0.45 * size), round(0.75 * size) + 1))  # glyph px: digits fill 45-75 % of the crop
    p = min(size, round(s * 10 / 8))
    v = _resize(np.pad(glyphs[src], 1), (p, p), Image.BILINEAR)
    y0, x0 = (int(c) for c in rng.integers(0, size - p + 1, size=2))
    colour = _contrast_colour(rng, canvas[y0:y0 + p, x0:x0 + p].mean(axis=(0, 1)))
    paste_digit(canvas, label, inst, v, y0, x0, 1, int(targets[src]) + 1, colour)
    return np.round(canvas * 255).astype(np.uint8), int(targets[src])


class DigitCrops:
    """Deterministic stream of classification batches: batch ``i`` depends on (seed, i) only."""

    def __init__(self, data_seed: int, size: int, held_out: bool) -> None:
        from sklearn.datasets import load_digits

        from kdcompress.data.digits import _split_sources
        from kdcompress.data.transforms import IMAGENET_MEAN, IMAGENET_STD

        digits = load_digits()
        self.glyphs = (digits.images / 16.0).astype(np.float32)
        self.targets = digits.target.astype(np.int64)
        train_src, _val_src = _split_sources(len(self.glyphs), data_seed)  # validation handwriting: never used
        n_out = max(1, round(HELD_OUT * len(train_src)))
        perm = np.random.default_rng([data_seed, 4242]).permutation(train_src)
        self.pool = np.sort(perm[:n_out] if held_out else perm[n_out:])
        self.size = size
        self.yy, self.xx = np.mgrid[0:size, 0:size].astype(np.float32) / np.float32(size)
        self.mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)

    def batch(self, seed: int, index: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng([seed, index, 77])
        imgs, labels = zip(*(_crop(rng, self.glyphs, self.targets, self.pool, self.size, self.yy, self.xx)
                             for _ in range(n)))
        x = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float().div_(255.0)
        return (x - self.mean) / self.std, torch.tensor(labels, dtype=torch.int64)


def _key(backbone: str, data_seed: int, cfg: PretrainConfig) -> str:
    blob = json.dumps({"backbone": backbone, "data_seed": data_seed, "cfg": asdict(cfg), "v": PRETRAIN_VERSION},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def pretrain_path(backbone: str, data_seed: int, cfg: PretrainConfig) -> Path:
    from kdcompress.data.digits import cache_dir

    return cache_dir() / "pretrain" / f"{backbone}-{_key(backbone, data_seed, cfg)}.pth"




def read_pretrain_record(path: Path) -> dict[str, Any] | None:
    """The sidecar of a cached pretraining, or None when it is missing, unreadable or stale."""
    try:
        rec = json.loads(path.with_suffix(".json").read_text())
    except (OSError, ValueError):
        return None
    return rec if isinstance(rec, dict) else None


def _cache_ok(path: Path, backbone: str) -> str | None:
    """None if the cached file is intact and fits ``backbone``; else why it is not."""
    rec = read_pretrain_record(path)
    if not path.is_file() or rec is None:
        return "missing"
    if rec.get("sha256") != sha256_file(path):
        return "corrupt (SHA-256 differs from its record)"
    if rec.get("backbone") != backbone:
        return f"made for backbone '{rec.get('backbone')}'"
    try:
        load_backbone_state(torchvision_classifier(backbone, NUM_CLASSES), path)
    except KdError:
        return "not loadable into this backbone"
    return None


@torch.no_grad()
def _accuracy(net: nn.Module, data: DigitCrops, seed: int, n: int) -> float:
    net.eval()
    correct, seen, i = 0, 0, 0
    while seen < n:
        x, y = data.batch(seed + 1_000_003, i, min(128, n - seen))
        correct += int((net(x).argmax(1) == y).sum())
        seen += len(y)
        i += 1
    return correct / seen


def ensure_digits_pretrained(backbone: str, data_seed: int = 0, cfg: PretrainConfig | None = None, *,
                             log: Callable[[str], None] = print) -> Path:
    """Path of the cached built-in pretraining of ``backbone``; trains it (once) when missing or bad."""
    cfg = cfg or PretrainConfig()
    cfg.check()
    path = pretrain_path(backbone, data_seed, cfg)
    # The caller's RNG stream (its model init) stays untouched whether the cache is warm or cold: the cache
    # check builds a network too, and without the fork a warm and a cold run initialised different models.
    with torch.random.fork_rng(devices=[]):
        problem = _cache_ok(path, backbone)
        if problem is None:
            return path
        if problem != "missing":
            log(f"pretraining cache '{path}' is {problem}: rebuilding it")
        torch.manual_seed(cfg.seed)
        return _pretrain(backbone, data_seed, cfg, path, log)


def _pretrain(backbone: str, data_seed: int, cfg: PretrainConfig, path: Path, log: Callable[[str], None],
              fp32: bool = False) -> Path:
    """``fp32`` turns autocast off (benchmarks/pretrain_stability.py compares it with the trainer's choice)."""
    from kdcompress.engine.checkpoint import atomic_save, atomic_write_text
    from kdcompress.engine.trainer import amp_dtype_for

    t0 = time.perf_counter()
    net = torchvision_classifier(backbone, NUM_CLASSES)
    for m in net.modules():  # MobileNetV3's BN momentum 0.01 leaves running statistics near their init after a
        if isinstance(m, nn.modules.batchnorm._BatchNorm):  # short schedule (eval accuracy at chance); 0.1 as
            m.momentum = 0.1  # every other torchvision backbone, so the saved statistics describe the data
    train_data = DigitCrops(data_seed, cfg.image_size, held_out=False)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.steps, pct_start=0.3)
    amp = None if fp32 else amp_dtype_for(torch.device("cpu"))
    net.train()
    every = max(1, cfg.steps // 5)
    for step in range(cfg.steps):
        x, y = train_data.batch(cfg.seed, step, cfg.batch_size)
        with torch.autocast("cpu", dtype=amp or torch.float32, enabled=amp is not None):
            loss = F.cross_entropy(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % every == 0 or step + 1 == cfg.steps:
            el = time.perf_counter() - t0
            log(f"pretrain {backbone}: step {step + 1}/{cfg.steps} loss {float(loss.detach()):.3f} "
                f"({el:.0f} s, ETA {el / (step + 1) * (cfg.steps - step - 1):.0f} s)")
    acc = _accuracy(net, DigitCrops(data_seed, cfg.image_size, held_out=True), cfg.seed, cfg.eval_images)
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    atomic_save(state, path)
    wall = time.perf_counter() - t0
    atomic_write_text(path.with_suffix(".json"), json.dumps({
        "backbone": backbone, "data_seed": data_seed, "config": asdict(cfg), "version": PRETRAIN_VERSION,
        "held_out_accuracy": acc, "classes": NUM_CLASSES, "wall_s": wall, "sha256": sha256_file(path),
        "layout": type(net).__name__}, indent=2))
    log(f"pretrain {backbone}: held-out accuracy {100 * acc:.1f} % in {wall:.0f} s -> {path}")
    return path


PRETRAINED_SOURCES = ("imagenet", "digits")


def resolve_pretrained(source: Any, backbone: str, *, data_name: str = "digits", data_seed: int = 0,
                       cfg: PretrainConfig | None = None, log: Callable[[str], None] = print) -> Path | None:
    """``false``/None -> None; ``true``/``imagenet`` -> the torchvision file; ``digits`` -> the
    built-in pretraining (trained and cached on first use); anything else -> a state-dict file."""
    if source is None or source is False or source == "none":
        return None
    if source is True or source == "imagenet":
        return imagenet_file(backbone)
    if source == "digits":
        if data_name not in ("digits", "digits-det"):
            raise ConfigError(f"pretrained: digits is the built-in pretraining for the digits dataset, not "
                              f"'{data_name}'. Use imagenet or a weights file.")
        return ensure_digits_pretrained(backbone, data_seed, cfg, log=log)
    if not isinstance(source, (str, Path)):
        raise ConfigError(f"pretrained must be false, imagenet, digits or a weights file, got {source!r}.")
    path = Path(source).expanduser()
    if not path.is_file():
        raise ConfigError(f"Pretrained weights file '{path}' does not exist. Pass imagenet, digits or an existing "
                          f"torchvision-layout state dict.")
    return path
