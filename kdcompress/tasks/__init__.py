"""The task seam: everything that differs between segmentation and (later) detection lives here.

A :class:`Task` owns the task loss, the collate, the metric accumulation, how an exported model's
outputs are compared with PyTorch's (with per-precision tolerances), the export I/O names and the
columns the report shows. Trainer, evaluation, export, profiling and the pipeline call the task and
never name segmentation; distillation methods stay task-agnostic (they see tapped maps).

A new task is one module with a :class:`Task` subclass and one ``TASKS.add`` line below.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import asdict, fields, replace
from typing import Any, Callable, ClassVar, Sequence

import numpy as np
import torch

from kdcompress.errors import KdError
from kdcompress.registry import Registry


class Metric(ABC):
    """Accumulates predictions over a split; DDP ranks reduce before ``compute``."""

    @abstractmethod
    def update(self, outputs: torch.Tensor | np.ndarray, targets: Any) -> None:
        """Add one batch: the model's raw outputs and the collated targets."""

    def all_reduce(self) -> None:
        """Sum the accumulated state over DDP ranks (no-op outside DDP)."""

    @abstractmethod
    def compute(self) -> dict[str, Any]:
        """Flat metrics dict; holds the task's ``headline`` key."""


class Parity(ABC):
    """Accumulates how far an artifact's outputs are from PyTorch's, image batch by image batch."""

    @abstractmethod
    def update(self, ref: np.ndarray, out: np.ndarray) -> None:
        """Compare one batch of reference and artifact outputs."""

    @abstractmethod
    def report(self) -> dict[str, Any]:
        """Aggregated numbers (worst error, agreement, ...), JSON-serialisable."""

    @staticmethod
    @abstractmethod
    def summary(report: dict[str, Any]) -> str:
        """A report in one line, for the CLI and the pipeline report."""

    @abstractmethod
    def failures(self, report: dict[str, Any], tolerances: Any) -> list[str]:
        """One ``"<metric> <value> <op> limit <limit>"`` string per limit the report misses."""


class Task(ABC):
    """One kind of task (segmentation, detection) for one dataset's label space."""

    name: ClassVar[str]
    headline: ClassVar[str]  # the metric gates, reports and drop checks read ("mIoU")
    report_columns: ClassVar[tuple[tuple[str, str], ...]]  # (metrics key, column header) of the report table
    input_names: ClassVar[tuple[str, ...]] = ("input",)
    output_names: ClassVar[tuple[str, ...]]
    tolerances: ClassVar[dict[str, Any]]  # precision -> the task's frozen Tolerances dataclass
    parity_cls: ClassVar[type[Parity]]  # how its artifacts are compared with PyTorch
    dynamic_shapes: ClassVar[bool] = True  # whether its exported graphs may have dynamic batch / spatial axes
    int8_op_types: ClassVar[tuple[str, ...] | None] = None  # ops ORT INT8 quantises (None: ORT's default set)

    @abstractmethod
    def loss(self, outputs: Any, targets: Any) -> torch.Tensor:
        """The task loss the student and teacher are trained with."""

    def training_loss(self, model: Any, images: Any, targets: Any) -> torch.Tensor:
        """The task loss of one training batch (a detector computes its losses itself, given targets)."""
        return self.loss(model(images), targets)

    def features(self, model: Any, images: Any) -> Any:
        """The forward a teacher runs for distillation (hooks record its taps); all of it by default."""
        return model(images)

    def predict(self, model: Any, images: Any) -> Any:
        """Outputs the metric reads, from an eager model in eval mode."""
        return model(images).float()

    def train_transform(self, data: Any) -> Any:
        """The training-split transform of a recipe's ``data`` section."""
        from kdcompress.data import train_transform

        return train_transform(tuple(data.crop_size), tuple(data.scale_range), data.flip)

    def val_transform(self, data: Any = None, mean: Sequence[float] | None = None,
                      std: Sequence[float] | None = None) -> Any:
        """The evaluation transform (native size for segmentation), with the checkpoint's normalisation."""
        from kdcompress.data import IMAGENET_MEAN, IMAGENET_STD, val_transform

        return val_transform(tuple(mean or IMAGENET_MEAN), tuple(std or IMAGENET_STD))

    def checkpoint_transform(self, meta: dict[str, Any]) -> Any:
        """The evaluation transform a checkpoint was validated with (its normalisation, its resize)."""
        return self.val_transform(None, meta.get("mean"), meta.get("std"))

    def export_size(self, data: Any) -> tuple[int, int]:
        """The default export input (H, W) when the dataset fixes no image size: the training crop."""
        return int(data.crop_size[0]), int(data.crop_size[1])

    @abstractmethod
    def collate(self, batch: Sequence[Any]) -> tuple[torch.Tensor, Any]:
        """(image, target) samples -> (image batch, targets)."""

    def targets_to(self, targets: Any, device: torch.device | str) -> Any:
        return targets.to(device, non_blocking=True)

    @abstractmethod
    def metric(self, dataset: Any = None, device: torch.device | str = "cpu") -> Metric:
        """A fresh accumulator for this task's metrics over ``dataset`` (detection reads its ground truth)."""

    @abstractmethod
    def check_outputs(self, outputs: torch.Tensor | np.ndarray) -> None:
        """KdError when a model's outputs do not fit this dataset (e.g. another class count)."""

    def parity(self) -> Parity:
        """A fresh artifact-vs-PyTorch comparison."""
        return self.parity_cls()

    @abstractmethod
    def resize(self, sample: tuple[torch.Tensor, Any], size: tuple[int, int]) -> tuple[torch.Tensor, Any]:
        """A sample at a static export size, its targets moved with the image."""

    @abstractmethod
    def io_spec(self, input_size: tuple[int, int], dynamic_batch: bool, dynamic_spatial: bool) -> dict[str, Any]:
        """Names, shapes (symbolic where dynamic), dtypes and meaning of the exported graph's I/O."""

    def tolerance(self, precision: str, overrides: Any = None) -> Any:
        """The defaults for ``precision``; a dict replaces fields, a Tolerances object is used as is."""
        if precision not in self.tolerances:
            raise KdError(f"Unknown precision '{precision}'. Available: {', '.join(self.tolerances)}")
        base = self.tolerances[precision]
        if overrides is None:
            return base
        if isinstance(overrides, type(base)):
            return overrides
        if not isinstance(overrides, dict):
            raise KdError(f"tolerances must be a {type(base).__name__} or a dict, got {type(overrides).__name__}.")
        known = [f.name for f in fields(base)]
        if "max_drop" in overrides:  # the CLI's --max-drop: the drop of whatever the task's headline is
            overrides = {k: v for k, v in overrides.items() if k != "max_drop"} | \
                {f"max_{self.headline.lower()}_drop": overrides["max_drop"]}
        unknown = sorted(set(overrides) - set(known))
        if unknown:
            raise KdError(f"Unknown tolerance '{unknown[0]}' for {self.name}. Available: {', '.join(known)}")
        return replace(base, **overrides)

    @staticmethod
    def tolerance_dict(tol: Any) -> dict[str, Any]:
        return asdict(tol)

    def metric_drop_limit(self, tol: Any) -> float | None:
        """The tolerance on ``headline(PyTorch) - headline(artifact)``."""
        return getattr(tol, f"max_{self.headline.lower()}_drop")


def input_dims(input_size: Sequence[int], dynamic_batch: bool,
               dynamic_spatial: bool) -> tuple[int | str, int | str, int | str, dict[str, str]]:
    """(batch, height, width, input dynamic axes) of an exported NCHW input: symbols where dynamic."""
    h, w = int(input_size[0]), int(input_size[1])
    axes: dict[str, str] = {"0": "batch"} if dynamic_batch else {}
    if dynamic_spatial:
        axes.update({"2": "height", "3": "width"})
    return ("batch" if dynamic_batch else 1, "height" if dynamic_spatial else h,
            "width" if dynamic_spatial else w, axes)


TASKS: Registry[Callable[..., Task]] = Registry("task")


def task_for(info: Any) -> Task:
    """The task object of a dataset (its ``DatasetInfo`` says which task and label space)."""
    return TASKS.get(getattr(info, "task", "segmentation"))(info)


def task_from_meta(meta: dict[str, Any]) -> Task:
    """The task of a checkpoint, from its metadata alone (checkpoints before tasks were segmentation)."""
    from types import SimpleNamespace

    k = int(meta["num_classes"])
    names = tuple(meta.get("class_names") or [str(i) for i in range(k)])
    info = SimpleNamespace(task=meta.get("task", "segmentation"), num_classes=k, class_names=names,
                           ignore_index=int(meta.get("ignore_index") or 255),
                           category_ids=tuple(meta.get("category_ids") or ()) or None)
    return task_for(info)


def _register() -> None:
    from kdcompress.tasks.detection import DetectionTask
    from kdcompress.tasks.segmentation import SegmentationTask

    TASKS.add("segmentation", SegmentationTask)
    TASKS.add("detection", DetectionTask)


_register()
