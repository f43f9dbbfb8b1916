"""`kdcompress distill` end to end for every method, and its bad inputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from kdcompress.engine.checkpoint import load_model_checkpoint, load_state
from tests.integration.cli_helpers import run_cli
from tests.integration.conftest import TINY


@pytest.fixture(scope="module")
def teacher(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("distill")
    recipe = root / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(dict(TINY, train=dict(TINY["train"], steps=3))))
    from kdcompress.config import load_recipe
    from kdcompress.engine.trainer import train

    res = train(load_recipe(str(recipe)), "teacher", root / "teacher", progress=False)
    return recipe, res.model_path


@pytest.mark.parametrize("method", ["attnfd", "acam", "cankd", "kd", "mse", "none"])
def test_distill_every_method(method: str, teacher: tuple[Path, Path], tmp_path: Path,
                              capsys: pytest.CaptureFixture) -> None:
    recipe, ckpt = teacher
    out = tmp_path / method
    res = run_cli(capsys, "distill", "-r", recipe, "--teacher", ckpt, "--student", "mbv2", "--method", method,
                  "--out", out, "--steps", "2", "--no-progress")
    assert res.code == 0, res.err
    model = load_model_checkpoint(out / "model.pt")
    assert model["meta"]["arch"] == "deeplabv3plus-mbv2" and model["meta"]["method"] == method
    assert all(not k.startswith(("method.", "student.", "teacher")) for k in model["state_dict"])
    state = load_state(out / "state.pt")
    has_method_state = any(k.startswith("method.") for k in state["task"])
    assert has_method_state == (method in ("attnfd", "acam", "cankd", "mse"))
    ev = run_cli(capsys, "evaluate", out / "model.pt", "--json")
    assert ev.code == 0 and 0.0 <= json.loads(ev.out)["mIoU"] <= 1.0
    log = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    terms = {k for e in log for k in e} - {"step", "lr", "img_s", "val"}
    expected = {"attnfd": {"attn"}, "acam": {"acam_c", "acam_s", "acam_div"}, "cankd": {"can"}, "kd": {"kd"},
                "mse": {"mse"}, "none": set()}[method]
    assert terms == {"task"} | expected


def test_taps_and_hparams_from_cli(teacher: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    recipe, ckpt = teacher
    res = run_cli(capsys, "distill", "-r", recipe, "-t", ckpt, "-s", "mbv2", "--method", "attnfd", "--taps",
                  "encoder,decoder", "--set", "method.alpha=10", "--out", tmp_path / "a", "--steps", "1", "--no-progress")
    assert res.code == 0, res.err
    cfg = yaml.safe_load((tmp_path / "a" / "config.yaml").read_text())
    assert cfg["resolved"]["taps"] == ["encoder", "decoder"] and cfg["distill"]["hparams"] == {"alpha": 10}


def errors(res, *needles: str) -> None:
    assert res.code == 2, (res.code, res.err)
    assert res.err.startswith("error:") and "Traceback" not in res.err
    for n in needles:
        assert n in res.err, (n, res.err)


def test_distill_bad_inputs(teacher: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    recipe, ckpt = teacher
    base = ["distill", "-r", recipe, "-s", "mbv2", "--steps", "1", "--no-progress"]
    errors(run_cli(capsys, *base, "-t", ckpt, "--method", "acamm", "--out", tmp_path / "1"),
           "Unknown method 'acamm'", "attnfd")
    errors(run_cli(capsys, *base, "-t", ckpt, "--method", "attnfd", "--taps", "decodr", "--out", tmp_path / "2"),
           "Unknown tap 'decodr'", "decoder")
    errors(run_cli(capsys, *base, "-t", ckpt.parent / "state.pt", "--method", "kd", "--out", tmp_path / "3"),
           "resumable training state")
    errors(run_cli(capsys, *base, "-t", ckpt, "--method", "kd", "--set", "method.tau=3", "--out", tmp_path / "4"),
           "'tau'")
    # a teacher trained for another class count
    obj = torch.load(ckpt, weights_only=True)
    obj["meta"]["num_classes"] = 21
    obj["state_dict"] = {k: (torch.zeros(21, *v.shape[1:]) if k.startswith("head.classifier") else v)
                         for k, v in obj["state_dict"].items()}
    torch.save(obj, tmp_path / "t21.pt")
    errors(run_cli(capsys, *base, "-t", tmp_path / "t21.pt", "--method", "kd", "--out", tmp_path / "5"),
           "21 classes", "11")
    for i in range(1, 6):
        assert not (tmp_path / str(i) / "model.pt").exists()


def test_non_finite_distillation_term_stops(teacher: tuple[Path, Path], tmp_path: Path,
                                            capsys: pytest.CaptureFixture) -> None:
    recipe, ckpt = teacher
    res = run_cli(capsys, "distill", "-r", recipe, "-t", ckpt, "-s", "mbv2", "--method", "mse", "--steps", "2",
                  "--set", "method.weight=1e39", "--out", tmp_path / "nan", "--no-progress")
    assert res.code == 2 and "Loss term 'mse' became non-finite at step 1" in res.err
    assert not (tmp_path / "nan" / "model.pt").exists()
