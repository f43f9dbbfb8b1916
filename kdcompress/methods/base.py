"""The distillation-method contract every plug-in implements.

A method is an ``nn.Module`` that owns its trainable side parts (adapters, attention blocks,
mask units) and turns tapped student/teacher feature maps into *named, unweighted* scalar loss
terms. The trainer multiplies each term by ``loss_weights()[name]`` and adds the task loss, so
logs show every term separately. Nothing a method owns is part of the exported student.
"""

from __future__ import annotations

import math
from typing import ClassVar, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdcompress.errors import ConfigError, KdError
from kdcompress.taps import check_taps

Shapes = Mapping[str, torch.Size]


class DistillMethod(nn.Module):
    """Base class: hparam validation, tap bookkeeping and shared helpers.

    Subclasses set the class variables, build their parts in ``__init__`` (after calling
    ``super().__init__``) and implement ``forward`` and ``loss_weights``.
    """

    name: ClassVar[str] = ""
    default_taps: ClassVar[tuple[str, ...]] = ()
    default_hparams: ClassVar[dict[str, float]] = {}
    needs_teacher: ClassVar[bool] = True
    #: "features": any B×C×H×W map (a detector's FPN levels stand in for the default taps);
    #: "logits": class scores per pixel, which detectors do not have
    reads: ClassVar[str] = "features"
    #: distillation-weight warm-up when the recipe sets none (fraction of the schedule or steps)
    default_warmup: ClassVar[float] = 0.0

    def __init__(
        self,
        student_shapes: Shapes,
        teacher_shapes: Shapes,
        taps: Sequence[str],
        num_classes: int,
        **hparams: float,
    ) -> None:
        super().__init__()
        self.hparams: dict[str, float] = self.resolve_hparams(hparams)
        self.taps: tuple[str, ...] = tuple(taps)
        self.num_classes = int(num_classes)
        if self.default_taps and not self.taps:
            raise KdError(f"Method '{self.name}' needs at least one tap")
        for side, shapes in (("student", student_shapes), ("teacher", teacher_shapes)):
            check_taps(self.taps, list(shapes), f"the {side} model", needed_by=self.name)
        for tap in self.taps:
            for side, shapes in (("student", student_shapes), ("teacher", teacher_shapes)):
                if len(shapes[tap]) != 4:
                    raise KdError(
                        f"Tap '{tap}' of the {side} model has shape {tuple(shapes[tap])}; "
                        f"method '{self.name}' needs B×C×H×W maps"
                    )
        self.student_shapes = {t: torch.Size(student_shapes[t]) for t in self.taps}
        self.teacher_shapes = {t: torch.Size(teacher_shapes[t]) for t in self.taps}

    @classmethod
    def resolve_hparams(cls, given: Mapping[str, object]) -> dict[str, float]:
        """Defaults overridden by ``given``; unknown names or non-numbers raise ConfigError."""
        unknown = sorted(set(given) - set(cls.default_hparams))
        if unknown:
            valid = ", ".join(sorted(cls.default_hparams)) or "(none)"
            raise ConfigError(
                f"Unknown hparam(s) {', '.join(repr(u) for u in unknown)} for method "
                f"'{cls.name}'. Valid: {valid}"
            )
        out = dict(cls.default_hparams)
        for key, value in given.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(
                    f"hparam '{key}' of method '{cls.name}' must be a number, got {value!r}"
                )
            if not math.isfinite(float(value)):
                raise ConfigError(f"hparam '{key}' of method '{cls.name}' must be finite")
            out[key] = float(value)
        return out

    def forward(  # type: ignore[override]
        self, student_feats: Mapping[str, Tensor], teacher_feats: Mapping[str, Tensor]
    ) -> dict[str, Tensor]:
        raise NotImplementedError

    def loss_weights(self) -> dict[str, float]:
        """Weight the trainer applies to each term returned by ``forward``."""
        raise NotImplementedError

    def trainable(self, step: int) -> tuple[bool, bool]:
        """(student trains, method's own parts train) at ``step``: a schedule such as AttnFD's
        two-phase one freezes one side for a while. Default: both, always."""
        return True, True

    def teacher_side_modules(self) -> list[nn.Module]:
        """Parts that act on the teacher side and must stay frozen (eval mode, no grads)."""
        return []

    def train(self, mode: bool = True) -> "DistillMethod":
        """Like ``nn.Module.train`` but frozen teacher-side parts always stay in eval mode."""
        super().train(mode)
        for module in self.teacher_side_modules():
            module.eval()
        return self

    def _teacher(self, teacher_feats: Mapping[str, Tensor], tap: str) -> Tensor:
        """The teacher map, detached: the teacher is a fixed target whatever the caller did."""
        return teacher_feats[tap].detach()


def resize_to(x: Tensor, like: Tensor) -> Tensor:
    """Bilinearly resize ``x`` to ``like``'s spatial size (no-op when they already match).

    Student and teacher may run at different output strides (8 vs 16); the spec resolves that
    by resizing the student map to the teacher's size.
    """
    if x.shape[-2:] == like.shape[-2:]:
        return x
    return F.interpolate(x, size=like.shape[-2:], mode="bilinear", align_corners=False)


def check_chunk_positions(hparams: Mapping[str, float], method: str) -> int:
    """The banded losses' threshold: a whole number of positions ≥ 0 (0 = never band)."""
    chunk = hparams["chunk_positions"]
    if chunk < 0 or chunk != int(chunk):
        raise ConfigError(f"hparam 'chunk_positions' of method '{method}' must be a whole number ≥ 0 "
                          f"(0 = one pass, no bands), got {chunk}")
    return int(chunk)


def at_least_fp32(x: Tensor) -> Tensor:
    """Upcast half/bfloat16 (autocast outputs) for reductions; leave fp32/fp64 as they are."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def conv1x1(c_in: int, c_out: int, bias: bool) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, kernel_size=1, bias=bias)


def inherit_from_teacher(
    student: nn.Module, teacher: nn.Module, prefixes: Sequence[str] = ("neck", "head")
) -> list[str]:
    """ACAM-KD's "inheritance" (§4.1, detection): copy teacher weights into the student.

    Every parameter and buffer under one of ``prefixes`` whose name and shape match on both
    sides is copied; the copied names are returned so the caller can log them.
    """
    teacher_state = teacher.state_dict()
    copied: list[str] = []
    with torch.no_grad():
        for name, tensor in student.state_dict().items():
            if not any(name == p or name.startswith(p + ".") for p in prefixes):
                continue
            source = teacher_state.get(name)
            if source is not None and source.shape == tensor.shape:
                tensor.copy_(source)
                copied.append(name)
    return copied
