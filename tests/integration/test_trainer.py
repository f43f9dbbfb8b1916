"""Trainer: resume equals uninterrupted, determinism, bad inputs, non-finite loss."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kdcompress.config import load_recipe
from kdcompress.engine.checkpoint import load_model_checkpoint, load_state
from kdcompress.engine.trainer import TrainingInterrupted, train
from kdcompress.errors import ConfigError, KdError, NonFiniteLossError


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_model_checkpoint(path)["state_dict"]


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_interrupted_and_resumed_equals_uninterrupted(tiny_recipe: Path, tmp_path: Path) -> None:
    sets = {"train.steps": 6, "train.ckpt_every": 3, "data.scale_range": [0.5, 2.0]}
    full = train(load_recipe(str(tiny_recipe), dict(sets)), "student", tmp_path / "full", progress=False)

    def interrupt(step: int, _logs: dict) -> None:
        if step == 5:  # after the checkpoint at step 3
            raise KeyboardInterrupt

    with pytest.raises(TrainingInterrupted, match=r"Interrupted at step 5/6; last checkpoint: .*model.pt at step 3\. "
                                                   r"Continue with the same command plus --resume"):
        train(load_recipe(str(tiny_recipe), dict(sets)), "student", tmp_path / "cut", progress=False, on_step=interrupt)
    assert load_state(tmp_path / "cut" / "state.pt")["step"] == 3
    resumed = train(load_recipe(str(tiny_recipe), dict(sets)), "student", tmp_path / "cut", resume=True, progress=False)
    assert resumed.step == full.step == 6
    assert same(weights(full.model_path), weights(resumed.model_path))
    assert resumed.metrics["mIoU"] == pytest.approx(full.metrics["mIoU"])


def test_seeded_runs_are_deterministic_and_seed_matters(tiny_recipe: Path, tmp_path: Path) -> None:
    a = train(load_recipe(str(tiny_recipe)), "student", tmp_path / "a", progress=False)
    b = train(load_recipe(str(tiny_recipe)), "student", tmp_path / "b", progress=False)
    c = train(load_recipe(str(tiny_recipe), {"train.seed": 1}), "student", tmp_path / "c", progress=False)
    assert same(weights(a.model_path), weights(b.model_path))
    assert not same(weights(a.model_path), weights(c.model_path))


def test_outputs_and_metadata(tiny_recipe: Path, tmp_path: Path) -> None:
    res = train(load_recipe(str(tiny_recipe)), "teacher", tmp_path / "t", progress=False)
    names = sorted(p.name for p in (tmp_path / "t").iterdir())
    assert names == ["config.yaml", "metrics.jsonl", "model.pt", "state.pt"]
    ck = load_model_checkpoint(res.model_path)
    meta = ck["meta"]
    assert meta["arch"] == "deeplabv3plus-r18" and meta["num_classes"] == 11 and meta["role"] == "teacher"
    assert meta["input_size"] == [48, 48] and len(meta["class_names"]) == 11
    assert not any(k.startswith("student.") or k.startswith("method.") for k in ck["state_dict"])
    assert 0.0 <= res.metrics["mIoU"] <= 1.0


def test_existing_run_folder_is_refused(tiny_recipe: Path, tmp_path: Path) -> None:
    train(load_recipe(str(tiny_recipe), {"train.steps": 1}), "student", tmp_path / "r", progress=False)
    with pytest.raises(KdError, match="already holds a run.*--resume"):
        train(load_recipe(str(tiny_recipe), {"train.steps": 1}), "student", tmp_path / "r", progress=False)
    with pytest.raises(KdError, match="Nothing to resume"):
        train(load_recipe(str(tiny_recipe)), "student", tmp_path / "empty", resume=True, progress=False)


def test_non_finite_loss_stops_with_step_and_term(tiny_recipe: Path, tmp_path: Path) -> None:
    recipe = load_recipe(str(tiny_recipe), {"train.steps": 6, "train.ckpt_every": 2, "train.lr": 1e30,
                                            "train.optimizer": "sgd", "train.schedule": "poly"})
    with pytest.raises(NonFiniteLossError, match=r"Loss term 'task' became non-finite at step \d+"):
        train(recipe, "student", tmp_path / "nan", progress=False)


def test_unknown_recipe_keys_and_values(tiny_recipe: Path) -> None:
    with pytest.raises(ConfigError, match="'train.lrr'"):
        load_recipe(str(tiny_recipe), {"train.lrr": 0.1})
    with pytest.raises(ConfigError, match="schedule"):
        load_recipe(str(tiny_recipe), {"train.schedule": "steps"})
    with pytest.raises(ConfigError, match="milestones"):
        load_recipe(str(tiny_recipe), {"train.schedule": "step", "train.milestones": [0.9, 0.5]})
