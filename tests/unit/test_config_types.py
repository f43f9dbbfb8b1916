"""Typed configuration: every wrong type or range is one line naming key, value and expectation."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from kdcompress.config import load_recipe, load_target, role_train
from kdcompress.errors import ConfigError

CASES = [
    ({"train.lr": "fast"}, "train.lr must be a positive number, got 'fast'"),
    ({"train.lr": -0.1}, "train.lr must be a positive number, got -0.1"),
    ({"train.steps": "ten"}, "train.steps must be a whole number >= 1 or null, got 'ten'"),
    ({"train.steps": 0}, "train.steps must be a whole number >= 1, got 0"),
    ({"train.momentum": 1.5}, "train.momentum must be a number in [0, 1), got 1.5"),
    ({"train.amp": "yes"}, "train.amp must be true or false, got 'yes'"),
    ({"train.grad_clip": 0}, "train.grad_clip must be a positive number, got 0"),
    ({"data.crop_size": 96}, "data.crop_size must be a list of whole numbers, got 96"),
    ({"data.crop_size": [96]}, "data.crop_size must be [H, W] with two whole numbers >= 1, got [96]"),
    ({"data.scale_range": [2.0, 0.5]}, "data.scale_range must be [min, max] with 0 < min <= max"),
    ({"data.workers": -1}, "data.workers must be a number >= 0, got -1"),
    ({"data.val_batch_size": 0}, "data.val_batch_size must be a whole number >= 1, got 0"),
    ({"data.flip": 3}, "data.flip must be true or false, got 3"),
    ({"student.output_stride": 32}, "student.output_stride must be 8 or 16, got 32"),
    ({"distill.taps": "logits"}, "distill.taps must be a list of strings or null, got 'logits'"),
    ({"distill.inherit": "head"}, "distill.inherit must be a list of strings, got 'head'"),
    ({"pretrain.lr": "x"}, "pretrain.lr must be a positive number, got 'x'"),
]


@pytest.mark.parametrize("override,message", CASES, ids=[next(iter(c[0])) + "=" + repr(next(iter(c[0].values())))
                                                          for c in CASES])
def test_wrong_type_or_range_is_one_line(override: dict, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_recipe("digits", override)
    text = str(err.value)
    assert message in text and "\n" not in text


def test_role_override_names_the_role_key() -> None:
    recipe = load_recipe("digits", {"teacher.train": {"lr": "slow"}})
    with pytest.raises(ConfigError, match=r"teacher\.train\.lr must be a positive number, got 'slow'"):
        role_train(recipe, "teacher")


def test_pipeline_section_is_typed() -> None:
    from kdcompress.pipeline import PipelineOptions

    with pytest.raises(ConfigError, match=r"pipeline\.verify_images must be a whole number >= 1, got 'all'"):
        PipelineOptions.from_recipe(load_recipe("digits", {"pipeline.verify_images": "all"}))
    with pytest.raises(ConfigError, match=r"pipeline\.target must be a string or null, got 3"):
        PipelineOptions.from_recipe(load_recipe("digits", {"pipeline.target": 3}))
    with pytest.raises(ConfigError, match=r"Unknown target 'nowhere'"):
        PipelineOptions.from_recipe(load_recipe("digits", {"pipeline.target": "nowhere"}))
    with pytest.raises(ConfigError, match=r"pipeline\.min_miou must be a fraction in \[0, 1\], got 55"):
        PipelineOptions.from_recipe(load_recipe("digits", {"pipeline.min_miou": 55}))
    with pytest.raises(ConfigError, match=r"Unknown key 'pipeline\.nope'"):
        PipelineOptions.from_recipe(load_recipe("digits", {"pipeline.nope": 1}))


def test_valid_values_still_load() -> None:
    r = load_recipe("digits", {"train.lr": 1, "data.crop_size": [48, 64], "student.output_stride": 8,
                               "train.grad_clip": None})
    assert r.train.lr == 1 and r.data.crop_size == [48, 64]


def test_target_section_must_be_a_mapping(tmp_path: Path) -> None:
    p = tmp_path / "t.yaml"
    p.write_text(yaml.safe_dump({"name": "t", "profile": ["cpu"]}))
    with pytest.raises(ConfigError, match="profile in target .* must be a mapping"):
        load_target(str(p))
    p.write_text(yaml.safe_dump({"name": "t", "profile": {"cores": 2}}))
    with pytest.raises(ConfigError, match=r"Unknown key 'profile\.cores' in target"):
        load_target(str(p))
