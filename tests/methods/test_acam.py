"""ACAM-KD: conformance, fused-SDPA proof and equality with the explicit formulas (eq. 2–8)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from kdcompress.errors import ConfigError
from kdcompress.methods import build_method
from kdcompress.methods.base import inherit_from_teacher
from kdcompress.methods.acam import (
    ACAMKD,
    diversity,
    fused_attention,
    naive_attention,
)
from tests.methods.method_conformance import (
    NUM_CLASSES,
    STUDENT,
    TEACHER,
    TOL,
    Feats,
    MethodConformance,
    make_feats,
    randomize,
)

FLASH_ONLY = [SDPBackend.FLASH_ATTENTION]
PAPER = {"detach_kv": 0.0, "mask_distill_grad": 1.0, "center_logits": 0.0}  # the paper-literal variant


def ref_conv1x1(x: Tensor, conv: nn.Conv2d) -> Tensor:
    out = torch.einsum("oc,bchw->bohw", conv.weight[:, :, 0, 0], x)
    return out + conv.bias[None, :, None, None]


def ref_acam(method: ACAMKD, s: Feats, t: Feats, power: int = 1) -> dict[str, Tensor]:
    """Loops over samples and masks, straight from the spec's formulas."""
    out = {"acam_c": torch.zeros(()), "acam_s": torch.zeros(()), "acam_div": torch.zeros(())}
    for tap in method.taps:
        align = method.align[tap]
        f_s = s[tap] if isinstance(align, nn.Identity) else ref_conv1x1(s[tap], align)
        f_s = F.interpolate(f_s, size=t[tap].shape[-2:], mode="bilinear", align_corners=False)
        f_t = t[tap]
        if method.hparams["center_logits"] and tap == "logits":  # per-pixel offset over classes removed
            f_t = f_t - f_t.mean(dim=1, keepdim=True)
            f_s = f_s - f_s.mean(dim=1, keepdim=True)
        fusion, units = method.fusion[tap], method.masks[tap]
        q = ref_conv1x1(f_t, fusion.w_q).flatten(2)  # B×Cq×HW
        k = ref_conv1x1(f_s, fusion.w_k).flatten(2)
        v = ref_conv1x1(f_s, fusion.w_v).flatten(2)  # B×C×HW
        attn = torch.softmax(torch.einsum("bcp,bcr->bpr", q, k) / fusion.inner**0.5, dim=-1)
        fused = torch.einsum("bpr,bcr->bcp", attn, v)  # B×C×HW
        batch, c, hw = fused.shape
        count = units.spatial_units.shape[0]
        sums = {"acam_c": 0.0, "acam_s": 0.0, "acam_div": 0.0}
        for b in range(batch):
            d = ((f_t[b] - f_s[b]) ** 2).reshape(c, hw)
            spatial = [torch.sigmoid(units.spatial_units[m] @ fused[b]) for m in range(count)]
            channel = [
                torch.sigmoid(units.channel_units[m] * fused[b].mean(dim=1)) for m in range(count)
            ]
            l_s = sum((ms**power * d.sum(0)).sum() / (c * ms.sum()) for ms in spatial) / count
            l_c = sum((mc**power * d.sum(1)).sum() / (hw * mc.sum()) for mc in channel) / count
            div = 0.0
            for masks in (spatial, channel):
                cross = sum(
                    masks[i] @ masks[j] for i in range(count) for j in range(count) if i != j
                )
                div = div + cross / sum(m @ m for m in masks)
            sums["acam_s"] += l_s / batch
            sums["acam_c"] += l_c / batch
            sums["acam_div"] += div / batch
        for name in out:
            out[name] = out[name] + sums[name]
    return out


class TestACAMLogits(MethodConformance):
    """Segmentation setting: logits tap, M = num_classes; 5 classes → C_q = 2 (zero-pad path)."""

    method = "acam"
    expected_terms = ("acam_c", "acam_s", "acam_div")
    expected_weights = {"acam_c": 1.0, "acam_s": 1.0, "acam_div": 1.0}

    def reference(self, method, s, t):  # type: ignore[no-untyped-def]
        return ref_acam(method, s, t, power=int(method.hparams["mask_power"]))

    def zero_case(self):  # type: ignore[no-untyped-def]
        # F^S' = F^T makes D = 0, so both masked terms vanish whatever the masks are.
        method = build_method("acam", TEACHER, TEACHER, NUM_CLASSES)
        feats = make_feats(TEACHER, seed=5)
        return method, feats, {k: v.clone() for k, v in feats.items()}, ("acam_c", "acam_s")

    def test_fused_kernel_runs_and_matches_naive(self) -> None:
        method = randomize(self.build())
        s, t = self.inputs(grad=True)
        with sdpa_kernel(FLASH_ONLY):  # raises instead of silently materialising HW×HW
            fast = method(s, t)
            grads_fast = torch.autograd.grad(sum(fast.values()), [s[k] for k in method.taps])
        method.set_naive(True)
        slow = method(s, t)
        grads_slow = torch.autograd.grad(sum(slow.values()), [s[k] for k in method.taps])
        for name in fast:
            torch.testing.assert_close(fast[name], slow[name], **TOL)
        for a, b in zip(grads_fast, grads_slow):
            torch.testing.assert_close(a, b, **TOL)


class TestACAMFeatureTap(TestACAMLogits):
    """Feature tap with f_align (16 → 24 ch), C_q = 12 divides C (split-heads path), M = 3."""

    taps = ("encoder",)
    hparams = {"m": 3.0}


class TestACAMMaskedSquared(TestACAMLogits):
    """The switchable open point: MasKD-style M² weighting, normaliser Σ M."""

    hparams = {"mask_power": 2.0, "alpha": 2.0, "lambda": 0.5}
    expected_weights = {"acam_c": 2.0, "acam_s": 2.0, "acam_div": 0.5}


WIDTHS = [(8, 8, 1), (8, 16, 1), (9, 19, 1), (1, 1, 1), (2, 5, 1), (9, 19, 8), (12, 24, 8)]


@pytest.mark.parametrize("dq,dv,align", WIDTHS)
def test_fused_attention_equals_explicit_softmax_on_flash_kernel(
    dq: int, dv: int, align: int
) -> None:
    """Split heads, zero-padded Q/K, and the CUDA-style padding to a multiple of 8."""
    gen = torch.Generator().manual_seed(dq * 100 + dv)
    q = torch.randn(2, 48, dq, generator=gen).requires_grad_()
    k = torch.randn(2, 48, dq, generator=gen).requires_grad_()
    v = torch.randn(2, 48, dv, generator=gen).requires_grad_()
    scale = dq**-0.5
    with sdpa_kernel(FLASH_ONLY):
        fast = fused_attention(q, k, v, scale, align=align)
        g_fast = torch.autograd.grad((fast * fast).sum(), (q, k, v))
    slow = naive_attention(q, k, v, scale)
    g_slow = torch.autograd.grad((slow * slow).sum(), (q, k, v))
    torch.testing.assert_close(fast, slow, **TOL)
    for a, b in zip(g_fast, g_slow):
        torch.testing.assert_close(a, b, **TOL)


def test_flash_only_context_really_refuses_wider_v() -> None:
    """Guards the proof above: a plain call with v wider than q/k cannot use the fused kernel."""
    q = torch.randn(1, 1, 16, 4)
    with sdpa_kernel(FLASH_ONLY), pytest.warns(UserWarning), pytest.raises(RuntimeError):
        F.scaled_dot_product_attention(q, q, torch.randn(1, 1, 16, 8))


def test_paper_literal_each_term_reaches_student_fusion_and_its_mask_units() -> None:
    method = randomize(build_method("acam", STUDENT, TEACHER, NUM_CLASSES, **PAPER))
    s = make_feats(STUDENT, seed=1, requires_grad=True)
    t = make_feats(TEACHER, seed=2)
    terms = method(s, t)
    fusion = list(method.fusion["logits"].parameters())
    units = method.masks["logits"]
    expect_units = {
        "acam_c": [units.channel_units],
        "acam_s": [units.spatial_units],
        "acam_div": [units.channel_units, units.spatial_units],
    }
    for name, value in terms.items():
        wrt = [s["logits"], *fusion, *expect_units[name]]
        grads = torch.autograd.grad(value, wrt, retain_graph=True)
        for g in grads:
            assert g.abs().sum() > 0, name


def test_masks_can_be_cut_from_the_distillation_gradient() -> None:
    method = randomize(build_method("acam", STUDENT, TEACHER, NUM_CLASSES, mask_distill_grad=0))
    s = make_feats(STUDENT, seed=1, requires_grad=True)
    t = make_feats(TEACHER, seed=2)
    terms = method(s, t)
    units = list(method.masks["logits"].parameters())
    distill = terms["acam_c"] + terms["acam_s"]
    grads = torch.autograd.grad(distill, units, allow_unused=True, retain_graph=True)
    assert all(g is None for g in grads)
    assert all(g.abs().sum() > 0 for g in torch.autograd.grad(terms["acam_div"], units))


def test_mask_count_defaults_and_override() -> None:
    method = build_method("acam", STUDENT, TEACHER, NUM_CLASSES)
    assert method.num_masks == {"logits": NUM_CLASSES}
    assert method.masks["logits"].spatial_units.shape == (NUM_CLASSES, NUM_CLASSES)
    feature = build_method("acam", STUDENT, TEACHER, NUM_CLASSES, taps=["encoder", "decoder"])
    assert feature.num_masks == {"encoder": 6, "decoder": 6}
    assert feature.masks["decoder"].channel_units.shape == (6, 48)
    assert build_method("acam", STUDENT, TEACHER, NUM_CLASSES, m=2).num_masks == {"logits": 2}


def test_diversity_range() -> None:
    same = torch.rand(2, 4, 10).expand(2, 4, 10).clone()
    same[:, 1:] = same[:, :1]
    torch.testing.assert_close(diversity(same), torch.full((2,), 3.0))
    disjoint = torch.eye(4).repeat(2, 1, 1)
    torch.testing.assert_close(diversity(disjoint), torch.zeros(2))


def test_inherit_from_teacher_copies_matching_shapes_only() -> None:
    student = nn.ModuleDict({"backbone": nn.Conv2d(3, 4, 1), "neck": nn.Conv2d(4, 4, 1)})
    student["head"] = nn.Conv2d(4, 2, 1)
    teacher = nn.ModuleDict({"backbone": nn.Conv2d(3, 4, 1), "neck": nn.Conv2d(4, 4, 1)})
    teacher["head"] = nn.Conv2d(4, 3, 1)
    copied = inherit_from_teacher(student, teacher)
    assert copied == ["neck.weight", "neck.bias"]
    assert torch.equal(student["neck"].weight, teacher["neck"].weight)
    assert not torch.equal(student["backbone"].weight, teacher["backbone"].weight)


def test_saturated_masks_on_a_tiny_level_stay_finite() -> None:
    """FPN P6 of a 96 px image is 2x2: a sigmoid mask saturated at every position sums to exactly 0,
    which must not turn the loss into 0/0 (it did at step 76 of a digits-det run)."""
    from kdcompress.methods.acam import diversity

    shapes = {"p6": torch.Size((2, 8, 2, 2))}
    method = build_method("acam", shapes, shapes, NUM_CLASSES, taps=["p6"], m=2.0)
    diff_sq = torch.rand(2, 8, 4).requires_grad_()
    spatial = torch.zeros(2, 2, 4)  # every mask 0 everywhere
    channel = torch.ones(2, 2, 8)
    loss_c, loss_s = method._masked_losses(diff_sq, spatial, channel)
    assert torch.isfinite(loss_c) and torch.isfinite(loss_s) and float(loss_s.detach()) == 0.0
    (loss_c + loss_s).backward()
    assert torch.isfinite(diff_sq.grad).all()
    assert torch.isfinite(diversity(spatial)).all()


class TestACAMBanded(TestACAMLogits):
    """The whole conformance suite through the banded path (tiny bands force it on these small maps)."""

    hparams = {"chunk_positions": 7.0}


class TestACAMFeatureTapBanded(TestACAMFeatureTap):
    hparams = {"m": 3.0, "chunk_positions": 5.0}


class TestACAMPaperSquaredBanded(TestACAMLogits):
    hparams = {**PAPER, "mask_power": 2.0, "chunk_positions": 6.0}


@pytest.mark.parametrize("options", [{}, PAPER, {**PAPER, "mask_power": 2.0}, {"detach_kv": 0.0}])
def test_banded_path_matches_one_pass_for_every_parameter(options: dict[str, float]) -> None:
    shapes_s = {"encoder": torch.Size((2, 12, 5, 7))}
    shapes_t = {"encoder": torch.Size((2, 16, 5, 7))}
    one = randomize(build_method("acam", shapes_s, shapes_t, 5, taps=["encoder"], chunk_positions=0, **options))
    banded = build_method("acam", shapes_s, shapes_t, 5, taps=["encoder"], chunk_positions=8, **options)
    banded.load_state_dict(one.state_dict())
    s = make_feats(shapes_s, seed=3, requires_grad=True)
    t = make_feats(shapes_t, seed=4)
    results = []
    for method in (one, banded):
        terms = method(s, t)
        weights = torch.tensor([1.0, 0.7, 0.3])  # distinct weights: each term's gradient is checked
        total = sum(w * terms[k] for w, k in zip(weights, ("acam_c", "acam_s", "acam_div")))
        params = [p for p in method.parameters()]
        results.append((torch.stack(list(terms.values())), torch.autograd.grad(total, [s["encoder"], *params])))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-6)
    for g_banded, g_one in zip(results[1][1], results[0][1], strict=True):
        torch.testing.assert_close(g_banded, g_one, rtol=1e-4, atol=1e-6)


def test_chunk_positions_must_be_a_whole_number() -> None:
    with pytest.raises(ConfigError, match="chunk_positions"):
        build_method("acam", STUDENT, TEACHER, NUM_CLASSES, chunk_positions=-1)


def test_banded_path_under_bf16_autocast_matches_fp32() -> None:
    shapes = {"encoder": torch.Size((1, 16, 6, 6))}
    method = randomize(build_method("acam", shapes, shapes, 5, taps=["encoder"], chunk_positions=8))
    s = make_feats(shapes, seed=3, requires_grad=True)
    t = make_feats(shapes, seed=4)
    ref = torch.stack(list(method(s, t).values()))
    (g_ref,) = torch.autograd.grad(ref.sum(), s["encoder"])
    s16 = {"encoder": s["encoder"].detach().bfloat16().requires_grad_()}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        half = torch.stack(list(method(s16, {"encoder": t["encoder"].bfloat16()}).values()))
    (g_half,) = torch.autograd.grad(half.sum(), s16["encoder"])
    assert g_half.dtype == torch.bfloat16
    torch.testing.assert_close(half.float(), ref, rtol=3e-2, atol=1e-3)
    torch.testing.assert_close(g_half.float(), g_ref, rtol=5e-2, atol=5e-3)
