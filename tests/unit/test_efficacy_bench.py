"""benchmarks/efficacy.py's row grammar and plateau test: the table's labels and its plateau column come from these."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "efficacy.py"
_spec = importlib.util.spec_from_file_location("efficacy_bench", _PATH)
efficacy = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(efficacy)


def test_parse_variant_reads_every_key() -> None:
    method, hparams, distill = efficacy.parse_variant("acam:detach_kv=0,warmup=0.1,cooldown=0.5,taps=p3+p4,"
                                                      "inherit=fpn+head", "detection")
    assert (method, hparams) == ("acam", {"detach_kv": 0.0})
    assert distill == {"warmup": 0.1, "cooldown": 0.5, "taps": ["p3", "p4"],
                       "inherit": ["detector.backbone.body.fpn", "detector.head"]}
    assert efficacy.parse_variant("none", "segmentation") == ("none", {}, {})
    assert efficacy.parse_variant("none:inherit=head", "detection")[2] == {"inherit": ["detector.head"]}
    # segmentation has no aliases: the DeepLabV3+ head's own prefix
    assert efficacy.parse_variant("none:inherit=head", "segmentation")[2] == {"inherit": ["head"]}
    with pytest.raises(SystemExit, match="bad method variant"):
        efficacy.parse_variant("acam:detach_kv", "segmentation")


def test_default_rows_per_task() -> None:
    det = efficacy.default_rows("detection")
    assert det[0] == "none" and "kd" not in det and set(efficacy.DET_VARIANTS) <= set(det)
    seg = efficacy.default_rows("segmentation")
    assert seg[:2] == ["none", "kd"] and not set(efficacy.DET_VARIANTS) & set(seg)
    assert set(efficacy.TAP_ROWS) <= set(seg) and not set(efficacy.VARIANTS) & set(seg)


def test_last_quarter_gain_is_the_plateau_test() -> None:
    curve = [[75, 0.10], [150, 0.20], [225, 0.30], [300, 0.32]]
    assert efficacy.last_quarter_gain(curve) == pytest.approx(0.02)  # step 225 -> 300
    assert efficacy.last_quarter_gain([]) is None


def test_the_papers_regime_is_a_recipe_on_the_demos_data_and_teacher() -> None:
    """Both tables compare students on one dataset and one teacher: the regime changes pretraining and students."""
    from dataclasses import asdict

    from kdcompress.config import load_recipe, role_train

    full, demo = load_recipe(efficacy.DEFAULT_RECIPE), load_recipe("digits")
    assert asdict(full.data) == asdict(demo.data) and full.teacher == demo.teacher
    assert role_train(full, "teacher") == role_train(demo, "teacher")
    s_full, s_demo = role_train(full, "student"), role_train(demo, "student")
    assert s_full.steps * s_full.batch_size == 8 * s_demo.steps * s_demo.batch_size
    assert full.pretrain.steps > demo.pretrain.steps
    assert full.student.model == demo.student.model


def test_each_recipe_has_its_own_results_file() -> None:
    assert efficacy.out_path("digits-full").name == "efficacy.json"
    assert efficacy.out_path("digits").name == "efficacy_demo.json"
    assert efficacy.out_path("digits-det").name == "efficacy_digits-det.json"
    assert efficacy.out_path("/tmp/mine.yaml").name == "efficacy_mine.json"


def test_a_first_seed_row_is_compared_with_the_first_seed_none() -> None:
    none = {0: 0.50, 1: 0.60, 2: 0.70}
    assert efficacy.paired_none([0], none) == pytest.approx(0.50)
    assert efficacy.paired_none([0, 1, 2], none) == pytest.approx(0.60)
    assert efficacy.paired_none([3], none) == pytest.approx(0.60)  # no `none` on that seed: the overall mean


def test_teacher_key_ignores_the_validation_cadence_only() -> None:
    """A teacher validated every 250 steps is the same model as one validated every 75 (cached runs stay valid);
    a change that does alter the weights gives a new key."""
    from kdcompress.config import load_recipe

    base = efficacy.teacher_key(load_recipe("digits"))
    assert efficacy.teacher_key(load_recipe("digits", ["teacher.train.val_every=75"])) == base
    assert efficacy.teacher_key(load_recipe("digits", ["teacher.train.val_every=10"])) == base
    assert efficacy.teacher_key(load_recipe("digits", ["teacher.train.steps=999"])) != base


def test_run_key_follows_the_methods_resolved_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    """A cached run is found again for the same row, but not after the method's default changes under it."""
    from kdcompress.config import load_recipe
    from kdcompress.methods import METHODS

    r = load_recipe("digits-full", ["distill.method=attnfd"])
    key = efficacy.run_key(r, "t", "attnfd")
    assert efficacy.run_key(load_recipe("digits-full", ["distill.method=attnfd"]), "t", "attnfd") == key
    cls = METHODS.get("attnfd")
    monkeypatch.setattr(cls, "default_hparams", cls.default_hparams | {"adapter_bn": 1.0 - cls.default_hparams["adapter_bn"]})
    assert efficacy.run_key(r, "t", "attnfd") != key
