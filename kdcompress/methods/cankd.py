"""CanKD: cross-attention non-local distillation (Sun & Ohyama).

A Can block lets every student position attend to all (2×2 max-pooled) teacher positions with
a plain dot-product affinity divided by the number of keys — no softmax. Because the affinity
is linear, (q kᵀ / N) v = q (kᵀ v) / N: we form the C'×C' matrix kᵀv per sample instead of
the HW×N affinity the authors materialise (4.2 GiB per image at FPN P2 on COCO), so memory
grows linearly with the number of positions. ``naive_affinity`` keeps the textbook order for
tests and benchmarks.

Default tap ``stage4``: the last backbone stage *after* its final ReLU, as the authors tap
ResNet's ``layer4`` (for MobileNetV2 the last stage is a linear bottleneck: the same map as
``backbone``). ``--taps backbone`` distils the pre-ReLU residual sum instead; both are measured
side by side in ``benchmarks/efficacy.py``.
"""

from __future__ import annotations

from typing import ClassVar, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdcompress.methods.base import (
    DistillMethod,
    Shapes,
    at_least_fp32,
    conv1x1,
    resize_to,
)


def naive_affinity(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """(q kᵀ / N) v with the B×HW×N affinity materialised. q: B×HW×C', k, v: B×N×C'."""
    n = k.shape[1]
    return torch.bmm(torch.bmm(q, k.transpose(1, 2)) / n, v)


def linear_affinity(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """q (kᵀ v) / N: same value as ``naive_affinity``, memory linear in HW.

    kᵀv sums over all N key positions, so it is formed in fp32 even under autocast.
    """
    n = k.shape[1]
    with torch.autocast(device_type=q.device.type, enabled=False):
        kv = torch.bmm(at_least_fp32(k.transpose(1, 2)), at_least_fp32(v)) / n
        return torch.bmm(at_least_fp32(q), kv)


class CanBlock(nn.Module):
    """z_s = BN(W((θ(y_s) · φ(y_t)ᵀ / N) · g(y_t))) + y_s, with φ/g max-pooled 2×2 and BN γ=β=0.

    The zero-initialised BN makes the block the identity at step 0 (z_s = y_s).
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        inner = max(1, channels // 2)
        self.theta = conv1x1(channels, inner, bias=True)
        self.phi = conv1x1(channels, inner, bias=True)
        self.g = conv1x1(channels, inner, bias=True)
        # ceil_mode keeps the last row/column of odd-sized maps (e.g. 65×129) and avoids N = 0
        # on 1-pixel maps; for even sizes it equals the authors' floor pooling.
        self.pool = nn.MaxPool2d(kernel_size=2, stride=2, ceil_mode=True)
        self.w = conv1x1(inner, channels, bias=True)
        self.bn = nn.BatchNorm2d(channels)
        nn.init.zeros_(self.bn.weight)
        nn.init.zeros_(self.bn.bias)
        self.naive = False  # tests / benchmarks switch to the materialising order

    def forward(self, y_s: Tensor, y_t: Tensor) -> Tensor:
        b, _, h, w = y_s.shape
        q = self.theta(y_s).flatten(2).transpose(1, 2)  # B×HW×C'
        k = self.pool(self.phi(y_t)).flatten(2).transpose(1, 2)  # B×N×C'
        v = self.pool(self.g(y_t)).flatten(2).transpose(1, 2)  # B×N×C'
        y = (naive_affinity if self.naive else linear_affinity)(q, k, v)
        y = y.to(q.dtype).transpose(1, 2).reshape(b, -1, h, w)
        return self.bn(self.w(y)) + y_s


def instance_norm_mse(z_s: Tensor, y_t: Tensor) -> Tensor:
    """Mean over B,C,H,W of (IN(z_s) − IN(y_t))², IN without affine parameters.

    ``mse_loss`` keeps no difference map for backward (the explicit ``(a − b).pow(2)`` kept two
    full-size maps: about 100 MiB of a 272×200 FPN level at C = 256)."""
    with torch.no_grad():
        target = F.instance_norm(at_least_fp32(y_t))
    return F.mse_loss(F.instance_norm(at_least_fp32(z_s)), target)


class CanKD(DistillMethod):
    """L_can = Σ over taps of MSE(IN(Can(adapter(F^S), F^T)), IN(F^T)); weight μ (default 5)."""

    name: ClassVar[str] = "cankd"
    default_taps: ClassVar[tuple[str, ...]] = ("stage4",)
    default_hparams: ClassVar[dict[str, float]] = {"mu": 5.0}

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
        self.can = nn.ModuleDict()
        for tap in self.taps:
            c_s, c_t = self.student_shapes[tap][1], self.teacher_shapes[tap][1]
            self.adapter[tap] = conv1x1(c_s, c_t, bias=True) if c_s != c_t else nn.Identity()
            self.can[tap] = CanBlock(c_t)

    def set_naive(self, naive: bool) -> None:
        """Use the materialising (q kᵀ) v order everywhere (for tests and benchmarks)."""
        for block in self.can.values():
            block.naive = naive

    def forward(  # type: ignore[override]
        self, student_feats: Mapping[str, Tensor], teacher_feats: Mapping[str, Tensor]
    ) -> dict[str, Tensor]:
        terms = []
        for tap in self.taps:
            y_t = self._teacher(teacher_feats, tap)
            y_s = resize_to(self.adapter[tap](student_feats[tap]), y_t)
            terms.append(instance_norm_mse(self.can[tap](y_s, y_t), y_t))
        return {"can": torch.stack(terms).sum()}

    def loss_weights(self) -> dict[str, float]:
        return {"can": self.hparams["mu"]}
