"""Baselines: pixel-wise KD and FitNet-style MSE (conformance), and ``none``."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kdcompress.errors import ConfigError, KdError
from kdcompress.methods import build_method
from tests.methods.method_conformance import (
    NUM_CLASSES,
    STUDENT,
    TEACHER,
    MethodConformance,
    make_feats,
)


class TestLogitKD(MethodConformance):
    method = "kd"
    expected_terms = ("kd",)
    expected_weights = {"kd": 1.0}

    def reference(self, method, s, t):  # type: ignore[no-untyped-def]
        temp = method.hparams["T"]
        size = t["logits"].shape[-2:]
        student = F.interpolate(s["logits"], size=size, mode="bilinear", align_corners=False)
        total, pixels = torch.zeros(()), 0
        b, c, h, w = t["logits"].shape
        for i in range(b):
            zs = student[i].reshape(c, -1) / temp
            zt = t["logits"][i].reshape(c, -1) / temp
            p_s = torch.exp(zs) / torch.exp(zs).sum(0)
            p_t = torch.exp(zt) / torch.exp(zt).sum(0)
            total = total + (p_t * torch.log(p_t / p_s)).sum()
            pixels += h * w
        return {"kd": total / pixels}

    def zero_case(self):  # type: ignore[no-untyped-def]
        method = build_method("kd", TEACHER, TEACHER, NUM_CLASSES)
        feats = make_feats(TEACHER, seed=5)
        return method, feats, {k: v.clone() for k, v in feats.items()}, ("kd",)


class TestLogitKDTemperature(TestLogitKD):
    hparams = {"T": 4.0, "weight": 0.5}
    expected_weights = {"kd": 0.5 * 16.0}


class TestFeatureMSE(MethodConformance):
    method = "mse"
    expected_terms = ("mse",)
    expected_weights = {"mse": 1.0}

    def reference(self, method, s, t):  # type: ignore[no-untyped-def]
        total = torch.zeros(())
        for tap in method.taps:
            conv = method.adapter[tap]
            x = s[tap]
            if not isinstance(conv, nn.Identity):  # equal widths (FPN levels): no adapter
                x = torch.einsum("oc,bchw->bohw", conv.weight[:, :, 0, 0], x) + conv.bias[None, :, None, None]
            x = F.interpolate(x, size=t[tap].shape[-2:], mode="bilinear", align_corners=False)
            total = total + ((x - t[tap]) ** 2).sum() / t[tap].numel()
        return {"mse": total}

    def zero_case(self):  # type: ignore[no-untyped-def]
        method = build_method("mse", TEACHER, TEACHER, NUM_CLASSES)
        assert isinstance(method.adapter["backbone"], nn.Identity)
        feats = make_feats(TEACHER, seed=5)
        return method, feats, {k: v.clone() for k, v in feats.items()}, ("mse",)


class TestFeatureMSETwoTaps(TestFeatureMSE):
    taps = ("backbone", "decoder")
    hparams = {"weight": 3.0}
    expected_weights = {"mse": 3.0}


def test_none_has_no_taps_terms_or_teacher() -> None:
    method = build_method("none", STUDENT, TEACHER, NUM_CLASSES)
    assert method.needs_teacher is False and method.taps == ()
    assert method({}, {}) == {} and method.loss_weights() == {}
    assert list(method.parameters()) == []
    with pytest.raises(KdError, match="uses no taps"):
        build_method("none", STUDENT, TEACHER, NUM_CLASSES, taps=["logits"])
    with pytest.raises(ConfigError, match=r"Valid: \(none\)"):
        build_method("none", STUDENT, TEACHER, NUM_CLASSES, alpha=1.0)


def test_kd_refuses_different_label_sets_and_bad_temperature() -> None:
    teacher = {"logits": torch.Size((2, 19, 16, 16))}
    with pytest.raises(KdError, match="5 student and 19 teacher"):
        build_method("kd", STUDENT, teacher, NUM_CLASSES)
    with pytest.raises(ConfigError, match="'T'"):
        build_method("kd", STUDENT, TEACHER, NUM_CLASSES, T=0.0)


def test_kd_temperature_softens() -> None:
    s = make_feats(TEACHER, seed=1)
    t = make_feats(TEACHER, seed=2)
    hot = build_method("kd", TEACHER, TEACHER, NUM_CLASSES, T=8.0)(s, t)["kd"]
    cold = build_method("kd", TEACHER, TEACHER, NUM_CLASSES)(s, t)["kd"]
    assert 0 < float(hot) < float(cold) and math.isfinite(float(hot))
