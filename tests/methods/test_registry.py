"""build_method: names, taps and hparams are validated with one-line errors that list choices."""

from __future__ import annotations

import pytest
import torch

from kdcompress.errors import ConfigError, KdError
from kdcompress.methods import METHODS, DistillMethod, build_method
from tests.methods.method_conformance import NUM_CLASSES, STUDENT, TEACHER

ALL = ["acam", "attnfd", "cankd", "kd", "mse", "none"]


def test_registry_names_and_contract() -> None:
    assert METHODS.names() == ALL
    expected_taps = {
        "attnfd": ("backbone", "encoder", "decoder"),
        "acam": ("logits",),
        "kd": ("logits",),
        "cankd": ("stage4",),
        "mse": ("backbone",),
        "none": (),
    }
    for name in ALL:
        cls = METHODS.get(name)
        assert issubclass(cls, DistillMethod) and cls.name == name
        assert cls.default_taps == expected_taps[name]
        assert cls.needs_teacher is (name != "none")
        assert all(isinstance(v, float) for v in cls.default_hparams.values())


def test_default_weights() -> None:
    weights = {n: build_method(n, STUDENT, TEACHER, NUM_CLASSES).loss_weights() for n in ALL}
    assert weights == {
        "acam": {"acam_c": 1.0, "acam_s": 1.0, "acam_div": 1.0},
        "attnfd": {"attn": 2.0},
        "cankd": {"can": 5.0},
        "kd": {"kd": 1.0},
        "mse": {"mse": 1.0},
        "none": {},
    }


def test_unknown_method_lists_all_names() -> None:
    with pytest.raises(KdError) as err:
        build_method("acamm", STUDENT, TEACHER, NUM_CLASSES)
    message = str(err.value)
    assert "Did you mean 'acam'" in message
    assert "acam, attnfd, cankd, kd, mse, none" in message


def test_unknown_tap_lists_valid_taps() -> None:
    with pytest.raises(KdError) as err:
        build_method("attnfd", STUDENT, TEACHER, NUM_CLASSES, taps=["backbone", "decodr"])
    message = str(err.value)
    assert "'decodr'" in message and "Did you mean 'decoder'" in message
    assert "backbone, stage4, encoder, decoder, logits" in message


def test_tap_missing_on_teacher_side_is_named() -> None:
    teacher = {k: v for k, v in TEACHER.items() if k != "encoder"}
    with pytest.raises(KdError, match=r"model 'pspnet-r101' \(teacher\)"):
        build_method("attnfd", STUDENT, teacher, NUM_CLASSES, teacher_name="pspnet-r101")


def test_acam_without_logits_names_the_model() -> None:
    student = {k: v for k, v in STUDENT.items() if k != "logits"}
    with pytest.raises(KdError) as err:
        build_method("acam", student, TEACHER, NUM_CLASSES, student_name="deeplabv3-mbv2")
    message = str(err.value)
    assert "method 'acam' needs a logits tap; model 'deeplabv3-mbv2' (student) has none" in message
    assert "backbone, stage4, encoder, decoder" in message


def test_unknown_and_bad_hparams() -> None:
    valid = r"Valid: alpha, center_logits, chunk_positions, detach_kv, lambda, m, mask_distill_grad, mask_power"
    with pytest.raises(ConfigError, match=rf"'mu'.*{valid}"):
        build_method("acam", STUDENT, TEACHER, NUM_CLASSES, mu=1.0)
    with pytest.raises(ConfigError, match="must be a number"):
        build_method("cankd", STUDENT, TEACHER, NUM_CLASSES, mu="5")
    with pytest.raises(ConfigError, match="whole number"):
        build_method("acam", STUDENT, TEACHER, NUM_CLASSES, m=2.5)
    with pytest.raises(ConfigError, match="mask_power"):
        build_method("acam", STUDENT, TEACHER, NUM_CLASSES, mask_power=3)


def test_empty_taps_and_non_map_taps_are_refused() -> None:
    with pytest.raises(KdError, match="at least one tap"):
        build_method("cankd", STUDENT, TEACHER, NUM_CLASSES, taps=[])
    flat = {"backbone": torch.Size((2, 32))}
    with pytest.raises(KdError, match="B×C×H×W"):
        build_method("mse", flat, flat, NUM_CLASSES)


def test_hparams_override_defaults_and_are_kept() -> None:
    method = build_method("attnfd", STUDENT, TEACHER, NUM_CLASSES, alpha=10)
    assert method.hparams == {"alpha": 10.0, "adapter_steps": 0.0, "teacher_cbam": 1.0, "student_cbam": 1.0, "adapter_bn": 0.0} and method.loss_weights() == {"attn": 10.0}
