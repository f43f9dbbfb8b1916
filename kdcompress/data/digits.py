"""Built-in "digits" dataset: scenes of real handwritten digits on textured backgrounds.

It exists so the whole toolchain (train, distil, evaluate, export) can run end to end without a
download. The 8x8 scans of ``sklearn.datasets.load_digits`` (1797 samples) are upsampled and
pasted on varied backgrounds; the split is made by source sample, so validation handwriting is
unseen. The result is written in the Pascal VOC layout and read back by ``VOCSegmentation``,
the same code path as real VOC, plus COCO boxes per split for detection-style checks.

Labels: 0 background, d+1 for digit d, 255 on the anti-aliased rim (ambiguous pixels, like the
VOC object boundaries); later digits occlude earlier ones.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from kdcompress.data import DatasetInfo, PathLike, Transform, register_dataset
from kdcompress.data.coco import load_coco, write_coco_json
from kdcompress.data.voc import VOCSegmentation, voc_colormap
from kdcompress.errors import DataError

DIGITS_CLASSES: tuple[str, ...] = ("background",) + tuple(str(d) for d in range(10))
DIGITS_INFO = DatasetInfo("digits", 11, DIGITS_CLASSES,
                          palette=tuple(tuple(int(v) for v in rgb) for rgb in voc_colormap(11)))
GENERATOR_VERSION = 1
MARKER = "digits_meta.json"
VAL_FRACTION = 0.2
# Upsampled glyph intensity v (0..1): v >= INK -> pure digit colour and digit class; v <= RIM -> pure
# background, label untouched; in between the colour is a blend of both, so those rim pixels are 255.
INK = 0.45
RIM = 0.3
PLACEMENT_TRIES = 4  # candidate positions per digit; the least-occluding one wins
DEFAULTS: dict[str, int] = {"image_size": 96, "num_train": 1000, "num_val": 200, "max_digits": 6, "seed": 0}
_LUMA = np.array([0.299, 0.587, 0.114])


def digits_info(image_size: int | None = None, **_: Any) -> DatasetInfo:
    """Digits scenes are square and all one size: export and evaluation then see the same images."""
    s = int(image_size or DEFAULTS["image_size"])
    return replace(DIGITS_INFO, image_size=(s, s))


def cache_dir() -> Path:
    """``$KDCOMPRESS_CACHE`` or ``~/.cache/kdcompress``."""
    env = os.environ.get("KDCOMPRESS_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "kdcompress"


def digits_folder_name(image_size: int, num_train: int, num_val: int, max_digits: int, seed: int) -> str:
    return f"digits-{image_size}px-{num_train}-{num_val}-{max_digits}-s{seed}"


def _read_marker(folder: Path) -> dict[str, Any] | None:
    try:
        return json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return None


def _validate(opts: dict[str, int]) -> None:
    ranges = {"image_size": (16, 4096), "num_train": (1, 10**7), "num_val": (1, 10**7), "max_digits": (1, 255),
              "seed": (0, 2**63 - 1)}
    for key, (low, high) in ranges.items():
        val = opts[key]
        if isinstance(val, bool) or not isinstance(val, (int, np.integer)) or not low <= val <= high:
            raise DataError(f"digits option {key}={val!r} is invalid; use an integer in {low}..{high}")


# ----------------------------------------------------------------------------------------------
# Generation


def _resize(arr: np.ndarray, size: tuple[int, int], resample: int) -> np.ndarray:
    """Float (h, w) or (h, w, 3) array -> (size[0], size[1]) with PIL (deterministic, fast)."""
    if arr.ndim == 2:
        return np.asarray(Image.fromarray(arr.astype(np.float32)).resize(size[::-1], resample))
    chans = [_resize(np.ascontiguousarray(arr[..., c]), size, resample) for c in range(arr.shape[-1])]
    return np.stack(chans, axis=-1)


def _background(rng: np.random.Generator, S: int, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """Float (S, S, 3) in [0, 1]: gradient/noise mixture, optionally overlaid with stripes or checkers."""
    c1, c2 = rng.random((2, 3), dtype=np.float32)
    theta = rng.uniform(0, 2 * np.pi)
    t = np.cos(theta) * xx + np.sin(theta) * yy
    t = (t - t.min()) / max(np.ptp(t), 1e-6)
    gradient = c1 + (c2 - c1) * t[..., None]
    grid = int(rng.integers(2, 7))
    noise = _resize(rng.random((grid, grid, 3), dtype=np.float32), (S, S), Image.BICUBIC)
    w = np.float32(rng.uniform(0, 1))
    img = w * gradient + (1 - w) * noise

    kind = rng.integers(0, 3)  # 0 plain, 1 stripes, 2 checker
    if kind:
        phi = rng.uniform(0, np.pi)
        freq = rng.uniform(2, 10)  # periods across the canvas
        u = np.float32(np.cos(phi) * freq) * xx + np.float32(np.sin(phi) * freq) * yy
        v = np.float32(-np.sin(phi) * freq) * xx + np.float32(np.cos(phi) * freq) * yy
        if kind == 1:
            mask = 0.5 + 0.5 * np.sin(np.float32(2 * np.pi) * u + np.float32(rng.uniform(0, 2 * np.pi)))
            if rng.uniform() < 0.5:
                mask = (mask > 0.5).astype(np.float32)
        else:
            mask = ((np.floor(u) + np.floor(v)) % 2).astype(np.float32)
        strength = np.float32(rng.uniform(0.15, 0.5))
        img += (rng.random(3, dtype=np.float32) - img) * (strength * mask)[..., None]
    img += np.float32(0.015) * rng.standard_normal(img.shape, dtype=np.float32)
    return np.clip(img, 0, 1, out=img)


def _contrast_colour(rng: np.random.Generator, local: np.ndarray) -> np.ndarray:
    """A random colour whose luminance differs clearly from the local background mean."""
    cands = rng.uniform(0, 1, (16, 3))
    diff = np.abs(cands @ _LUMA - float(local @ _LUMA))
    good = np.flatnonzero(diff > 0.35)
    return cands[good[0]] if good.size else cands[np.argmax(diff)]


def paste_digit(canvas: np.ndarray, label: np.ndarray, inst: np.ndarray, v: np.ndarray, y0: int, x0: int,
                k: int, cls: int, colour: np.ndarray) -> None:
    """Composite glyph intensity ``v`` (p x p) at (y0, x0) in place; later calls occlude earlier ones.

    Pure-ink pixels get ``cls``, the blended rim 255, and ``inst`` records which digit is visible.
    """
    alpha = np.clip((v - RIM) / (INK - RIM), 0, 1)
    win = (slice(y0, y0 + v.shape[0]), slice(x0, x0 + v.shape[1]))
    canvas[win] += (colour - canvas[win]) * alpha[..., None]
    label[win][alpha >= 1] = cls
    label[win][(alpha > 0) & (alpha < 1)] = 255
    inst[win][alpha > 0] = k


def visible_boxes(inst: np.ndarray, categories: list[int]) -> list[dict]:
    """COCO boxes of the visible pixels of digit k = 1..n (``inst == k``); fully hidden digits are skipped."""
    boxes = []
    for k, cat in enumerate(categories, start=1):
        ys, xs = np.nonzero(inst == k)
        if ys.size:
            x, y = int(xs.min()), int(ys.min())
            boxes.append({"category_id": int(cat), "area": int(ys.size),
                          "bbox": [x, y, int(xs.max()) - x + 1, int(ys.max()) - y + 1]})
    return boxes


def _scene(rng: np.random.Generator, glyphs: np.ndarray, targets: np.ndarray, pool: np.ndarray, S: int,
           max_digits: int, yy: np.ndarray, xx: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """One image (uint8 SxSx3), its label (uint8 SxS) and visible-pixel boxes of its digits."""
    canvas = _background(rng, S, yy, xx)
    label = np.zeros((S, S), dtype=np.uint8)
    inst = np.zeros((S, S), dtype=np.uint8)
    smin, smax = max(4, round(28 * S / 96)), max(5, round(44 * S / 96))
    n = int(rng.integers(1, max_digits + 1))
    srcs = rng.choice(pool, size=n)
    for k, src in enumerate(srcs, start=1):
        s = int(rng.integers(smin, smax + 1))
        p = min(S, round(s * 10 / 8))  # 8x8 glyph + 1 px zero border so the ink fades out at the edges
        v = _resize(np.pad(glyphs[src], 1), (p, p), Image.BILINEAR)
        cands = rng.integers(0, S - p + 1, size=(PLACEMENT_TRIES, 2))
        y0, x0 = (int(c) for c in cands[np.argmin([np.count_nonzero(inst[y:y + p, x:x + p]) for y, x in cands])])
        colour = _contrast_colour(rng, canvas[y0:y0 + p, x0:x0 + p].mean(axis=(0, 1)))
        paste_digit(canvas, label, inst, v, y0, x0, k, int(targets[src]) + 1, colour)
    boxes = visible_boxes(inst, [int(targets[src]) + 1 for src in srcs])
    return np.round(canvas * 255).astype(np.uint8), label, boxes


def _save_pair(img: np.ndarray, lab: np.ndarray, img_path: Path, lab_path: Path, palette: list[int]) -> None:
    """JPEG q95 without chroma subsampling (keeps thin coloured strokes) + VOC palette PNG label."""
    Image.fromarray(img).save(img_path, quality=95, subsampling=0)
    lab_im = Image.fromarray(lab)
    lab_im.putpalette(palette)
    lab_im.save(lab_path)


def _split_sources(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Train/val source-sample indices (80/20), disjoint, from a seeded permutation."""
    perm = np.random.default_rng([seed, 1797]).permutation(n)
    n_val = round(VAL_FRACTION * n)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def _generate(out: Path, image_size: int, num_train: int, num_val: int, max_digits: int, seed: int) -> dict:
    from sklearn.datasets import load_digits  # sklearn is slow to import; only needed here

    digits = load_digits()
    glyphs = (digits.images / 16.0).astype(np.float32)
    targets = digits.target.astype(np.int64)
    train_src, val_src = _split_sources(len(glyphs), seed)

    S = image_size
    yy, xx = np.mgrid[0:S, 0:S].astype(np.float32) / np.float32(S)
    palette = voc_colormap(256).ravel().tolist()
    img_dir, lab_dir = out / "JPEGImages", out / "SegmentationClass"
    list_dir, ann_dir = out / "ImageSets" / "Segmentation", out / "annotations"
    for d in (img_dir, lab_dir, list_dir, ann_dir):
        d.mkdir(parents=True, exist_ok=True)
    categories = [{"id": d + 1, "name": str(d)} for d in range(10)]
    meta: dict[str, Any] = {"splits": {}}
    with ThreadPoolExecutor(max_workers=4) as pool_exec:  # encoding and file creation release the GIL
        splits = (("train", num_train, train_src), ("val", num_val, val_src))
        for split_code, (split, count, pool) in enumerate(splits):
            ids, images, anns, writes = [], [], [], []
            counts = np.zeros(256, dtype=np.int64)
            for i in range(count):
                rng = np.random.default_rng([seed, split_code, i])
                img, lab, boxes = _scene(rng, glyphs, targets, pool, S, max_digits, yy, xx)
                name = f"{split}_{i:06d}"
                writes.append(pool_exec.submit(_save_pair, img, lab, img_dir / f"{name}.jpg",
                                               lab_dir / f"{name}.png", palette))
                counts += np.bincount(lab.ravel(), minlength=256)
                ids.append(name)
                images.append({"id": i + 1, "file_name": f"{name}.jpg", "width": S, "height": S})
                for b in boxes:
                    anns.append({"id": len(anns) + 1, "image_id": i + 1, "iscrowd": 0, **b})
            for fut in writes:
                fut.result()
            (list_dir / f"{split}.txt").write_text("\n".join(ids) + "\n")
            load_coco(write_coco_json(ann_dir / f"instances_{split}.json", images, anns, categories))
            total = counts.sum()
            meta["splits"][split] = {
                "images": count, "boxes": len(anns), "source_samples": int(len(pool)),
                "pixel_share": {"background": round(float(counts[0] / total), 4),
                                "digits": round(float(counts[1:11].sum() / total), 4),
                                "ignore": round(float(counts[255] / total), 4)},
            }
    return meta


def ensure_digits(root: Path | None = None, image_size: int = 96, num_train: int = 1000, num_val: int = 200,
                  max_digits: int = 6, seed: int = 0) -> Path:
    """Return a folder holding the digits dataset, generating it once (atomically) if needed.

    ``root`` is the dataset folder itself (generated into if missing or empty); by default it is
    ``cache_dir()/digits-<size>px-<train>-<val>-<max>-s<seed>``. Same options -> byte-identical files.
    """
    opts = {"image_size": image_size, "num_train": num_train, "num_val": num_val,
            "max_digits": max_digits, "seed": seed}
    _validate(opts)
    in_cache = root is None
    target = cache_dir() / digits_folder_name(**opts) if in_cache else Path(root).expanduser()
    meta = _read_marker(target)
    if meta is not None:
        if meta.get("options") != opts and not in_cache:
            raise DataError(f"'{target}' holds digits generated with {meta.get('options')}, not {opts}; "
                            f"pass the same options or use another folder")
        if meta.get("options") == opts and meta.get("version") == GENERATOR_VERSION:
            return target
    if target.is_file():
        raise DataError(f"Digits root '{target}' is a file; pass a folder (it may be empty) or leave root unset")
    stale = meta is not None  # cached by an older generator version: replace it
    if target.is_dir() and any(target.iterdir()) and not stale:
        raise DataError(f"'{target}' is not empty and holds no complete digits dataset ({MARKER} missing); "
                        f"delete it or pass an empty folder")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
    try:
        meta = _generate(tmp, **opts)
        meta.update({"version": GENERATOR_VERSION, "options": opts, "info": DIGITS_INFO.name})
        (tmp / MARKER).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        os.chmod(tmp, 0o755)
        if stale:
            old = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.old-"))
            os.replace(target, old)
            shutil.rmtree(old, ignore_errors=True)
        try:
            os.replace(tmp, target)  # atomic; also replaces an empty folder
        except OSError:
            if _read_marker(target) is None:  # not a concurrent generator that finished first
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


@register_dataset("digits", digits_info)
def build_digits(root: PathLike | None, split: str, transform: Transform | None = None,
                 image_size: int | None = None, num_train: int | None = None, num_val: int | None = None,
                 max_digits: int | None = None, seed: int | None = None) -> VOCSegmentation:
    """Built-in 11-class digits scenes (splits train/val); generated on first use.

    With ``root=None`` the cached copy for the options is used; an empty or missing ``root`` is
    generated into; an existing digits folder is reused (options given must match it).
    """
    given = {k: v for k, v in {"image_size": image_size, "num_train": num_train, "num_val": num_val,
                                "max_digits": max_digits, "seed": seed}.items() if v is not None}
    folder = Path(root).expanduser() if root is not None else None
    meta = _read_marker(folder) if folder is not None else None
    if meta is not None:
        differ = {k: v for k, v in given.items() if meta.get("options", {}).get(k) != v}
        if differ:
            raise DataError(f"'{folder}' holds digits generated with {meta.get('options')}, which differ in "
                            f"{differ}; drop those options or use another root")
    elif folder is None or not folder.exists() or (folder.is_dir() and not any(folder.iterdir())):
        folder = ensure_digits(folder, **{**DEFAULTS, **given})
    elif not (folder / "JPEGImages").is_dir():
        raise DataError(f"'{folder}' is neither empty nor a digits/VOC-layout dataset; pass an empty folder or "
                        f"leave root unset to use the cache")
    size = ((_read_marker(folder) or {}).get("options") or {}).get("image_size", given.get("image_size"))
    return VOCSegmentation(folder, split, transform, info=digits_info(size))
