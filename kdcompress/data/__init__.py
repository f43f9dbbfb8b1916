"""Segmentation datasets: a common base class, a name registry and a padding collate.

Every loader returns ``(image FloatTensor 3xHxW normalised, label LongTensor HxW)`` with class
indices in ``[0, num_classes)`` and ``255`` = ignore. Loaders validate their folder layout on
construction and label values lazily, so a wrong dataset fails with one DataError line that
names the file and the fix instead of a CUDA assert deep in the loss.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from kdcompress.data.transforms import (
    IGNORE_INDEX,
    IMAGENET_MEAN,
    IMAGENET_STD,
    TrainTransform,
    ValTransform,
    train_transform,
    val_transform,
)
from kdcompress.errors import ConfigError, DataError
from kdcompress.registry import Registry

PathLike = Union[str, Path]
Transform = Callable[[Image.Image, np.ndarray], tuple[torch.Tensor, torch.Tensor]]

__all__ = [
    "DATASETS", "DatasetInfo", "IMAGENET_MEAN", "IMAGENET_STD", "IGNORE_INDEX", "SegDataset",
    "TrainTransform", "ValTransform", "build_dataset", "dataset_info", "identity_lut",
    "register_dataset", "require_root", "seg_collate", "train_transform", "val_transform",
]


@dataclass(frozen=True)
class DatasetInfo:
    """What models, metrics and exporters need to know about a dataset, without reading it."""

    name: str
    num_classes: int
    class_names: tuple[str, ...]
    ignore_index: int = IGNORE_INDEX
    palette: tuple[tuple[int, int, int], ...] | None = None
    task: str = "segmentation"  # a name in kdcompress.tasks.TASKS
    image_size: tuple[int, int] | None = None  # (H, W) every image has, when the dataset fixes one
    # Detection: the dataset's own (COCO) category id of contiguous label i is category_ids[i - 1]; 0 = background.
    category_ids: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if len(self.class_names) != self.num_classes:
            raise ValueError(f"{self.name}: {len(self.class_names)} class names for {self.num_classes} classes")
        if not 0 < self.num_classes <= 255:
            raise ValueError(f"{self.name}: num_classes must be in 1..255 (255 is the ignore label)")
        if self.palette is not None and len(self.palette) < self.num_classes:
            raise ValueError(f"{self.name}: palette has {len(self.palette)} colours for {self.num_classes} classes")
        if self.category_ids is not None and len(self.category_ids) != self.num_classes - 1:
            raise ValueError(f"{self.name}: {len(self.category_ids)} category ids for {self.num_classes - 1} "
                             f"foreground classes (label 0 is background)")


DATASETS: Registry[Callable[..., "SegDataset"]] = Registry("dataset")
_INFOS: dict[str, Union[DatasetInfo, Callable[..., DatasetInfo]]] = {}


def register_dataset(name: str, info: Union[DatasetInfo, Callable[..., DatasetInfo]]):
    """Register a builder ``(root, split, transform, **options) -> SegDataset`` and its info.

    ``info`` is a DatasetInfo or a function of the builder's options, so ``dataset_info`` can
    answer without touching the disk.
    """

    def deco(fn: Callable[..., SegDataset]) -> Callable[..., SegDataset]:
        DATASETS.register(name)(fn)
        _INFOS[name] = info
        return fn

    return deco


def _check_options(name: str, builder: Callable[..., Any], options: dict[str, Any]) -> None:
    params = inspect.signature(builder).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    known = [p for p in params if p not in ("root", "split", "transform")]
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ConfigError(f"Unknown option(s) {', '.join(unknown)} for dataset '{name}'; "
                          f"valid options: {', '.join(known) or 'none'}")


def build_dataset(name: str, root: PathLike | None, split: str, transform: Transform | None = None,
                  **options: Any) -> "SegDataset":
    """Build a registered dataset; unknown names/options raise a KdError listing the choices."""
    builder = DATASETS.get(name)
    _check_options(name, builder, options)
    return builder(root, split, transform, **options)


def dataset_info(name: str, **options: Any) -> DatasetInfo:
    """Class count, names and palette of a dataset without reading any file."""
    builder = DATASETS.get(name)
    _check_options(name, builder, options)
    info = _INFOS[name]
    return info if isinstance(info, DatasetInfo) else info(**options)


def require_root(root: PathLike | None, dataset: str, layout: str) -> Path:
    """Return ``root`` as a Path or raise a DataError saying what is wrong and what is expected."""
    if root is None or str(root) == "":
        raise DataError(f"Dataset '{dataset}' needs a root folder; pass the folder that holds {layout}")
    path = Path(root).expanduser()
    if not path.exists():
        raise DataError(f"Dataset root '{path}' does not exist; point it at the folder that holds {layout}")
    if not path.is_dir():
        raise DataError(f"Dataset root '{path}' is a file, not a folder; point it at the folder that holds {layout}")
    if not any(path.iterdir()):
        raise DataError(f"Dataset root '{path}' is empty; download/extract '{dataset}' there so it holds {layout}")
    return path


def identity_lut(num_classes: int) -> np.ndarray:
    """Raw value -> class lookup (int16, 256 entries) accepting 0..num_classes-1 and 255; -1 = invalid."""
    lut = np.full(256, -1, dtype=np.int16)
    lut[:num_classes] = np.arange(num_classes)
    lut[IGNORE_INDEX] = IGNORE_INDEX
    return lut


def _open_image(path: Path) -> Image.Image:
    try:
        with Image.open(path) as im:
            im.load()
            return im
    except FileNotFoundError:
        raise DataError(f"File '{path}' is missing; restore it or remove its id from the split list") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise DataError(f"Cannot read '{path}' ({err}); the file is corrupt or not an image, re-create it") from None


class SegDataset(Dataset):
    """Lists of image/label files plus a raw->class lookup table; subclasses only find files.

    ``label_lut`` maps raw label-file values to classes (e.g. Cityscapes labelIds -> trainIds);
    entries of -1 mark raw values that must not occur, which is how bad labels are caught.
    """

    def __init__(self, info: DatasetInfo, image_paths: Sequence[Path], label_paths: Sequence[Path],
                 transform: Transform | None = None, label_lut: np.ndarray | None = None) -> None:
        if len(image_paths) != len(label_paths):
            raise ValueError("image_paths and label_paths must have the same length")
        self.info = info
        self.image_paths: list[Path] = [Path(p) for p in image_paths]
        self.label_paths: list[Path] = [Path(p) for p in label_paths]
        self.transform = transform
        self.label_lut = identity_lut(info.num_classes) if label_lut is None else np.asarray(label_lut, np.int16)
        if self.label_lut.shape != (256,):
            raise ValueError("label_lut must have 256 entries")

    def __len__(self) -> int:
        return len(self.image_paths)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.info.name!r}, {len(self)} images, {self.info.num_classes} classes)"

    def _raw_label(self, i: int) -> np.ndarray:
        path = self.label_paths[i]
        lab = np.asarray(_open_image(path))
        if lab.ndim != 2:
            raise DataError(f"Label '{path}' has {lab.shape[-1]} channels (colour-coded?); "
                            f"expected a single-channel PNG of class indices (palette or grayscale)")
        if lab.dtype != np.uint8:
            if lab.size and (lab.min() < 0 or lab.max() > 255):
                raise DataError(f"Label '{path}' has values outside 0..255; expected an 8-bit PNG of class indices")
            lab = lab.astype(np.uint8)
        return lab

    def _map_label(self, raw: np.ndarray, path: Path) -> np.ndarray:
        mapped = self.label_lut[raw]
        bad = mapped < 0
        if bad.any():
            values = np.unique(raw[bad])
            shown = ", ".join(str(v) for v in values[:10]) + (" ..." if len(values) > 10 else "")
            raise DataError(
                f"Label '{path}' has values [{shown}] that are not valid for dataset '{self.info.name}' "
                f"({self.info.num_classes} classes + 255 ignore); fix the label files or choose the matching "
                f"dataset/num_classes")
        return mapped.astype(np.uint8)

    def load_label(self, i: int) -> np.ndarray:
        """Class-index label (uint8 HxW, 255 = ignore), validated."""
        return self._map_label(self._raw_label(i), self.label_paths[i])

    def load_raw(self, i: int) -> tuple[Image.Image, np.ndarray]:
        """(PIL RGB image, uint8 class label HxW) before any transform, e.g. for calibration/visuals."""
        img = _open_image(self.image_paths[i])
        if img.mode != "RGB":
            img = img.convert("RGB")
        lab = self.load_label(i)
        if lab.shape != (img.height, img.width):
            raise DataError(f"Label '{self.label_paths[i]}' is {lab.shape[1]}x{lab.shape[0]} but image "
                            f"'{self.image_paths[i]}' is {img.width}x{img.height}; they must match")
        return img, lab

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        img, lab = self.load_raw(i)
        transform = self.transform if self.transform is not None else _DEFAULT_TRANSFORM
        return transform(img, lab)

    def check_labels(self, max_files: int | None = None) -> np.ndarray:
        """Scan label files (all, or ``max_files`` spread over the split); raise on bad values.

        Returns pixel counts per class with one extra last entry for ignore (255) pixels, which is
        also handy for class-balance checks.
        """
        n = len(self)
        idx = range(n) if max_files is None or max_files >= n else np.linspace(0, n - 1, max_files).astype(int)
        counts = np.zeros(self.info.num_classes + 1, dtype=np.int64)
        bad: list[str] = []
        for i in idx:
            try:
                lab = self.load_label(int(i))
            except DataError as err:
                bad.append(str(err))
                continue
            c = np.bincount(lab.ravel(), minlength=256)
            counts[:-1] += c[: self.info.num_classes]
            counts[-1] += c[IGNORE_INDEX]
        if bad:
            more = f" (and {len(bad) - 1} more bad label files)" if len(bad) > 1 else ""
            raise DataError(bad[0] + more)
        return counts


_DEFAULT_TRANSFORM = val_transform()


def seg_collate(batch: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack (image, label) pairs; differing sizes are padded bottom/right (image 0, label 255)."""
    if not batch:
        raise ValueError("seg_collate got an empty batch")
    images = [b[0] for b in batch]
    labels = [b[1] for b in batch]
    H = max(im.shape[-2] for im in images)
    W = max(im.shape[-1] for im in images)
    if any(im.shape[-2:] != (H, W) for im in images):
        images = [F.pad(im, (0, W - im.shape[-1], 0, H - im.shape[-2]), value=0.0) for im in images]
        labels = [F.pad(lb, (0, W - lb.shape[-1], 0, H - lb.shape[-2]), value=IGNORE_INDEX) for lb in labels]
    return torch.stack(images), torch.stack(labels)


# Loader modules register themselves; imported last because they use the names above.
from kdcompress.data import camvid, cityscapes, detection, digits, voc  # noqa: E402,F401
