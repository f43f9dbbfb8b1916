"""Distillation methods, by name: ``build_method("acam", student_shapes, teacher_shapes, 19)``.

Adding a method: one file in this package and one ``METHODS.add`` line below.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch

from kdcompress.errors import KdError
from kdcompress.methods.acam import ACAMKD
from kdcompress.methods.attnfd import AttnFD
from kdcompress.methods.base import DistillMethod
from kdcompress.methods.baselines import FeatureMSE, LogitKD, NoDistill
from kdcompress.methods.cankd import CanKD
from kdcompress.registry import Registry
from kdcompress.taps import check_taps

METHODS: Registry[type[DistillMethod]] = Registry("method")
METHODS.add("attnfd", AttnFD)
METHODS.add("acam", ACAMKD)
METHODS.add("cankd", CanKD)
METHODS.add("kd", LogitKD)
METHODS.add("mse", FeatureMSE)
METHODS.add("none", NoDistill)


def _check_taps(
    method: str,
    taps: Sequence[str],
    defaulted: bool,
    sides: Sequence[tuple[str, str, Mapping[str, torch.Size]]],
) -> None:
    """Every tap on both sides, through the one tap check (``kdcompress.taps.check_taps``)."""
    for role, model, shapes in sides:
        who = f"model '{model}' ({role})" if model != role else f"the {role} model"
        check_taps(taps, list(shapes), who, needed_by=method if defaulted else None)


def build_method(
    name: str,
    student_shapes: Mapping[str, torch.Size],
    teacher_shapes: Mapping[str, torch.Size],
    num_classes: int,
    taps: Sequence[str] | None = None,
    *,
    student_name: str = "student",
    teacher_name: str = "teacher",
    **hparams: float,
) -> DistillMethod:
    """Validate name, taps and hparams, then build the method with adapters sized from shapes.

    ``*_shapes`` come from a dry run of each model at the training crop size ({tap: B×C×H×W});
    ``taps=None`` uses the method's defaults. ``student_name``/``teacher_name`` only make the
    error messages name the models.
    """
    cls = METHODS.get(name)
    defaulted = taps is None
    resolved = tuple(cls.default_taps if taps is None else taps)
    if not cls.default_taps and resolved:
        raise KdError(f"method '{name}' uses no taps, got: {', '.join(resolved)}")
    if cls.default_taps and not resolved:
        default = ", ".join(cls.default_taps)
        raise KdError(f"method '{name}' needs at least one tap (default: {default})")
    _check_taps(
        name,
        resolved,
        defaulted,
        [("student", student_name, student_shapes), ("teacher", teacher_name, teacher_shapes)],
    )
    return cls(student_shapes, teacher_shapes, resolved, num_classes, **hparams)


__all__ = [
    "ACAMKD",
    "AttnFD",
    "CanKD",
    "DistillMethod",
    "FeatureMSE",
    "LogitKD",
    "METHODS",
    "NoDistill",
    "build_method",
]
