"""Headless PNG figures: predictions side by side, and what a distillation method sees.

Two families, both written with matplotlib's Agg canvas (no display, no pyplot state) at a fixed
size and DPI, without the ``Software`` PNG tag, so one input gives byte-identical files and
deterministic names:

* ``predictions_figures``: per validation image (``predictions_000.png``, ...) or one grid
  (``predictions_grid.png``): the image, its ground truth (dataset palette, ignore grey) and the
  prediction of every given checkpoint, in the order given.
* ``method_figures``: per image (``method_<name>_000.png``) for a distilled run folder: the
  teacher's and student's feature energy (mean of squares over channels) at every tap of the
  method, plus what the method itself computes: AttnFD's CBAM spatial gates (both sides),
  ACAM-KD's M spatial masks of one tap, CanKD's affinity of one position over the pooled
  teacher positions. The method is rebuilt exactly as the trainer builds it (``build_method``
  with tap shapes from a dry run at the training crop size) and its weights come from
  ``state.pt``; its maps are read with forward hooks on the method's own modules while the
  method's ``forward`` runs, so the figure shows the code path the loss uses.

The array functions (``feature_energy``, ``attnfd_gates``, ``acam_masks``, ``cankd_affinity``)
return plain NumPy arrays for tests and notebooks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from kdcompress.errors import CheckpointError, ConfigError, KdError

DPI = 100
PANEL_IN = 1.8  # panel height in inches; width = height × image aspect
TITLE_IN = 0.34  # room above each panel for a two-line title
LEGEND_ROW_IN = 0.22
LEGEND_PER_ROW = 6
IGNORE_RGB = (210, 210, 210)  # label 255 (ignore): a grey no built-in palette uses (VOC, digits, CamVid: 128)
PNG_METADATA: dict[str, Any] = {"Software": None}  # no version tag: files depend on the input alone
FIGURES_DIR = "figures"


# ----------------------------------------------------------------------------- inputs


def parse_model_specs(specs: Sequence[str] | None) -> dict[str, Path]:
    """``["teacher=runs/t/model.pt", "runs/s"]`` -> {label: checkpoint}; a bare path is labelled by its
    run folder. A run folder stands for its model.pt. Missing files fail here, before any work."""
    if not specs:
        raise ConfigError("Pass at least one --model LABEL=CHECKPOINT, e.g. --model teacher=runs/t/model.pt.")
    out: dict[str, Path] = {}
    for spec in specs:
        label, sep, path = str(spec).partition("=")
        if not sep:
            label, path = "", str(spec)
        ckpt = checkpoint_file(path)
        label = label.strip() or (ckpt.parent.name or ckpt.stem)
        if label in out:
            raise ConfigError(f"Label '{label}' is given twice in --model. Give each checkpoint its own label, "
                              f"e.g. --model plain=PATH --model distilled=PATH.")
        out[label] = ckpt
    return out


def checkpoint_file(path: str | Path) -> Path:
    """A model checkpoint path (a run folder means its model.pt); one line if it does not exist."""
    p = Path(path)
    if p.is_dir():
        p = p / "model.pt"
    if not p.is_file():
        raise CheckpointError(f"Checkpoint '{p}' does not exist. Check the path (train one with `kdcompress train` "
                              f"or `kdcompress distill`).")
    return p


def parse_position(text: str | None) -> tuple[int, int] | None:
    """'3,4' -> (3, 4) as (y, x); None stays None (the map's centre)."""
    if text is None or str(text).strip() == "":
        return None
    try:
        y, x = (int(v) for v in str(text).replace(" ", "").split(","))
    except ValueError:
        raise ConfigError(f"--position '{text}' must look like Y,X (row, column of the tap map), e.g. 1,2.") from None
    return y, x


def _check_images(images: int) -> None:
    if isinstance(images, bool) or not isinstance(images, int) or images < 1:
        raise ConfigError(f"--images must be at least 1, got {images}.")


def _val_dataset(meta: Mapping[str, Any], source: str, data: str | None, data_root: str | Path | None,
                 split: str) -> Any:
    """The split the checkpoint was trained on (or ``data``), as *unnormalised* RGB in [0, 1]."""
    from kdcompress.data import val_transform
    from kdcompress.engine.evaluation import checkpoint_dataset

    ds = checkpoint_dataset(dict(meta), source, data, data_root, split, val_transform((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)))
    name = data or meta.get("dataset")
    if ds.info.num_classes != int(meta["num_classes"]):
        raise KdError(f"'{source}' predicts {meta['num_classes']} classes but dataset '{name}' has "
                      f"{ds.info.num_classes}. Use the dataset it was trained on.")
    if len(ds) == 0:
        raise KdError(f"Split '{split}' of dataset '{name}' is empty: nothing to draw.")
    return ds


def _normalise(rgb: Tensor, meta: Mapping[str, Any]) -> Tensor:
    mean = torch.tensor(meta.get("mean", (0.485, 0.456, 0.406)), dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(meta.get("std", (0.229, 0.224, 0.225)), dtype=torch.float32).view(3, 1, 1)
    return ((rgb - mean) / std)[None]


def _palette(info: Any) -> np.ndarray:
    """256×3 uint8 lookup: the dataset palette (VOC colours when it has none), 255 grey."""
    from kdcompress.data.voc import voc_colormap

    lut = voc_colormap(256).copy()
    if info.palette is not None:
        lut[: len(info.palette)] = np.asarray(info.palette, dtype=np.uint8)
    lut[info.num_classes:] = 0
    lut[info.ignore_index] = IGNORE_RGB
    return lut


def colorize(label: np.ndarray | Tensor, lut: np.ndarray) -> np.ndarray:
    arr = label.numpy() if isinstance(label, Tensor) else np.asarray(label)
    return lut[np.clip(arr, 0, 255).astype(np.int64)]


@torch.no_grad()
def _predict(model: nn.Module, rgb: Tensor, meta: Mapping[str, Any], device: torch.device) -> np.ndarray:
    logits = model(_normalise(rgb, meta).to(device)).float()
    return logits.argmax(1)[0].cpu().numpy()


def _rgb_image(rgb: Tensor) -> np.ndarray:
    return rgb.clamp(0, 1).permute(1, 2, 0).numpy()


# ----------------------------------------------------------------------------- drawing


@dataclass
class Panel:
    title: str
    data: np.ndarray  # H×W×3 RGB (uint8 or float in [0, 1]) or H×W scalar map
    cmap: str | None = None
    vmin: float | None = None
    vmax: float | None = None
    marks: list[tuple[float, float]] = field(default_factory=list)  # (y, x) in data coordinates


def _scalar_panel(title: str, arr: np.ndarray, cmap: str = "magma", vmin: float | None = None,
                  vmax: float | None = None, symmetric: bool = False,
                  marks: list[tuple[float, float]] | None = None) -> Panel:
    arr = np.asarray(arr, dtype=np.float64)
    lo, hi = float(arr.min()), float(arr.max())
    if symmetric:
        m = max(abs(lo), abs(hi)) or 1.0
        vmin, vmax = -m, m
    return Panel(f"{title}\n[{lo:.3g}, {hi:.3g}]", arr, cmap, vmin, vmax, list(marks or []))


def _render(rows: Sequence[Sequence[Panel]], aspect: float, path: Path,
            legend: Sequence[tuple[str, tuple[int, int, int]]] = ()) -> Path:
    """Panels in rows (left-aligned) on a fixed grid: every panel PANEL_IN high, PANEL_IN × aspect wide,
    maps stretched over the image's box so all panels line up with the picture. PNG of exactly
    (cols · PANEL_IN · aspect) × (rows · (PANEL_IN + TITLE_IN) + legend) inches at DPI."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    from kdcompress.engine.checkpoint import atomic_write

    cols = max(len(r) for r in rows)
    pw = PANEL_IN * aspect
    legend_rows = math.ceil(len(legend) / LEGEND_PER_ROW) if legend else 0
    legend_h = legend_rows * LEGEND_ROW_IN + (0.08 if legend_rows else 0.0)
    width = cols * pw
    height = len(rows) * (PANEL_IN + TITLE_IN) + legend_h
    fig = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(fig)
    for r, row in enumerate(rows):
        top = height - r * (PANEL_IN + TITLE_IN) - TITLE_IN
        for c, p in enumerate(row):
            ax = fig.add_axes((c * pw / width + 0.01 / width, (top - PANEL_IN) / height,
                               (pw - 0.02) / width, PANEL_IN / height))
            kw: dict[str, Any] = {"interpolation": "nearest", "aspect": "auto"}
            if p.data.ndim == 2:
                kw.update(cmap=p.cmap or "magma", vmin=p.vmin, vmax=p.vmax)
            ax.imshow(p.data, **kw)
            for y, x in p.marks:
                ax.plot([x], [y], marker="+", color="red", markersize=9, markeredgewidth=1.5)
            ax.set_xlim(-0.5, p.data.shape[1] - 0.5)
            ax.set_ylim(p.data.shape[0] - 0.5, -0.5)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(p.title, fontsize=7, pad=2, linespacing=1.1)
    if legend:
        handles = [Patch(facecolor=np.asarray(rgb) / 255.0, edgecolor="black", linewidth=0.3) for _, rgb in legend]
        fig.legend(handles, [n for n, _ in legend], loc="lower center", ncol=LEGEND_PER_ROW, frameon=False,
                   fontsize=7, bbox_to_anchor=(0.5, 0.0), handlelength=1.0, columnspacing=0.8,
                   borderaxespad=0.1)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=DPI, metadata=PNG_METADATA))
    return path


def _legend(info: Any, lut: np.ndarray) -> list[tuple[str, tuple[int, int, int]]]:
    items = [(n, tuple(int(v) for v in lut[i])) for i, n in enumerate(info.class_names)]
    return items + [("ignore", IGNORE_RGB)]


def _out_dir(out: str | Path | None, default: Path) -> Path:
    path = Path(out) if out is not None else default
    if path.exists() and not path.is_dir():
        raise KdError(f"--out '{path}' is a file, not a folder. Choose a folder path.")
    return path


# ----------------------------------------------------------------------------- (a) predictions


def _segmentation_only(meta: Mapping[str, Any], source: Any) -> None:
    """The figures draw label maps; a detector's boxes are not drawn yet (one line, not a deep TypeError)."""
    if meta.get("task", "segmentation") != "segmentation":
        raise KdError(f"'{source}' is a {meta.get('task')} checkpoint; figures are drawn for segmentation "
                      f"checkpoints only (boxes are not drawn yet).")


def predictions_figures(models: Mapping[str, str | Path] | Sequence[str], out_dir: str | Path | None = None,
                        images: int = 4, *, grid: bool = False, data: str | None = None,
                        data_root: str | Path | None = None, split: str = "val",
                        device: str = "cpu") -> list[Path]:
    """Image | ground truth | each model's prediction for the first ``images`` images of ``split``.

    ``models``: {label: checkpoint or run folder} (columns in that order) or ``LABEL=PATH`` strings.
    Writes ``predictions_000.png``… (``predictions_grid.png`` with ``grid``) in ``out_dir``
    (default: ``figures/`` of the last model's run folder) and returns the paths."""
    from kdcompress.engine.checkpoint import load_model
    from kdcompress.engine.distributed import resolve_device

    _check_images(images)
    specs = parse_model_specs(models) if not isinstance(models, Mapping) else \
        {str(k): checkpoint_file(v) for k, v in models.items()}
    if not specs:
        raise ConfigError("Pass at least one --model LABEL=CHECKPOINT, e.g. --model teacher=runs/t/model.pt.")
    out = _out_dir(out_dir, list(specs.values())[-1].parent / FIGURES_DIR)
    dev = resolve_device(device)
    loaded = {label: load_model(path, dev) for label, path in specs.items()}
    first_label, (_, meta0) = next(iter(loaded.items()))
    _segmentation_only(meta0, specs[first_label])
    for label, (_, meta) in loaded.items():
        if int(meta["num_classes"]) != int(meta0["num_classes"]) or meta.get("dataset") != meta0.get("dataset"):
            raise KdError(f"Checkpoints '{specs[first_label]}' and '{specs[label]}' were trained on different data "
                          f"({meta0.get('dataset')}/{meta0['num_classes']} vs {meta.get('dataset')}/"
                          f"{meta['num_classes']} classes). Compare models of one dataset.")
    ds = _val_dataset(meta0, str(specs[first_label]), data, data_root, split)
    lut = _palette(ds.info)
    n = min(images, len(ds))
    rows: list[list[Panel]] = []
    aspect = 1.0
    for i in range(n):
        rgb, label = ds[i]
        if i == 0:
            aspect = rgb.shape[2] / rgb.shape[1]
        row = [Panel(f"image {i}", _rgb_image(rgb)), Panel("ground truth", colorize(label, lut))]
        for name, (model, meta) in loaded.items():
            row.append(Panel(name, colorize(_predict(model, rgb, meta, dev), lut)))
        rows.append(row)
    legend = _legend(ds.info, lut)
    if grid:
        return [_render(rows, aspect, out / "predictions_grid.png", legend)]
    paths = []
    for i, row in enumerate(rows):
        rgb = row[0].data
        paths.append(_render([row], rgb.shape[1] / rgb.shape[0], out / f"predictions_{i:03d}.png", legend))
    return paths


# ----------------------------------------------------------------------------- (b) what the method sees


@dataclass
class MethodRun:
    """A distilled run rebuilt for inspection: student, teacher and the trained method, in eval mode."""

    run: Path
    method_name: str
    method: nn.Module
    student: nn.Module
    teacher: nn.Module
    student_meta: dict[str, Any]
    teacher_meta: dict[str, Any]
    taps: tuple[str, ...]
    device: torch.device


def load_method_run(run: str | Path, teacher: str | Path | None = None, device: str = "cpu") -> MethodRun:
    """Rebuild the run's method as the trainer does and load its weights from state.pt's ``method.*`` keys."""
    import yaml

    from kdcompress.config import recipe_from_dict
    from kdcompress.engine.checkpoint import load_model, load_state
    from kdcompress.engine.distributed import resolve_device
    from kdcompress.methods import build_method
    from kdcompress.taps import tap_shapes

    run = Path(run)
    if run.is_file() and run.name in ("model.pt", "state.pt", "config.yaml"):
        run = run.parent
    if not run.is_dir():
        raise KdError(f"Run folder '{run}' does not exist. Pass the --out folder of a `kdcompress distill` run "
                      f"(it holds model.pt, state.pt and config.yaml).")
    cfg_path, model_path, state_path = run / "config.yaml", run / "model.pt", run / "state.pt"
    if not model_path.is_file():
        raise CheckpointError(f"Checkpoint '{model_path}' does not exist. Pass the --out folder of a "
                              f"`kdcompress distill` run.")
    if not cfg_path.is_file():
        raise KdError(f"'{cfg_path}' is missing: it records the method, taps, hparams and teacher of the run. "
                      f"Pass the complete --out folder of a `kdcompress distill` run.")
    try:
        cfg = yaml.safe_load(cfg_path.read_text()) or {}
        resolved = cfg.pop("resolved", {}) or {}
        recipe = recipe_from_dict(cfg)
    except (yaml.YAMLError, OSError, TypeError, AttributeError) as e:
        raise KdError(f"'{cfg_path}' cannot be read ({type(e).__name__}). Re-create the run with "
                      f"`kdcompress distill`.") from None
    method_name = recipe.distill.method if resolved.get("role", "student") == "student" else "none"
    fix = ("Pass the folder of a run distilled with --method attnfd, acam or cankd "
           "(`kdcompress distill --teacher T --method attnfd --out DIR`).")
    if not state_path.is_file():
        raise KdError(f"'{state_path}' is missing: the distillation method's trained modules are saved only there. "
                      f"Re-run the distillation into '{run}' (it writes state.pt beside model.pt), or pass a run "
                      f"folder that still has it.")
    state = load_state(state_path)
    task = state.get("task") or {}
    method_state = {k[len("method."):]: v for k, v in task.items() if k.startswith("method.")}
    if method_name == "none":
        raise KdError(f"'{state_path}' holds no distillation-method state: the run was trained with method 'none' "
                      f"(no teacher, nothing to show). {fix}")
    t_path = Path(teacher) if teacher is not None else (Path(recipe.distill.teacher_checkpoint)
                                                         if recipe.distill.teacher_checkpoint else None)
    if t_path is None:
        raise KdError(f"'{cfg_path}' records no teacher checkpoint (distill.teacher_checkpoint). Pass --teacher PATH.")
    if t_path.is_dir():
        t_path = t_path / "model.pt"
    if not t_path.is_file():
        where = "given with --teacher" if teacher is not None else f"recorded in '{cfg_path}'"
        raise CheckpointError(f"Teacher checkpoint '{t_path}' ({where}) does not exist. Pass the teacher the run was "
                              f"distilled from with --teacher PATH.")
    dev = resolve_device(device)
    student, s_meta = load_model(model_path, dev)
    teacher_model, t_meta = load_model(t_path, dev)
    if int(t_meta["num_classes"]) != int(s_meta["num_classes"]):
        raise KdError(f"Teacher '{t_path}' predicts {t_meta['num_classes']} classes, the student "
                      f"{s_meta['num_classes']}. Pass the teacher the run was distilled from with --teacher.")
    crop = tuple(recipe.data.crop_size)
    s_shapes = tap_shapes(student, crop, batch=1)
    t_shapes = tap_shapes(teacher_model, crop, batch=1)
    method = build_method(method_name, s_shapes, t_shapes, int(s_meta["num_classes"]),
                          taps=recipe.distill.taps or None, student_name=s_meta["arch"],
                          teacher_name=t_meta.get("arch", "teacher"), **(recipe.distill.hparams or {})).to(dev)
    expected = method.state_dict()
    if expected and not method_state:
        raise KdError(f"'{state_path}' holds no state of the '{method_name}' method (no 'method.*' keys), so its "
                      f"trained modules cannot be shown. Re-run the distillation into '{run}' with this version of "
                      f"kdcompress, or {fix[0].lower() + fix[1:]}")
    missing = sorted(set(expected) - set(method_state))
    unexpected = sorted(set(method_state) - set(expected))
    bad_shape = [k for k in expected if k in method_state and method_state[k].shape != expected[k].shape]
    if missing or unexpected or bad_shape:
        key = (missing or unexpected or bad_shape)[0]
        raise KdError(f"'{state_path}' does not fit the '{method_name}' method rebuilt from '{cfg_path}' "
                      f"({len(missing)} missing, {len(unexpected)} unexpected, {len(bad_shape)} mis-shaped keys, "
                      f"e.g. 'method.{key}'): wrong --teacher or an edited config.yaml. Pass the teacher the run "
                      f"was distilled from.")
    method.load_state_dict(method_state, strict=True)
    method.eval()
    for p in method.parameters():
        p.requires_grad_(False)
    return MethodRun(run, method_name, method, student, teacher_model, s_meta, t_meta, tuple(method.taps), dev)


@torch.no_grad()
def tap_features(mr: MethodRun, rgb: Tensor) -> tuple[dict[str, Tensor], dict[str, Tensor], np.ndarray, np.ndarray]:
    """Student and teacher maps at the method's taps for one RGB image (3×H×W in [0, 1]), and both
    models' predictions."""
    from kdcompress.taps import record

    out = []
    for model, meta in ((mr.student, mr.student_meta), (mr.teacher, mr.teacher_meta)):
        with record(model, mr.taps) as feats:
            logits = model(_normalise(rgb, meta).to(mr.device)).float()
            out.append(({k: v.detach().float() for k, v in feats.items()}, logits.argmax(1)[0].cpu().numpy()))
    (s_feats, s_pred), (t_feats, t_pred) = out
    return s_feats, t_feats, s_pred, t_pred


def feature_energy(feat: Tensor) -> np.ndarray:
    """Mean of squares over channels of a 1×C×H×W map -> H×W."""
    return feat[0].float().pow(2).mean(dim=0).cpu().numpy()


@torch.no_grad()
def _capture(method: nn.Module, s_feats: Mapping[str, Tensor], t_feats: Mapping[str, Tensor],
             modules: Mapping[str, nn.Module]) -> dict[str, Any]:
    """Run the method's own forward (the loss code path) and keep the outputs of ``modules``."""
    got: dict[str, Any] = {}
    handles = []
    for key, mod in modules.items():
        def hook(_m: nn.Module, _i: object, output: Any, _key: str = key) -> None:
            got[_key] = output
        handles.append(mod.register_forward_hook(hook))
    try:
        method(dict(s_feats), dict(t_feats))
    finally:
        for h in handles:
            h.remove()
    return got


def _check_method(method: nn.Module, name: str) -> None:
    if getattr(method, "name", None) != name:
        raise KdError(f"This view needs a '{name}' method, got '{getattr(method, 'name', type(method).__name__)}'.")


def _check_tap(method: nn.Module, tap: str | None) -> str:
    taps = list(method.taps)
    if tap is None:
        return taps[0]
    if tap not in taps:
        raise ConfigError(f"--tap '{tap}' is not distilled by this run; its taps: {', '.join(taps)}.")
    return tap


def attnfd_gates(method: nn.Module, s_feats: Mapping[str, Tensor],
                 t_feats: Mapping[str, Tensor]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{tap: (teacher spatial gate, student spatial gate)}, each H×W in [0, 1] at its own map's size."""
    _check_method(method, "attnfd")
    off = [flag for flag in ("teacher_cbam", "student_cbam") if not method.hparams[flag]]
    if off:
        raise ConfigError(f"this AttnFD run was trained with {', '.join(f'method.{f}=0' for f in off)}: "
                          f"its loss uses no such gate, so there is none to draw.")
    mods: dict[str, nn.Module] = {}
    for tap in method.taps:
        mods[f"t/{tap}"] = method.teacher_cbam[tap].spatial
        mods[f"s/{tap}"] = method.student_cbam[tap].spatial
    got = _capture(method, s_feats, t_feats, mods)
    return {tap: (got[f"t/{tap}"][0, 0].cpu().numpy(), got[f"s/{tap}"][0, 0].cpu().numpy()) for tap in method.taps}


def acam_masks(method: nn.Module, s_feats: Mapping[str, Tensor], t_feats: Mapping[str, Tensor],
               tap: str | None = None) -> np.ndarray:
    """The M spatial masks of ``tap`` (default: the first), M×H×W in [0, 1] at the teacher map's size."""
    _check_method(method, "acam")
    tap = _check_tap(method, tap)
    got = _capture(method, s_feats, t_feats, {"masks": method.masks[tap]})
    spatial = got["masks"][0]  # B×M×HW
    h, w = t_feats[tap].shape[-2:]
    return spatial[0].reshape(-1, h, w).cpu().numpy()


def cankd_affinity(method: nn.Module, s_feats: Mapping[str, Tensor], t_feats: Mapping[str, Tensor],
                   tap: str | None = None, position: tuple[int, int] | None = None) -> tuple[np.ndarray, tuple[int, int]]:
    """θ(y_s)[p] · φ(y_t)ᵀ / N over the pooled teacher positions, reshaped to the pooled grid, for the
    student position ``p = (y, x)`` of the tap map (teacher resolution; default its centre).
    Returns (Nh×Nw affinity, the position used)."""
    _check_method(method, "cankd")
    tap = _check_tap(method, tap)
    if tap not in method.can:
        raise ConfigError("this CanKD run was trained with method.block=0: it has no Can block, so no affinity to draw.")
    block = method.can[tap]
    got = _capture(method, s_feats, t_feats, {"theta": block.theta, "phi": block.phi})
    theta, phi = got["theta"].float(), got["phi"].float()  # 1×C'×H×W, θ at the teacher's size
    h, w = theta.shape[-2:]
    y, x = position if position is not None else (h // 2, w // 2)
    if not (0 <= y < h and 0 <= x < w):
        raise ConfigError(f"--position {y},{x} is outside the {h}x{w} '{tap}' map; use 0 <= y < {h} and "
                          f"0 <= x < {w} (default: the centre).")
    keys = block.pool(phi)[0]  # C'×Nh×Nw
    n = keys.shape[1] * keys.shape[2]
    aff = torch.einsum("c,cij->ij", theta[0, :, y, x], keys) / n
    return aff.cpu().numpy(), (y, x)


def _method_rows(mr: MethodRun, rgb: Tensor, label: Tensor, lut: np.ndarray, index: int, tap: str | None,
                 position: tuple[int, int] | None) -> list[list[Panel]]:
    s_feats, t_feats, s_pred, t_pred = tap_features(mr, rgb)
    m = mr.method
    img_h, img_w = rgb.shape[1:]
    image = Panel(f"image {index}", _rgb_image(rgb))
    rows: list[list[Panel]] = [[image, Panel("ground truth", colorize(label, lut)),
                                Panel(f"teacher {mr.teacher_meta['arch']}", colorize(t_pred, lut)),
                                Panel(f"student {mr.student_meta['arch']}", colorize(s_pred, lut))]]
    energy: list[Panel] = []
    for t in mr.taps:
        energy.append(_scalar_panel(f"T energy {t}", feature_energy(t_feats[t])))
        energy.append(_scalar_panel(f"S energy {t}", feature_energy(s_feats[t])))
    rows.append(energy)
    if mr.method_name == "attnfd":
        gates = attnfd_gates(m, s_feats, t_feats)
        rows.append([p for t, (tg, sg) in gates.items() for p in (
            _scalar_panel(f"T gate {t}", tg, "viridis"), _scalar_panel(f"S gate {t}", sg, "viridis"))])
    elif mr.method_name == "acam":
        chosen = _check_tap(m, tap)
        masks = acam_masks(m, s_feats, t_feats, chosen)
        panels = [_scalar_panel(f"mask {j} ({chosen})", mk, "viridis") for j, mk in enumerate(masks)]
        width = max(6, max(len(r) for r in rows))
        rows += [panels[k:k + width] for k in range(0, len(panels), width)]
    elif mr.method_name == "cankd":
        chosen = _check_tap(m, tap)
        aff, (y, x) = cankd_affinity(m, s_feats, t_feats, chosen, position)
        h, w = t_feats[chosen].shape[-2:]
        nh, nw = aff.shape
        image.marks.append(((y + 0.5) * img_h / h - 0.5, (x + 0.5) * img_w / w - 0.5))
        for p in energy:
            if p.title.startswith(f"T energy {chosen}\n"):
                p.marks.append((y, x))
        # pooled cell j covers rows 2j, 2j+1 (ceil mode): row y's centre sits at (y + 0.5) / 2 - 0.5
        rows.append([_scalar_panel(f"affinity ({y},{x}) {chosen}, {nh}x{nw}", aff, "RdBu_r", symmetric=True,
                                   marks=[((y + 0.5) / 2 - 0.5, (x + 0.5) / 2 - 0.5)])])
    return rows


def method_figures(run: str | Path, out_dir: str | Path | None = None, images: int = 4, *,
                   position: tuple[int, int] | str | None = None, tap: str | None = None,
                   teacher: str | Path | None = None, data_root: str | Path | None = None, split: str = "val",
                   device: str = "cpu") -> list[Path]:
    """What the run's distillation method sees on the first ``images`` images of ``split``:
    ``method_<name>_000.png``… in ``out_dir`` (default: the run folder's ``figures/``)."""
    _check_images(images)
    if isinstance(position, str):
        position = parse_position(position)
    mr = load_method_run(run, teacher=teacher, device=device)
    _segmentation_only(mr.student_meta, run)
    if tap is not None:
        _check_tap(mr.method, tap)
    out = _out_dir(out_dir, mr.run / FIGURES_DIR)
    ds = _val_dataset(mr.student_meta, str(mr.run / "model.pt"), None, data_root, split)
    lut = _palette(ds.info)
    legend = _legend(ds.info, lut)
    n = min(images, len(ds))
    prepared = []
    for i in range(n):  # every figure's maps first: a bad --position fails before any file is written
        rgb, label = ds[i]
        prepared.append((rgb, _method_rows(mr, rgb, label, lut, i, tap, position)))
    paths = []
    for i, (rgb, rows) in enumerate(prepared):
        paths.append(_render(rows, rgb.shape[2] / rgb.shape[1], out / f"method_{mr.method_name}_{i:03d}.png", legend))
    return paths


__all__ = [
    "MethodRun", "acam_masks", "attnfd_gates", "cankd_affinity", "checkpoint_file", "colorize", "feature_energy",
    "load_method_run", "method_figures", "parse_model_specs", "parse_position", "predictions_figures", "tap_features",
]
