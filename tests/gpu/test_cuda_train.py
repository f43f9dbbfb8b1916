"""CUDA paths of the trainer: AMP training and distillation on a GPU (skipped without CUDA)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.integration.conftest import TINY


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["none", "acam", "cankd"])
def test_amp_training_on_cuda(method: str, tmp_path: Path) -> None:
    from kdcompress.config import load_recipe
    from kdcompress.engine.checkpoint import load_model_checkpoint
    from kdcompress.engine.trainer import train

    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(dict(TINY, train=dict(TINY["train"], device="cuda", amp=True))))
    teacher = train(load_recipe(str(path)), "teacher", tmp_path / "t", progress=False)
    recipe = load_recipe(str(path), {"distill.method": method, "distill.teacher_checkpoint": str(teacher.model_path)})
    res = train(recipe, "student", tmp_path / "s", progress=False)
    meta = load_model_checkpoint(res.model_path)["meta"]
    assert meta["step"] == TINY["train"]["steps"] and 0.0 <= res.metrics["mIoU"] <= 1.0
