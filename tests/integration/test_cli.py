"""CLI end to end on tiny data: train -> evaluate, zoo listing, and one-line errors for bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kdcompress.data.fixtures import write_voc_fixture
from tests.integration.cli_helpers import run_cli


def one_line_error(res, *needles: str) -> None:
    assert res.code == 2, (res.code, res.out, res.err)
    first = res.err.strip().splitlines()[0]
    assert first.startswith("error:"), res.err
    for n in needles:
        assert n in res.err, (n, res.err)
    assert "Traceback" not in res.err


def test_train_then_evaluate(tiny_recipe: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "teacher"
    res = run_cli(capsys, "train", "-r", tiny_recipe, "--role", "teacher", "--out", out, "--no-progress")
    assert res.code == 0, res.err
    assert (out / "model.pt").is_file() and (out / "config.yaml").is_file()
    res = run_cli(capsys, "evaluate", out / "model.pt", "--json")
    assert res.code == 0, res.err
    report = json.loads(res.out)
    assert set(report) >= {"mIoU", "aAcc", "mAcc", "per_class_iou"}
    assert len(report["per_class_iou"]) == 11 and report["images"] == 8
    res = run_cli(capsys, "evaluate", out / "model.pt", "--no-progress")
    assert res.code == 0 and "mIoU" in res.out and "background" in res.out

    # student via backbone shorthand resolved against the recipe's teacher head
    res = run_cli(capsys, "train", "-r", tiny_recipe, "--role", "student", "-m", "mbv2", "--out", tmp_path / "s",
                  "--steps", "2", "--no-progress")
    assert res.code == 0, res.err
    saved = (tmp_path / "s" / "config.yaml").read_text()
    assert "deeplabv3plus-mbv2" in saved and "steps: 2" in saved

    # class-count mismatch between checkpoint and dataset
    voc = write_voc_fixture(tmp_path / "voc")
    one_line_error(run_cli(capsys, "evaluate", out / "model.pt", "--data", "voc", "--data-root", voc),
                   "11 classes", "21")


def test_bad_inputs_are_one_line(tiny_recipe: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    one_line_error(run_cli(capsys, "train", "-r", tiny_recipe, "-m", "deeplabv3plus-mbv3", "--out", tmp_path / "x"),
                   "Unknown model", "deeplabv3plus-mbv2")
    one_line_error(run_cli(capsys, "train", "-r", tiny_recipe, "--data", "voc", "--data-root", tmp_path / "nope",
                           "--out", tmp_path / "y"), "does not exist")
    assert not (tmp_path / "y" / "model.pt").exists()
    (tmp_path / "empty").mkdir()
    one_line_error(run_cli(capsys, "train", "-r", tiny_recipe, "--data", "voc", "--data-root", tmp_path / "empty",
                           "--out", tmp_path / "z"), "is empty")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x00" * 100)
    one_line_error(run_cli(capsys, "evaluate", bad), "corrupt")
    one_line_error(run_cli(capsys, "train", "-r", tiny_recipe, "--set", "train.nope=1"), "'train.nope'")
    one_line_error(run_cli(capsys, "train", "-r", "no-such-recipe"), "Unknown recipe", "digits")
    blocker = tmp_path / "file"
    blocker.write_text("")
    one_line_error(run_cli(capsys, "train", "-r", tiny_recipe, "--out", blocker / "run"), "not writable")


def test_models_and_taps(capsys: pytest.CaptureFixture) -> None:
    res = run_cli(capsys, "models", "--json")
    assert res.code == 0
    rows = {r["name"]: r["params"] for r in json.loads(res.out)}
    assert rows["deeplabv3plus-r101"] == 59_344_309
    res = run_cli(capsys, "taps", "deeplabv3plus-r18", "--input-size", "64x96", "--json")
    taps = {r["tap"]: r for r in json.loads(res.out)}
    assert taps["decoder"]["shape"] == [1, 256, 16, 24] and taps["backbone"]["stride"] == 16
