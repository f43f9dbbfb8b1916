"""AttnFD: conformance + an independent re-computation of eq. 5 with per-sample normalisation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdcompress.errors import ConfigError
from kdcompress.methods import build_method
from kdcompress.methods.attnfd import CBAM, AttnFD, normalized_sq_distance
from kdcompress.methods.base import resize_to
from tests.methods.method_conformance import (
    NUM_CLASSES,
    STUDENT,
    TEACHER,
    Feats,
    MethodConformance,
    make_feats,
)


def ref_bn(x: Tensor, bn: nn.BatchNorm2d, train: bool) -> Tensor:
    if train:
        mean = x.mean(dim=(0, 2, 3))
        var = ((x - mean[None, :, None, None]) ** 2).mean(dim=(0, 2, 3))
    else:
        mean, var = bn.running_mean, bn.running_var
    x_hat = (x - mean[None, :, None, None]) / torch.sqrt(var[None, :, None, None] + bn.eps)
    return x_hat * bn.weight[None, :, None, None] + bn.bias[None, :, None, None]


def ref_cbam(x: Tensor, cbam: CBAM, train: bool) -> Tensor:
    fc1, fc2 = cbam.channel.mlp[0], cbam.channel.mlp[2]

    def mlp(vec: Tensor) -> Tensor:
        hidden = torch.clamp(torch.einsum("hc,bc->bh", fc1.weight, vec) + fc1.bias, min=0)
        return torch.einsum("ch,bh->bc", fc2.weight, hidden) + fc2.bias

    b, c = x.shape[:2]
    flat = x.reshape(b, c, -1)
    gate = torch.sigmoid(mlp(flat.mean(-1)) + mlp(flat.max(-1).values))
    x = x * gate[:, :, None, None]
    pooled = torch.stack([x.max(dim=1).values, x.mean(dim=1)], dim=1)
    conv = F.conv2d(pooled, cbam.spatial.conv.weight, padding=3)
    return x * torch.sigmoid(ref_bn(conv, cbam.spatial.bn, train))


def ref_attnfd(method: AttnFD, s: Feats, t: Feats, train: bool) -> Tensor:
    per_stage = []
    for tap in method.taps:
        s_map = ref_cbam(s[tap], method.student_cbam[tap], train)
        if method.hparams["adapter_bn"]:  # the spec's conv + BN
            conv, bn = method.adapter[tap][0], method.adapter[tap][1]
            s_map = ref_bn(torch.einsum("oc,bchw->bohw", conv.weight[:, :, 0, 0], s_map), bn, train)
        else:  # the default: conv with bias
            conv = method.adapter[tap]
            s_map = torch.einsum("oc,bchw->bohw", conv.weight[:, :, 0, 0], s_map) + conv.bias[None, :, None, None]
        s_map = F.interpolate(s_map, size=t[tap].shape[-2:], mode="bilinear", align_corners=False)
        t_map = ref_cbam(t[tap], method.teacher_cbam[tap], train=False)
        dists = []
        for i in range(s_map.shape[0]):
            a = s_map[i] / torch.sqrt((s_map[i] ** 2).sum())
            b = t_map[i] / torch.sqrt((t_map[i] ** 2).sum())
            dists.append(((a - b) ** 2).sum())
        per_stage.append(sum(dists) / len(dists))
    return sum(per_stage) / len(per_stage)


class TestAttnFD(MethodConformance):
    method = "attnfd"
    expected_terms = ("attn",)
    expected_weights = {"attn": 2.0}

    def reference(self, method, s, t):  # type: ignore[no-untyped-def]
        return {"attn": ref_attnfd(method, s, t, train=method.training)}

    def zero_case(self):  # type: ignore[no-untyped-def]
        # Same widths on both sides, student CBAM = teacher CBAM, identity adapter: the refined maps are
        # equal (with the BN adapter they differ only by its constant 1/√(1+eps), which normalisation removes).
        method = build_method("attnfd", TEACHER, TEACHER, NUM_CLASSES, **self.hparams)
        with torch.no_grad():
            for tap in method.taps:
                method.student_cbam[tap].load_state_dict(method.teacher_cbam[tap].state_dict())
                conv = method.adapter[tap][0] if self.hparams.get("adapter_bn") else method.adapter[tap]
                conv.weight.copy_(torch.eye(conv.weight.shape[0])[:, :, None, None])
                if conv.bias is not None:
                    conv.bias.zero_()
        method.eval()
        feats = make_feats(TEACHER, seed=5)
        return method, feats, {k: v.clone() for k, v in feats.items()}, ("attn",)


class TestAttnFDBNAdapter(TestAttnFD):
    """The spec's (and the authors') conv + BN adapter, ``adapter_bn=1``."""

    hparams = {"adapter_bn": 1.0}


class TestAttnFDOneStage(TestAttnFD):
    """Any subset of stages (paper Table 3); the decoder tap has the same stride on both sides."""

    taps = ("decoder",)


def test_teacher_cbams_are_seeded_frozen_and_stay_in_eval() -> None:
    torch.manual_seed(0)
    a = build_method("attnfd", TEACHER, TEACHER, NUM_CLASSES)
    torch.manual_seed(99)
    b = build_method("attnfd", TEACHER, TEACHER, NUM_CLASSES)
    for tap in a.taps:
        # Same teacher-side function whatever the global seed (identical on every DDP rank).
        for (name, pa), pb in zip(
            a.teacher_cbam[tap].state_dict().items(), b.teacher_cbam[tap].state_dict().values()
        ):
            assert torch.equal(pa, pb), name
        assert not any(p.requires_grad for p in a.teacher_cbam[tap].parameters())
    # Student-side parts do follow the global seed.
    assert not torch.equal(a.adapter["backbone"].weight, b.adapter["backbone"].weight)
    a.train()
    assert a.training and all(not m.training for m in a.teacher_side_modules())
    assert all(m.training for m in a.student_cbam.modules())


def test_teacher_cbam_off_targets_the_raw_teacher_map() -> None:
    """teacher_cbam=0: the same student side against the teacher's map itself, not its gated copy."""
    gated = build_method("attnfd", TEACHER, TEACHER, NUM_CLASSES).eval()
    raw = build_method("attnfd", TEACHER, TEACHER, NUM_CLASSES, teacher_cbam=0).eval()
    raw.load_state_dict(gated.state_dict())
    s, t = make_feats(TEACHER, seed=1), make_feats(TEACHER, seed=2)
    expected = torch.stack([normalized_sq_distance(raw.refine_student(tap, s[tap], t[tap]), t[tap])
                            for tap in raw.taps]).mean()
    torch.testing.assert_close(raw(s, t)["attn"], expected)
    assert not torch.allclose(gated(s, t)["attn"], expected)  # the frozen CBAM changes the target
    with pytest.raises(ConfigError, match="'teacher_cbam'.*0 or 1"):
        build_method("attnfd", TEACHER, TEACHER, NUM_CLASSES, teacher_cbam=2)


def test_student_cbam_off_feeds_the_adapter_the_raw_student_map() -> None:
    """student_cbam=0 (ablation): no student-side gate, so S_j = adapter(F^S_j)."""
    method = build_method("attnfd", STUDENT, TEACHER, NUM_CLASSES, student_cbam=0).eval()
    assert not any(isinstance(m, CBAM) for m in method.student_cbam.modules())
    s, t = make_feats(STUDENT, seed=1), make_feats(TEACHER, seed=2)
    expected = torch.stack([normalized_sq_distance(resize_to(method.adapter[tap](s[tap]), t[tap]),
                                                   method.teacher_cbam[tap](t[tap])) for tap in method.taps]).mean()
    torch.testing.assert_close(method(s, t)["attn"], expected)


def test_adapter_is_a_biased_conv_by_default_and_conv_bn_with_adapter_bn() -> None:
    """Default: conv1×1 with bias, no BN (the adapter of `mse`); adapter_bn=1: the spec's conv + BN. The loss
    value of each is checked against ``ref_attnfd`` by TestAttnFD and TestAttnFDBNAdapter."""
    plain = build_method("attnfd", STUDENT, TEACHER, NUM_CLASSES)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in plain.adapter.modules())
    assert all(isinstance(m, nn.Conv2d) and m.bias is not None for m in plain.adapter.values())
    bn = build_method("attnfd", STUDENT, TEACHER, NUM_CLASSES, adapter_bn=1)
    assert all(isinstance(m[1], nn.BatchNorm2d) and m[0].bias is None for m in bn.adapter.values())
    with pytest.raises(ConfigError, match="'adapter_bn'.*0 or 1"):
        build_method("attnfd", STUDENT, TEACHER, NUM_CLASSES, adapter_bn=0.5)
