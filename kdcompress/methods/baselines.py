"""Baselines for the comparison tables: no distillation, logit KD and FitNet-style MSE.

Several taps (rarely used for these) add their terms, like the level-wise sums of CanKD and
ACAM-KD.
"""

from __future__ import annotations

from typing import ClassVar, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdcompress.errors import ConfigError, KdError
from kdcompress.methods.base import (
    DistillMethod,
    Shapes,
    at_least_fp32,
    conv1x1,
    resize_to,
)


class NoDistill(DistillMethod):
    """The student on the task loss alone: no taps, no terms, no teacher forward."""

    name: ClassVar[str] = "none"
    default_taps: ClassVar[tuple[str, ...]] = ()
    default_hparams: ClassVar[dict[str, float]] = {}
    needs_teacher: ClassVar[bool] = False

    def forward(  # type: ignore[override]
        self, student_feats: Mapping[str, Tensor], teacher_feats: Mapping[str, Tensor]
    ) -> dict[str, Tensor]:
        return {}

    def loss_weights(self) -> dict[str, float]:
        return {}


def pixel_kl(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """Mean over B·H·W pixels of KL(softmax(t/T) ‖ softmax(s/T)) summed over classes (fp32)."""
    log_s = F.log_softmax(at_least_fp32(student_logits) / temperature, dim=1)
    log_t = F.log_softmax(at_least_fp32(teacher_logits) / temperature, dim=1)
    return (log_t.exp() * (log_t - log_s)).sum(dim=1).mean()


class LogitKD(DistillMethod):
    """Pixel-wise KD (CIRKD style): term ``kd`` weighted by weight·T² (T = 1 for segmentation)."""

    name: ClassVar[str] = "kd"
    default_taps: ClassVar[tuple[str, ...]] = ("logits",)
    default_hparams: ClassVar[dict[str, float]] = {"weight": 1.0, "T": 1.0}
    reads: ClassVar[str] = "logits"

    def __init__(
        self,
        student_shapes: Shapes,
        teacher_shapes: Shapes,
        taps: Sequence[str],
        num_classes: int,
        **hparams: float,
    ) -> None:
        super().__init__(student_shapes, teacher_shapes, taps, num_classes, **hparams)
        if self.hparams["T"] <= 0:
            raise ConfigError("hparam 'T' of method 'kd' must be > 0")
        for tap in self.taps:
            c_s, c_t = self.student_shapes[tap][1], self.teacher_shapes[tap][1]
            if c_s != c_t:
                raise KdError(
                    f"Method 'kd' compares class distributions, but tap '{tap}' has {c_s} student "
                    f"and {c_t} teacher channels; use a logits tap of the same label set"
                )

    def forward(  # type: ignore[override]
        self, student_feats: Mapping[str, Tensor], teacher_feats: Mapping[str, Tensor]
    ) -> dict[str, Tensor]:
        t = self.hparams["T"]
        terms = []
        for tap in self.taps:
            teacher = self._teacher(teacher_feats, tap)
            terms.append(pixel_kl(resize_to(student_feats[tap], teacher), teacher, t))
        return {"kd": torch.stack(terms).sum()}

    def loss_weights(self) -> dict[str, float]:
        return {"kd": self.hparams["weight"] * self.hparams["T"] ** 2}


class FeatureMSE(DistillMethod):
    """FitNet / LAD style: 1×1 conv adapter (identity at equal widths) + MSE on raw taps."""

    name: ClassVar[str] = "mse"
    default_taps: ClassVar[tuple[str, ...]] = ("backbone",)
    default_hparams: ClassVar[dict[str, float]] = {"weight": 1.0}

    def __init__(
        self,
        student_shapes: Shapes,
        teacher_shapes: Shapes,
        taps: Sequence[str],
        num_classes: int,
        **hparams: float,
    ) -> None:
        super().__init__(student_shapes, teacher_shapes, taps, num_classes, **hparams)
        self.adapter = nn.ModuleDict()
        for tap in self.taps:
            c_s, c_t = self.student_shapes[tap][1], self.teacher_shapes[tap][1]
            self.adapter[tap] = conv1x1(c_s, c_t, bias=True) if c_s != c_t else nn.Identity()

    def forward(  # type: ignore[override]
        self, student_feats: Mapping[str, Tensor], teacher_feats: Mapping[str, Tensor]
    ) -> dict[str, Tensor]:
        terms = []
        for tap in self.taps:
            teacher = self._teacher(teacher_feats, tap)
            student = resize_to(self.adapter[tap](student_feats[tap]), teacher)
            terms.append(F.mse_loss(at_least_fp32(student), at_least_fp32(teacher)))
        return {"mse": torch.stack(terms).sum()}

    def loss_weights(self) -> dict[str, float]:
        return {"mse": self.hparams["weight"]}
