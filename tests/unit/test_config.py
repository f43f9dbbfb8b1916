"""Recipes and targets: presets load, overrides apply, unknown keys are named."""

from __future__ import annotations

from pathlib import Path

import pytest

from kdcompress.config import list_presets, load_recipe, load_target, role_train
from kdcompress.errors import ConfigError


@pytest.mark.parametrize("name", list_presets("recipes"))
def test_builtin_recipes_load(name: str) -> None:
    r = load_recipe(name)
    assert r.name == name
    role_train(r, "teacher"), role_train(r, "student")


def test_paper_recipes_carry_paper_settings() -> None:
    voc = load_recipe("voc-attnfd")
    assert (voc.data.crop_size, voc.train.batch_size, voc.train.epochs, voc.train.lr, voc.train.schedule) == \
        ([513, 513], 6, 120, 0.007, "cosine")
    cs = load_recipe("cityscapes-attnfd")
    assert (cs.data.crop_size, cs.train.batch_size, cs.train.lr, cs.train.epochs) == ([512, 1024], 4, 0.01, 50)
    # the paper's weights and its conv + BN adapter, not the library defaults measured on the digits benchmark
    assert voc.distill.hparams == {"alpha": 1.0, "adapter_bn": 1} and cs.distill.hparams == {"alpha": 10.0, "adapter_bn": 1}


def test_overrides_and_role_sections() -> None:
    r = load_recipe("digits", ["train.lr=1e-4", "student.train.steps=7", "data.crop_size=[64,64]"])
    assert r.train.lr == pytest.approx(1e-4) and r.data.crop_size == [64, 64]
    assert role_train(r, "student").steps == 7 and role_train(r, "student").lr == pytest.approx(1e-4)
    with pytest.raises(ConfigError, match="student.train"):
        role_train(load_recipe("digits", ["student.train.lrr=1"]), "student")
    with pytest.raises(ConfigError, match="must look like"):
        load_recipe("digits", ["train.lr"])


@pytest.mark.parametrize("name", list_presets("targets"))
def test_targets_load(name: str) -> None:
    t = load_target(name)
    assert t["export"]["to"] in ("onnx", "ort-int8", "tensorrt") and t["tolerances"]


def test_target_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="Unknown target 'jetson'.*jetson-orin-fp16"):
        load_target("jetson")
    bad = tmp_path / "t.yaml"
    bad.write_text("export: {to: onnx, precison: fp16}\n")
    with pytest.raises(ConfigError, match="export.precison"):
        load_target(str(bad))


def test_step_schedule_drops_tenfold_at_each_milestone() -> None:
    from kdcompress.config import TrainConfig
    from kdcompress.engine.trainer import lr_lambda

    fn = lr_lambda(TrainConfig(schedule="step", milestones=[0.5, 0.75]), 100)
    assert [fn(s) for s in (0, 49, 50, 74, 75, 99)] == pytest.approx([1.0, 1.0, 0.1, 0.1, 0.01, 0.01])
