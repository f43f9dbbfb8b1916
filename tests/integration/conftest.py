"""Tiny recipes for end-to-end tests: 48 px digits, a handful of steps."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

TINY = {
    "name": "tiny",
    "data": {"name": "digits", "crop_size": [48, 48], "scale_range": [0.75, 1.25], "val_batch_size": 8,
             "options": {"image_size": 48, "num_train": 24, "num_val": 8, "max_digits": 3}},
    "train": {"steps": 4, "batch_size": 4, "optimizer": "adamw", "lr": 0.001, "schedule": "onecycle",
              "seed": 0, "device": "cpu"},
    "teacher": {"model": "deeplabv3plus-r18"},
    "student": {"model": "deeplabv3plus-mbv2"},
    "distill": {"method": "none"},
}


@pytest.fixture
def tiny_recipe(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY))
    return path
