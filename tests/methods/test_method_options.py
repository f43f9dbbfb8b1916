"""The efficacy options of issue 10: each changes the loss or its gradients as it claims."""

from __future__ import annotations

import pytest
import torch

from kdcompress.config import distill_ramp_steps, distill_ramps
from kdcompress.engine.trainer import distill_weight, gradient_ratio
from kdcompress.errors import ConfigError
from kdcompress.methods import build_method
from tests.methods.method_conformance import NUM_CLASSES, STUDENT, TEACHER, make_feats, randomize


def _fusion_inputs(method, s, t) -> list[torch.Tensor]:
    """Run the method once, recording the student-side input of every fusion block."""
    seen: list[torch.Tensor] = []
    for block in method.fusion.values():
        block.register_forward_pre_hook(lambda _m, args: seen.append(args[1]))
    method(s, t)
    return seen


def test_detached_kv_sends_no_gradient_through_the_fusion() -> None:
    s = make_feats(STUDENT, seed=1, requires_grad=True)
    t = make_feats(TEACHER, seed=2)
    on = randomize(build_method("acam", STUDENT, TEACHER, NUM_CLASSES, detach_kv=1))
    assert all(not x.requires_grad for x in _fusion_inputs(on, s, t))
    off = randomize(build_method("acam", STUDENT, TEACHER, NUM_CLASSES, detach_kv=0))
    assert all(x.requires_grad for x in _fusion_inputs(off, s, t))
    # with masks cut from the distillation gradient too, L_c + L_s reach the student only through D:
    # the gradient equals that of the same loss with the masks held constant
    cut = randomize(build_method("acam", STUDENT, TEACHER, NUM_CLASSES, detach_kv=1, mask_distill_grad=0))
    terms = cut(s, t)
    (g,) = torch.autograd.grad(terms["acam_c"] + terms["acam_s"], s["logits"])
    (g_div,) = torch.autograd.grad(cut(s, t)["acam_div"], s["logits"], allow_unused=True)
    assert g.abs().sum() > 0 and g_div is None  # the diversity term never reaches the student


def test_centred_logits_ignore_a_per_pixel_constant() -> None:
    s = make_feats(STUDENT, seed=1)
    t = make_feats(TEACHER, seed=2)
    shift = {k: v.clone() for k, v in s.items()}
    shift["logits"] = shift["logits"] + 3.0 * torch.randn(s["logits"].shape[0], 1, *s["logits"].shape[2:])
    for center, invariant in ((1, True), (0, False)):
        method = randomize(build_method("acam", STUDENT, TEACHER, NUM_CLASSES, center_logits=center)).eval()
        with torch.no_grad():
            a, b = method(s, t), method(shift, t)
        same = all(torch.allclose(a[k], b[k], atol=1e-5, rtol=1e-5) for k in a)
        assert same is invariant, center


def test_centring_on_feature_taps_is_refused_when_asked() -> None:
    with pytest.raises(ConfigError, match="center_logits.*logits tap"):
        build_method("acam", STUDENT, TEACHER, NUM_CLASSES, taps=["backbone"], center_logits=1)
    build_method("acam", STUDENT, TEACHER, NUM_CLASSES, taps=["backbone"])  # default: applies to logits only


def test_option_of_another_method_names_the_valid_keys() -> None:
    with pytest.raises(ConfigError, match="'detach_kv'.*Valid: block, chunk_positions, detach_query, mu"):
        build_method("cankd", STUDENT, TEACHER, NUM_CLASSES, detach_kv=1)
    with pytest.raises(ConfigError, match="must be 0 or 1"):
        build_method("acam", STUDENT, TEACHER, NUM_CLASSES, detach_kv=0.5)


def test_warmup_weight_is_zero_at_start_and_full_after() -> None:
    assert distill_weight(0, 10) == 0.0
    assert distill_weight(5, 10) == pytest.approx(0.5)
    assert distill_weight(10, 10) == distill_weight(500, 10) == 1.0
    assert distill_weight(0, 0) == 1.0
    assert distill_ramp_steps(0.2, 300) == 60 and distill_ramp_steps(40, 300) == 40
    with pytest.raises(ConfigError, match="longer than the 300-step schedule"):
        distill_ramp_steps(400, 300)
    with pytest.raises(ConfigError, match="distill.warmup"):
        distill_ramp_steps(-1, 300)


def test_cooldown_weight_falls_to_near_zero_at_the_end() -> None:
    total = 100
    weights = [distill_weight(i, 10, 40, total) for i in range(total)]
    assert weights[0] == 0.0 and weights[10] == weights[60] == 1.0
    assert weights[80] == pytest.approx(0.5) and weights[-1] == pytest.approx(1 / 40)
    assert all(a >= b for a, b in zip(weights[60:], weights[61:]))  # monotone down over the cool-down
    assert distill_weight(99, 0, 0, total) == 1.0  # off
    assert distill_ramps(0.2, 0.5, 300) == (60, 150)
    with pytest.raises(ConfigError, match="overlap in the 300-step schedule"):
        distill_ramps(0.6, 0.5, 300)
    with pytest.raises(ConfigError, match="distill.cooldown"):
        distill_ramps(0, -0.1, 300)


def test_attnfd_two_phase_schedule() -> None:
    joint = build_method("attnfd", STUDENT, TEACHER, NUM_CLASSES)
    assert joint.trainable(0) == joint.trainable(10_000) == (True, True)
    phased = build_method("attnfd", STUDENT, TEACHER, NUM_CLASSES, adapter_steps=5)
    assert [phased.trainable(i) for i in (0, 4, 5, 99)] == [(False, True)] * 2 + [(True, False)] * 2
    with pytest.raises(ConfigError, match="adapter_steps"):
        build_method("attnfd", STUDENT, TEACHER, NUM_CLASSES, adapter_steps=2.5)


def test_gradient_ratio_measures_weighted_distillation_against_task() -> None:
    f = torch.randn(2, 3, 4, 4, requires_grad=True)
    terms = {"task": f.sum(), "kd": (2 * f).sum()}
    # ∂task/∂f = 1 everywhere, ∂(w·kd)/∂f = 2w everywhere
    assert gradient_ratio(terms, {"kd": 3.0}, {"t": f}) == pytest.approx(6.0)
    assert gradient_ratio({"task": f.sum()}, {}, {"t": f}) is None
