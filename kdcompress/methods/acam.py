"""ACAM-KD: adaptive and cooperative attention masking (Tian & Lan, eq. 1–8).

STCA-FF fuses the two maps with cross-attention (teacher = query, aligned student = key and
value); ASCM turns the fused map into M spatial and M channel masks from learnable units, which
weight the squared teacher–student difference; a Dice-style diversity term keeps masks apart.

Attention goes through ``F.scaled_dot_product_attention`` so the HW×HW matrix is never formed.
V (C wide) is wider than Q/K (C_q = C/2), which makes SDPA silently fall back to the
materialising math kernel; ``fused_attention`` avoids that by splitting V into heads of width
C_q that share one expanded Q/K (when C_q divides C) or by zero-padding Q/K to V's width
(otherwise, e.g. 19 classes: cheaper than padding V to 3 heads of 9). Zero columns add nothing
to QKᵀ, and the scale 1/√C_q is passed explicitly, so both are exact.

Decisions on the points the paper leaves open (spec defaults):

* Channel units are M×C (the paper's m^c ∈ R^M would give masks equal up to scale).
* Masks weight the difference linearly (Σ M·D / Σ M). The paper's ‖M ⊙ (F^T − F^S)‖² literally
  weights by M², as MasKD does: ``mask_power=2`` switches to that (normaliser stays Σ M).
* Masks receive the distillation gradient as well as the diversity one (the paper: masks adapt
  as the student learns); ``mask_distill_grad=0`` detaches them inside L_c and L_s.
* ``detach_kv=1`` (default): the student enters the fusion's K and V detached, so it learns only
  through D = (F^T − F^S')² while the masks still read it. With K/V attached (the paper,
  ``detach_kv=0``) a probe on the digits teacher measured the gradient reaching the student's
  logits through the fusion/mask path at ~25× the direct path after ~50 steps (cosine 0.04
  between total and direct gradient): the student moved the masks instead of its logits.
* ``center_logits=1`` subtracts each pixel's mean over classes from both logit maps before
  fusion and D (on the ``logits`` tap only; feature taps are left as they are): cross-entropy ignores that offset, and it was about half of α(L_c + L_s) at init.
* The other fixes measured with it (masks trained by diversity only, a weight warm-up, the
  trainer's ``distill.warmup``) keep the defaults that ``benchmarks/efficacy.py`` supports; see
  the README's efficacy table for the numbers behind each default.
* Length matters (the papers' regime: students trained 4× longer than the demo). On the logits (the
  paper's segmentation tap, kept as the default because it is what gains at the demo's schedule: +4.6
  on three seeds) ACAM-KD leads early and ends below plain training: −1.7 with the pretraining at lr
  0.01 (``benchmarks/results/efficacy_lr0.01_amd.json``; a cool-down of the weight does not change that,
  α = 0.25 ends +1.5, still below logit KD), −4.1 on three seeds with the current lr 0.003
  (``benchmarks/results/efficacy.json``; there the paper-literal variant ends 1.6 above these defaults
  on seed 0, both below plain training). On the backbone tap (``--taps backbone``, M = 6 masks, its
  detection form) it gains +3.7 and +6.4 on three seeds in those two tables, above logit KD on each
  seed; ``digits-full`` distils there.
* Several taps (e.g. FPN levels) get one module each and their terms are summed, as detection
  distillers sum over levels.
* M = number of classes on a ``logits`` tap, 6 on any other tap; ``m`` overrides both.
* Maps with more than ``chunk_positions`` positions (default 16384: FPN P2 of a 1088×800 image and
  larger) go through ``banded_acam_terms``: flash-style attention in bands of ``BAND`` positions whose projections
  are recomputed and contracted into the parameters' gradients at once, so only the student map's
  gradient is held at full size (``benchmarks/attention_memory.py``). ``chunk_positions=0``: never.
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

#: Masks per level on feature (non-logits) taps, the paper's detection setting.
DEFAULT_FEATURE_MASKS = 6


def naive_attention(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """softmax(q kᵀ · scale) v with the L×S matrix materialised. q: B×L×Dq, k: B×S×Dq, v: B×S×Dv."""
    return torch.softmax(torch.bmm(q, k.transpose(1, 2)) * scale, dim=-1).bmm(v)


def fused_attention(
    q: Tensor, k: Tensor, v: Tensor, scale: float, align: int | None = None
) -> Tensor:
    """Same value as ``naive_attention`` through SDPA's fused (non-materialising) kernels.

    Fused kernels need one width for q, k and v (see the module docstring for the two exact
    ways used) and a unit stride on the last dimension, which a transposed conv output (B×HW×C
    view of B×C×HW) lacks: such inputs are copied (linear). CUDA kernels also need widths
    divisible by 4 (fp32) or 8 (fp16/bf16), so off the CPU (``align`` default 8) odd widths
    such as 19 classes are zero-padded up to the next multiple.
    """
    if align is None:
        align = 1 if q.device.type == "cpu" else 8
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    dq, dv = q.shape[-1], v.shape[-1]
    if dv % dq == 0 and dq % align == 0:
        heads = dv // dq
        vh = v.unflatten(-1, (heads, dq)).transpose(1, 2)  # B×h×S×dq
        qh = q[:, None].expand(-1, heads, -1, -1)
        kh = k[:, None].expand(-1, heads, -1, -1)
        out = F.scaled_dot_product_attention(qh, kh, vh, scale=scale)  # B×h×L×dq
        return out.transpose(1, 2).flatten(2)
    width = -(-max(dq, dv) // align) * align
    qp, kp = F.pad(q, (0, width - dq)), F.pad(k, (0, width - dq))
    vp = F.pad(v, (0, width - dv))
    out = F.scaled_dot_product_attention(qp[:, None], kp[:, None], vp[:, None], scale=scale)
    return out[:, 0, :, :dv]


class STCAFusion(nn.Module):
    """F_fused = softmax(Q Kᵀ / √C_q) V with Q = W_q F^T, K = W_k F^S', V = W_v F^S'."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.inner = max(1, channels // 2)
        self.w_q = conv1x1(channels, self.inner, bias=True)
        self.w_k = conv1x1(channels, self.inner, bias=True)
        self.w_v = conv1x1(channels, channels, bias=True)
        self.naive = False  # tests / benchmarks switch to the materialising formula

    def forward(self, f_t: Tensor, f_s: Tensor) -> Tensor:
        b, c, h, w = f_s.shape
        q = self.w_q(f_t).flatten(2).transpose(1, 2)  # B×HW×C_q
        k = self.w_k(f_s).flatten(2).transpose(1, 2)
        v = self.w_v(f_s).flatten(2).transpose(1, 2)  # B×HW×C
        attend = naive_attention if self.naive else fused_attention
        out = attend(q, k, v, 1.0 / math.sqrt(self.inner))
        return out.transpose(1, 2).reshape(b, c, h, w)


#: Positions per query / key band of the banded path: its score blocks are BAND × BAND (4 MiB in fp32).
BAND = 1024

#: Floor of a mask's sum in the normalisers (saturated sigmoid masks on tiny levels can sum to 0).
MASK_EPS = 1e-6


class MaskUnits(nn.Module):
    """ASCM: M spatial masks sigmoid(m^s z) over HW and M channel masks sigmoid(m^c ⊙ v) over C."""

    def __init__(self, channels: int, masks: int) -> None:
        super().__init__()
        self.spatial_units = nn.Parameter(torch.empty(masks, channels).normal_(0.0, 0.01))
        self.channel_units = nn.Parameter(torch.empty(masks, channels).normal_(0.0, 0.01))

    def forward(self, fused: Tensor) -> tuple[Tensor, Tensor]:
        z = fused.flatten(2)  # B×C×HW
        spatial = torch.sigmoid(torch.einsum("mc,bcp->bmp", self.spatial_units, z))
        pooled = z.mean(dim=2)  # B×C
        channel = torch.sigmoid(self.channel_units[None] * pooled[:, None, :])  # B×M×C
        return spatial, channel


def diversity(masks: Tensor) -> Tensor:
    """Per sample Σ_{i≠j}⟨M_i, M_j⟩ / Σ_i ‖M_i‖² for B×M×L masks, via ‖Σ_i M_i‖² (linear memory)."""
    own = masks.pow(2).sum(dim=(1, 2))
    total = masks.sum(dim=1).pow(2).sum(dim=1)
    return (total - own) / own.clamp_min(MASK_EPS)


def _bands(n: int, size: int) -> list[tuple[int, int]]:
    return [(i, min(i + size, n)) for i in range(0, n, size)]


def _project(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """1×1 conv on a B×C×L band (any float dtype, computed in fp32), returned B×L×C_out."""
    return (torch.einsum("oc,bcl->blo", weight.flatten(1), x.float()) + bias).contiguous()


def _attend_band(q: Tensor, f_s: Tensor, p: Mapping[str, Tensor], scale: float,
                 band: int) -> tuple[Tensor, Tensor]:
    """Online-softmax attention of one query band over all key bands (K, V projected band by band).

    Returns the output (B×L×C) and the log-sum-exp per query (B×L); nothing of size HW×HW or HW×C.
    """
    b, length = q.shape[:2]
    run_max = q.new_full((b, length, 1), -math.inf)
    denom = q.new_zeros((b, length, 1))
    acc = q.new_zeros((b, length, p["w_v.weight"].shape[0]))
    for j0, j1 in _bands(f_s.shape[-1], band):
        k = _project(f_s[:, :, j0:j1], p["w_k.weight"], p["w_k.bias"])
        v = _project(f_s[:, :, j0:j1], p["w_v.weight"], p["w_v.bias"])
        probs = torch.bmm(q, k.transpose(1, 2)).mul_(scale)  # the scores, turned into probabilities in place
        new_max = torch.maximum(run_max, probs.amax(dim=-1, keepdim=True))
        probs.sub_(new_max).exp_()
        shrink = torch.exp(run_max - new_max)
        denom = denom * shrink + probs.sum(dim=-1, keepdim=True)
        acc = acc * shrink + torch.bmm(probs, v)
        run_max = new_max
    return acc / denom, (run_max + denom.log()).squeeze(-1)


def _band_sums(fused: Tensor, f_t: Tensor, f_s: Tensor, spatial_units: Tensor, power: int,
               mask_grad: bool) -> dict[str, Tensor]:
    """One query band's contributions to the per-sample sums the three terms are made of."""
    spatial = torch.sigmoid(torch.einsum("mc,blc->bml", spatial_units, fused))  # B×M×L
    weights = spatial if mask_grad else spatial.detach()
    diff_sq = (f_t - f_s).pow(2)  # B×C×L
    return {
        "fused": fused.sum(dim=1),  # B×C (→ pooled, for the channel masks)
        "mask_s": weights.sum(dim=2),  # B×M (L_s's normaliser)
        "num_s": torch.einsum("bml,bl->bm", weights.pow(power), diff_sq.sum(dim=1)),
        "per_channel": diff_sq.sum(dim=2),  # B×C
        "own_s": spatial.pow(2).sum(dim=(1, 2)),  # B (diversity)
        "total_s": spatial.sum(dim=1).pow(2).sum(dim=1),
    }


def _terms_from_sums(sums: Mapping[str, Tensor], channel_units: Tensor, channels: int, positions: int,
                     power: int, mask_grad: bool) -> Tensor:
    """(acam_c, acam_s, acam_div), batch-averaged, from the band sums: the same formulas as the one-pass path."""
    pooled = sums["fused"] / positions
    channel = torch.sigmoid(channel_units[None] * pooled[:, None, :])  # B×M×C
    weights = channel if mask_grad else channel.detach()
    num_c = torch.einsum("bmk,bk->bm", weights.pow(power), sums["per_channel"])
    loss_c = (num_c / (positions * weights.sum(dim=2).clamp_min(MASK_EPS))).mean(dim=1)
    loss_s = (sums["num_s"] / (channels * sums["mask_s"].clamp_min(MASK_EPS))).mean(dim=1)
    div_s = (sums["total_s"] - sums["own_s"]) / sums["own_s"].clamp_min(MASK_EPS)
    return torch.stack([loss_c.mean(), loss_s.mean(), (div_s + diversity(channel)).mean()])


class _BandedACAM(torch.autograd.Function):
    """One tap's (acam_c, acam_s, acam_div) in position bands; backward recomputes each band.

    Forward: per query band, online-softmax attention over key bands, then the band's sums; the terms
    are small functions of the sums. Backward: autograd through those small functions gives each sum's
    gradient; per band, the fused output is recomputed, autograd gives ∂/∂fused, ∂/∂F^S (through D)
    and ∂/∂units, and flash attention's backward (with the saved-free log-sum-exp recomputed) sends
    ∂/∂fused to Q, K and V, contracted at once into W_q, W_k, W_v (and into F^S when K/V are attached).
    """

    @staticmethod
    def forward(ctx: Any, f_t: Tensor, f_s: Tensor, opts: dict[str, Any], *params: Tensor) -> Tensor:
        p = {name: t.detach().float() for name, t in zip(opts["names"], params)}
        # full maps stay in their dtype (a bf16 map cast whole to fp32 would be 53 MiB at P2): bands are cast
        f_t3, f_s3 = f_t.detach().flatten(2), f_s.detach().flatten(2)
        sums: dict[str, Tensor] = {}
        with torch.no_grad(), torch.autocast(device_type=f_s.device.type, enabled=False):
            for i0, i1 in _bands(f_s3.shape[-1], opts["band"]):
                q = _project(f_t3[:, :, i0:i1], p["w_q.weight"], p["w_q.bias"])
                fused, _ = _attend_band(q, f_s3, p, opts["scale"], opts["band"])
                part = _band_sums(fused, f_t3[:, :, i0:i1].float(), f_s3[:, :, i0:i1].float(), p["spatial_units"],
                                  opts["power"], opts["mask_grad"])
                for key, value in part.items():
                    sums[key] = sums[key] + value if key in sums else value
            terms = _terms_from_sums(sums, p["channel_units"], f_s3.shape[1], f_s3.shape[-1], opts["power"],
                                     opts["mask_grad"])
        ctx.save_for_backward(f_t, f_s, *params)
        ctx.opts, ctx.sums = opts, sums
        return terms

    @staticmethod
    def backward(ctx: Any, grad_terms: Tensor) -> tuple[Tensor | None, ...]:
        f_t, f_s, *params = ctx.saved_tensors
        opts, names = ctx.opts, ctx.opts["names"]
        scale, band, power, mask_grad = opts["scale"], opts["band"], opts["power"], opts["mask_grad"]
        p = {name: t.detach().float() for name, t in zip(names, params)}
        f_t3, f_s3 = f_t.detach().flatten(2), f_s.detach().flatten(2)
        channels, positions = f_s3.shape[1], f_s3.shape[-1]
        grad_p = {name: torch.zeros_like(t) for name, t in p.items()}
        # one write per band with K/V detached: kept in F^S's dtype (no fp32 buffer plus a bf16 copy)
        grad_s = torch.zeros(f_s3.shape, dtype=f_s.dtype if opts["detach_kv"] else torch.float32, device=f_s.device)
        with torch.enable_grad(), torch.autocast(device_type=f_s.device.type, enabled=False):
            leaves = {key: value.detach().requires_grad_() for key, value in ctx.sums.items()}
            units_c = p["channel_units"].detach().requires_grad_()
            terms = _terms_from_sums(leaves, units_c, channels, positions, power, mask_grad)
            grads = torch.autograd.grad(terms, [*leaves.values(), units_c], grad_terms.float())
            grad_sums = dict(zip(leaves, grads[:-1]))
            grad_p["channel_units"] += grads[-1]
            units_s = p["spatial_units"].detach().requires_grad_()
            for i0, i1 in _bands(positions, band):
                f_t_i, f_s_i = f_t3[:, :, i0:i1].float(), f_s3[:, :, i0:i1].float()
                q = _project(f_t_i, p["w_q.weight"], p["w_q.bias"])
                with torch.no_grad():
                    fused, lse = _attend_band(q, f_s3, p, scale, band)
                fused_leaf = fused.requires_grad_()
                s_leaf = f_s_i.detach().requires_grad_()
                part = _band_sums(fused_leaf, f_t_i, s_leaf, units_s, power, mask_grad)
                surrogate = sum((part[key] * grad_sums[key]).sum() for key in part)
                d_fused, d_s, d_units = torch.autograd.grad(surrogate, [fused_leaf, s_leaf, units_s])
                grad_s[:, :, i0:i1] += d_s.to(grad_s.dtype)
                grad_p["spatial_units"] += d_units
                with torch.no_grad():
                    d_q = _attention_backward(q, fused, lse, d_fused, f_s3, p, grad_p, grad_s, opts)
                    grad_p["w_q.weight"] += torch.einsum("blq,bcl->qc", d_q, f_t_i).view_as(grad_p["w_q.weight"])
                    grad_p["w_q.bias"] += d_q.sum(dim=(0, 1))
        grad_params = tuple(grad_p[name].to(t.dtype) for name, t in zip(names, params))
        return (None, grad_s.reshape(f_s.shape).to(f_s.dtype), None, *grad_params)


def _attention_backward(q: Tensor, out: Tensor, lse: Tensor, d_out: Tensor, f_s: Tensor,
                        p: Mapping[str, Tensor], grad_p: dict[str, Tensor], grad_s: Tensor,
                        opts: Mapping[str, Any]) -> Tensor:
    """Flash attention's backward for one query band; K/V gradients go straight into their weights."""
    scale, band = opts["scale"], opts["band"]
    delta = (d_out * out).sum(dim=-1, keepdim=True)  # B×L×1
    d_q = torch.zeros_like(q)
    for j0, j1 in _bands(f_s.shape[-1], band):
        f_s_j = f_s[:, :, j0:j1]
        k = _project(f_s_j, p["w_k.weight"], p["w_k.bias"])
        v = _project(f_s_j, p["w_v.weight"], p["w_v.bias"])
        # in place: two L×Lj blocks alive, not six
        probs = torch.bmm(q, k.transpose(1, 2)).mul_(scale).sub_(lse[..., None]).exp_()  # B×L×Lj
        d_v = torch.bmm(probs.transpose(1, 2), d_out)  # B×Lj×C
        d_scores = torch.bmm(d_out, v.transpose(1, 2)).sub_(delta).mul_(probs).mul_(scale)
        d_q += torch.bmm(d_scores, k)
        d_k = torch.bmm(d_scores.transpose(1, 2), q)  # B×Lj×C_q
        for name, d in (("w_k", d_k), ("w_v", d_v)):
            grad_p[f"{name}.weight"] += torch.einsum("blo,bcl->oc", d, f_s_j.float()).view_as(grad_p[f"{name}.weight"])
            grad_p[f"{name}.bias"] += d.sum(dim=(0, 1))
            if not opts["detach_kv"]:
                grad_s[:, :, j0:j1] += torch.einsum("oc,blo->bcl", p[f"{name}.weight"].flatten(1), d).to(grad_s.dtype)
    return d_q


def banded_acam_terms(fusion: STCAFusion, masks: MaskUnits, f_t: Tensor, f_s: Tensor, positions: int,
                      power: int, mask_grad: bool, detach_kv: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(L_c, L_s, diversity) of one tap with bands of ``positions`` positions: the one-pass path's values
    and gradients (tests) in fp32 whatever the autocast, holding no full-size map but F^S's gradient."""
    named = [*(("w_q", fusion.w_q), ("w_k", fusion.w_k), ("w_v", fusion.w_v))]
    params = {f"{n}.{k}": t for n, conv in named for k, t in (("weight", conv.weight), ("bias", conv.bias))}
    params |= {"spatial_units": masks.spatial_units, "channel_units": masks.channel_units}
    opts = {"names": list(params), "scale": 1.0 / math.sqrt(fusion.inner), "band": positions,
            "power": power, "mask_grad": mask_grad, "detach_kv": detach_kv}
    terms = _BandedACAM.apply(f_t.detach(), f_s, opts, *params.values())
    return terms[0], terms[1], terms[2]


class ACAMKD(DistillMethod):
    """Terms acam_c, acam_s (weight α) and acam_div (weight λ), summed over taps."""

    name: ClassVar[str] = "acam"
    default_taps: ClassVar[tuple[str, ...]] = ("logits",)
    default_hparams: ClassVar[dict[str, float]] = {
        "alpha": 1.0,
        "lambda": 1.0,
        "m": 0.0,  # 0: automatic (num_classes on logits, 6 elsewhere)
        "mask_power": 1.0,
        "mask_distill_grad": 0.0,
        "detach_kv": 1.0,
        "center_logits": 1.0,
        "chunk_positions": 16384.0,  # maps with more positions use banded_acam_terms (0: never)
    }
    default_warmup: ClassVar[float] = 0.2

    def __init__(
        self,
        student_shapes: Shapes,
        teacher_shapes: Shapes,
        taps: Sequence[str],
        num_classes: int,
        **hparams: float,
    ) -> None:
        super().__init__(student_shapes, teacher_shapes, taps, num_classes, **hparams)
        m = self.hparams["m"]
        if m < 0 or m != int(m):
            raise ConfigError(
                f"hparam 'm' of method 'acam' must be a whole number ≥ 1 (0 = auto), got {m}"
            )
        if self.hparams["mask_power"] not in (1.0, 2.0):
            raise ConfigError("hparam 'mask_power' of method 'acam' must be 1 or 2")
        for flag in ("mask_distill_grad", "detach_kv", "center_logits"):
            if self.hparams[flag] not in (0.0, 1.0):
                raise ConfigError(f"hparam '{flag}' of method 'acam' must be 0 or 1, got {self.hparams[flag]}")
        check_chunk_positions(self.hparams, self.name)
        if hparams.get("center_logits") and "logits" not in self.taps:  # asked for explicitly
            raise ConfigError("hparam 'center_logits' of method 'acam' needs the logits tap (--taps logits); "
                              f"this run distils {', '.join(self.taps)}. Set method.center_logits=0.")
        self.align = nn.ModuleDict()
        self.fusion = nn.ModuleDict()
        self.masks = nn.ModuleDict()
        self.num_masks: dict[str, int] = {}
        for tap in self.taps:
            c_s, c_t = self.student_shapes[tap][1], self.teacher_shapes[tap][1]
            if m:
                count = int(m)
            elif tap == "logits":
                count = self.num_classes
            else:
                count = DEFAULT_FEATURE_MASKS
            self.num_masks[tap] = count
            self.align[tap] = conv1x1(c_s, c_t, bias=True) if c_s != c_t else nn.Identity()
            self.fusion[tap] = STCAFusion(c_t)
            self.masks[tap] = MaskUnits(c_t, count)

    def set_naive(self, naive: bool) -> None:
        """Use the materialising softmax(QKᵀ)V everywhere (for tests and benchmarks)."""
        for block in self.fusion.values():
            block.naive = naive

    def _masked_losses(
        self, diff_sq: Tensor, spatial: Tensor, channel: Tensor
    ) -> tuple[Tensor, Tensor]:
        """L_c, L_s (eq. 6–7) from D = (F^T − F^S')² (B×C×HW) and the masks, batch-averaged."""
        if not self.hparams["mask_distill_grad"]:
            spatial, channel = spatial.detach(), channel.detach()
        power = int(self.hparams["mask_power"])
        c, hw = diff_sq.shape[1], diff_sq.shape[2]
        per_position = diff_sq.sum(dim=1)  # B×HW: Σ_k D_kp
        per_channel = diff_sq.sum(dim=2)  # B×C:  Σ_p D_kp
        num_s = torch.einsum("bmp,bp->bm", spatial.pow(power), per_position)
        num_c = torch.einsum("bmk,bk->bm", channel.pow(power), per_channel)
        # clamped: on a small level (FPN P6 at 96 px is 2×2) a saturated sigmoid mask can sum to exactly 0,
        # and 0/0 would end the run; a mask that sums to ~0 then contributes ~0, as its numerator does
        loss_s = (num_s / (c * spatial.sum(dim=2).clamp_min(MASK_EPS))).mean(dim=1)
        loss_c = (num_c / (hw * channel.sum(dim=2).clamp_min(MASK_EPS))).mean(dim=1)
        return loss_c.mean(), loss_s.mean()

    def forward(  # type: ignore[override]
        self, student_feats: Mapping[str, Tensor], teacher_feats: Mapping[str, Tensor]
    ) -> dict[str, Tensor]:
        out: dict[str, list[Tensor]] = {"acam_c": [], "acam_s": [], "acam_div": []}
        for tap in self.taps:
            f_t = self._teacher(teacher_feats, tap)
            f_s = resize_to(self.align[tap](student_feats[tap]), f_t)
            if self.hparams["center_logits"] and tap == "logits":
                # softmax/CE ignore a per-pixel constant over classes; so does the loss then
                f_t = f_t - f_t.mean(dim=1, keepdim=True)
                f_s = f_s - f_s.mean(dim=1, keepdim=True)
            positions, chunk = f_t.shape[-2] * f_t.shape[-1], int(self.hparams["chunk_positions"])
            if self.training and not self.fusion[tap].naive and 0 < chunk < positions:
                terms = banded_acam_terms(self.fusion[tap], self.masks[tap], f_t, f_s, min(chunk, BAND),
                                          int(self.hparams["mask_power"]), bool(self.hparams["mask_distill_grad"]),
                                          bool(self.hparams["detach_kv"]))
                for name, value in zip(("acam_c", "acam_s", "acam_div"), terms):
                    out[name].append(value)
                continue
            fused = self.fusion[tap](f_t, f_s.detach() if self.hparams["detach_kv"] else f_s)
            spatial, channel = self.masks[tap](at_least_fp32(fused))
            diff_sq = (at_least_fp32(f_t) - at_least_fp32(f_s)).pow(2).flatten(2)
            loss_c, loss_s = self._masked_losses(diff_sq, spatial, channel)
            out["acam_c"].append(loss_c)
            out["acam_s"].append(loss_s)
            out["acam_div"].append((diversity(spatial) + diversity(channel)).mean())
        return {name: torch.stack(values).sum() for name, values in out.items()}

    def loss_weights(self) -> dict[str, float]:
        a, lam = self.hparams["alpha"], self.hparams["lambda"]
        return {"acam_c": a, "acam_s": a, "acam_div": lam}
