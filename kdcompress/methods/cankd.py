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
side by side in ``benchmarks/efficacy.py``. μ = 5 stays: in the papers' regime of the digits benchmark μ = 10
ends lower (58.6 against 59.9 on three seeds, ``benchmarks/results/efficacy_cankd_weight_xeon.json``) and μ = 1
too (seed 0).

What holds CanKD back on that benchmark is the block itself (``benchmarks/feature_probe.py``,
``benchmarks/results/efficacy_cankd_block_xeon.json``, three seeds): the student's map moves toward the
teacher's (the teacher's instance-normalised map is predicted linearly from it with R² 0.49, against 0.12 for a
task-only student) but stops short, because the block bridges part of the gap with image-specific teacher
content (it changes the map by 75 % of its norm; given another image's keys the loss rises from 0.59 to 0.89).
The ablation ``block=0`` (IN-MSE between the adapted student map and the teacher's, no block: no longer CanKD)
reaches R² 0.67 and 64.87 mIoU against 59.94 with the block. ``detach_query=1`` (the student reaches the loss
only through the residual, as ACAM-KD's detached K/V) lets the block absorb more: 50.91 on seed 0, against 59.48.
Both stay off: the default is the paper's block.

Large maps (more than ``chunk_positions`` positions, default 2048: FPN P2/P3 of a detection image)
go through ``chunked_can_loss``: the loss is computed and differentiated in row bands and
recomputed in backward, so nothing but the student map's gradient is ever held at full size
(``benchmarks/attention_memory.py``). ``chunk_positions=0`` keeps the one-pass path everywhere.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdcompress.errors import ConfigError
from kdcompress.methods.base import (
    check_chunk_positions,
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

    def __init__(self, channels: int, detach_query: bool = False) -> None:
        super().__init__()
        self.detach_query = detach_query  # the student reaches the loss only through the residual
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
        q = self.theta(y_s.detach() if self.detach_query else y_s).flatten(2).transpose(1, 2)  # B×HW×C'
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


# Levels of the chunked computation: each is a sum over row bands that may read the sums of the levels
# before it. 0: teacher instance-norm sums (constant), 1: Σ kᵀv over pooled keys, 2: batch-norm sums of
# W(q·kv), 3: instance-norm sums of z_s, 4: Σ (IN(z_s) − IN(y_t))².
_LEVELS = (0, 1, 2, 3, 4)
_IN_EPS = 1e-5  # F.instance_norm's default


def _moments(x: Tensor, dims: tuple[int, ...]) -> Tensor:
    """Σx and Σx² over ``dims`` (stacked); bands are summed in float64, where E[x²] − E[x]² is taken."""
    return torch.stack([x.sum(dims), x.pow(2).sum(dims)]).double()


def _mean_rstd(sums: Tensor, count: int, eps: float) -> tuple[Tensor, Tensor]:
    mean = sums[0] / count
    var = (sums[1] / count - mean.pow(2)).clamp_min(0)
    return mean.float(), (var + eps).rsqrt().float()


def _band_sums(level: int, ys: Tensor, yt: Tensor, p: Mapping[str, Tensor], sums: Mapping[int, Tensor],
               block: CanBlock, full_hw: tuple[int, int]) -> Tensor:
    """One row band's contribution to level ``level``'s sum (fp32 maths, float64 sums)."""
    h, w = full_hw
    b = yt.shape[0]
    if level == 0:
        return _moments(yt, (2, 3))  # 2×B×C
    if level == 1:
        k = block.pool(F.conv2d(yt, p["phi.weight"], p["phi.bias"])).flatten(2)  # B×C'×n
        v = block.pool(F.conv2d(yt, p["g.weight"], p["g.bias"])).flatten(2)
        return torch.bmm(k, v.transpose(1, 2)).double()  # B×C'×C'
    n_keys = math.ceil(h / 2) * math.ceil(w / 2)
    kv = (sums[1] / n_keys).float()
    q = F.conv2d(ys.detach() if block.detach_query else ys, p["theta.weight"], p["theta.bias"])
    a = torch.bmm(kv.transpose(1, 2), q.flatten(2)).view_as(q)
    u = F.conv2d(a, p["w.weight"], p["w.bias"])
    if level == 2:
        return _moments(u, (0, 2, 3))  # 2×C
    mean, rstd = _mean_rstd(sums[2], b * h * w, block.bn.eps)
    scale = (rstd * p["bn.weight"])[None, :, None, None]
    z = (u - mean[None, :, None, None]) * scale + p["bn.bias"][None, :, None, None] + ys
    if level == 3:
        return _moments(z, (2, 3))  # 2×B×C
    z_mean, z_rstd = _mean_rstd(sums[3], h * w, _IN_EPS)
    t_mean, t_rstd = _mean_rstd(sums[0], h * w, _IN_EPS)
    z_hat = (z - z_mean[..., None, None]) * z_rstd[..., None, None]
    t_hat = (yt - t_mean[..., None, None]) * t_rstd[..., None, None]
    return (z_hat - t_hat).pow(2).sum().double()


class _ChunkedCanLoss(torch.autograd.Function):
    """``instance_norm_mse(block(y_s, y_t), y_t)`` in row bands; backward recomputes band by band.

    Forward sums each level over the bands (no graph kept). Backward walks the levels in reverse:
    each band is recomputed with its slice of y_s, the parameters and the earlier levels' sums as
    leaves, and ``grad`` of ⟨band sum, gradient of that level's sum⟩ adds to the student map's
    gradient, the parameters' and the earlier sums' (the chain rule through a sum of bands).
    """

    @staticmethod
    def forward(ctx: Any, y_s: Tensor, y_t: Tensor, block: CanBlock, rows: int, *params: Tensor) -> Tensor:
        names = [name for name, _ in block.named_parameters()]
        p = {name: t.detach().float() for name, t in zip(names, params)}
        h, w = y_s.shape[-2:]
        bands = [(r, min(r + rows, h)) for r in range(0, h, rows)]
        sums: dict[int, Tensor] = {}
        with torch.no_grad(), torch.autocast(device_type=y_s.device.type, enabled=False):
            for level in _LEVELS:
                sums[level] = sum(  # type: ignore[assignment]
                    _band_sums(level, y_s[:, :, r0:r1].float(), y_t[:, :, r0:r1].float(), p, sums, block, (h, w))
                    for r0, r1 in bands
                )
        if block.bn.track_running_stats and block.bn.running_mean is not None:
            _update_running_stats(block.bn, sums[2], y_s.shape[0] * h * w)
        ctx.save_for_backward(y_s, y_t, *params)
        ctx.block, ctx.names, ctx.bands, ctx.sums = block, names, bands, sums
        return (sums[4] / y_s.numel()).to(torch.float32)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        y_s, y_t, *params = ctx.saved_tensors
        block, names, bands, sums = ctx.block, ctx.names, ctx.bands, ctx.sums
        h, w = y_s.shape[-2:]
        p = {name: t.detach().float().requires_grad_() for name, t in zip(names, params)}
        leaves = {0: sums[0], **{lvl: sums[lvl].detach().requires_grad_() for lvl in (1, 2, 3)}}
        grad_ys = torch.zeros_like(y_s)  # in y_s's dtype: an fp32 buffer plus a bf16 copy would cost 1.5×
        grad_p = {name: torch.zeros_like(t) for name, t in p.items()}
        grad_sums: dict[int, Tensor] = {lvl: torch.zeros_like(leaves[lvl]) for lvl in (1, 2, 3)}
        grad_sums[4] = grad_out.double() / y_s.numel()
        with torch.enable_grad(), torch.autocast(device_type=y_s.device.type, enabled=False):
            for level in (4, 3, 2, 1):
                earlier = list(range(1, level))
                for r0, r1 in bands:
                    ys = y_s[:, :, r0:r1].detach().float().requires_grad_(level >= 2)
                    out = _band_sums(level, ys, y_t[:, :, r0:r1].float(), p, leaves, block, (h, w))
                    wrt = ([ys] if level >= 2 else []) + list(p.values()) + [leaves[lvl] for lvl in earlier]
                    grads = torch.autograd.grad((out * grad_sums[level]).sum(), wrt, allow_unused=True)
                    if level >= 2:
                        if grads[0] is not None:  # None: level 2 with a detached query
                            grad_ys[:, :, r0:r1] += grads[0].to(grad_ys.dtype)
                        grads = grads[1:]
                    for name, g in zip(p, grads[: len(p)]):
                        if g is not None:
                            grad_p[name] += g
                    for lvl, g in zip(earlier, grads[len(p):]):
                        if g is not None:
                            grad_sums[lvl] += g
        grad_params = tuple(grad_p[name].to(t.dtype) for name, t in zip(names, params))
        return (grad_ys, None, None, None, *grad_params)


def _update_running_stats(bn: nn.BatchNorm2d, sums: Tensor, count: int) -> None:
    """What nn.BatchNorm2d does in training mode: momentum update with the unbiased batch variance."""
    assert bn.running_mean is not None and bn.running_var is not None and bn.num_batches_tracked is not None
    mean = sums[0] / count
    var = (sums[1] / count - mean.pow(2)).clamp_min(0) * count / max(count - 1, 1)
    bn.num_batches_tracked.add_(1)
    factor = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
    bn.running_mean.lerp_(mean.to(bn.running_mean.dtype), factor)
    bn.running_var.lerp_(var.to(bn.running_var.dtype), factor)


def chunked_can_loss(block: CanBlock, y_s: Tensor, y_t: Tensor, positions: int) -> Tensor:
    """``instance_norm_mse(block(y_s, y_t), y_t)`` with bands of about ``positions`` positions.

    Same value and gradients as the one-pass path (tests), in fp32 whatever the autocast; peak memory
    is the student map's gradient plus one band's graph, instead of a dozen full-size maps. Bands are
    an even number of rows, so the 2×2 key pooling sees the same windows as on the whole map.
    """
    rows = max(2, 2 * round(positions / (2 * y_s.shape[-1])))
    return _ChunkedCanLoss.apply(y_s, y_t.detach(), block, rows, *block.parameters())


class CanKD(DistillMethod):
    """L_can = Σ over taps of MSE(IN(Can(adapter(F^S), F^T)), IN(F^T)); weight μ (default 5)."""

    name: ClassVar[str] = "cankd"
    default_taps: ClassVar[tuple[str, ...]] = ("stage4",)
    # chunk_positions: maps with more positions go through chunked_can_loss (0: never);
    # block=0: the ablation without the Can block, IN-MSE between the adapted student map and the teacher's
    # detach_query=1: the block's query reads the student map detached (ACAM-KD's detach_kv, for CanKD)
    default_hparams: ClassVar[dict[str, float]] = {"mu": 5.0, "chunk_positions": 2048.0, "block": 1.0,
                                                   "detach_query": 0.0}

    def __init__(
        self,
        student_shapes: Shapes,
        teacher_shapes: Shapes,
        taps: Sequence[str],
        num_classes: int,
        **hparams: float,
    ) -> None:
        super().__init__(student_shapes, teacher_shapes, taps, num_classes, **hparams)
        check_chunk_positions(self.hparams, self.name)
        for flag in ("block", "detach_query"):
            if self.hparams[flag] not in (0.0, 1.0):
                raise ConfigError(f"hparam '{flag}' of method 'cankd' must be 0 or 1, got {self.hparams[flag]}")
        if hparams.get("detach_query") and not self.hparams["block"]:
            raise ConfigError("hparam 'detach_query' of method 'cankd' acts on the Can block, which block=0 removes; "
                              "set method.detach_query=0 or method.block=1")
        self.adapter = nn.ModuleDict()
        self.can = nn.ModuleDict()  # empty for the block=0 ablation: no parameter left without a gradient
        for tap in self.taps:
            c_s, c_t = self.student_shapes[tap][1], self.teacher_shapes[tap][1]
            self.adapter[tap] = conv1x1(c_s, c_t, bias=True) if c_s != c_t else nn.Identity()
            if self.hparams["block"]:
                self.can[tap] = CanBlock(c_t, detach_query=bool(self.hparams["detach_query"]))

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
            if tap not in self.can:  # block=0
                terms.append(instance_norm_mse(y_s, y_t))
                continue
            block, chunk = self.can[tap], int(self.hparams["chunk_positions"])
            if block.training and not block.naive and 0 < chunk < y_t.shape[-2] * y_t.shape[-1]:
                terms.append(chunked_can_loss(block, y_s, y_t, chunk))
            else:
                terms.append(instance_norm_mse(block(y_s, y_t), y_t))
        return {"can": torch.stack(terms).sum()}

    def loss_weights(self) -> dict[str, float]:
        return {"can": self.hparams["mu"]}
