"""Fault cases of training: bad input never costs a good run; resume only what matches."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kdcompress.config import load_recipe
from kdcompress.engine.trainer import train
from tests.integration.cli_helpers import run_cli


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def one_line(res, needle: str, code: int = 2) -> None:
    assert res.code == code, (res.code, res.err)
    assert res.err.strip().splitlines()[0].startswith("error:") and needle in res.err, res.err
    assert "Traceback" not in res.err


@pytest.fixture
def finished(tiny_recipe: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    train(load_recipe(str(tiny_recipe), {"train.steps": 2, "train.ckpt_every": 1}), "student", out, progress=False)
    return out


def test_force_with_a_bad_option_keeps_the_good_run(finished: Path, tiny_recipe: Path,
                                                   capsys: pytest.CaptureFixture) -> None:
    before = snapshot(finished)
    for bad in (["--set", "train.lr=fast"], ["--set", "train.optimizer=adam"], ["--set", "data.name=nope"],
                ["--set", "student.model=deeplabv3plus-r999"], ["--pretrained", "/nope.pth"],
                ["--set", "train.steps=ten"]):
        res = run_cli(capsys, "train", "-r", tiny_recipe, "--role", "student", "--out", finished, "--force",
                      "--no-progress", *bad)
        assert res.code == 2 and "Traceback" not in res.err, (bad, res.err)
        assert snapshot(finished) == before, bad


def test_resume_with_changed_settings_is_refused_before_writing(finished: Path, tiny_recipe: Path,
                                                               capsys: pytest.CaptureFixture) -> None:
    before = snapshot(finished)
    res = run_cli(capsys, "train", "-r", tiny_recipe, "--role", "student", "--out", finished, "--resume",
                  "--lr", "0.5", "--steps", "3", "--no-progress")
    one_line(res, "train.lr (0.001 -> 0.5)")
    res = run_cli(capsys, "train", "-r", tiny_recipe, "--role", "student", "--out", finished, "--resume",
                  "--batch-size", "2", "--steps", "3", "--no-progress")
    one_line(res, "train.batch_size")
    assert snapshot(finished) == before
    # extending the schedule is allowed, and the log keeps one line per step
    res = run_cli(capsys, "train", "-r", tiny_recipe, "--role", "student", "--out", finished, "--resume",
                  "--steps", "3", "--no-progress")
    assert res.code == 0, res.err


def test_resume_trims_the_log_to_the_resumed_step(tiny_recipe: Path, tmp_path: Path) -> None:
    out = tmp_path / "r"
    sets = {"train.steps": 20, "train.ckpt_every": 10}

    def stop(step: int, _logs: dict) -> None:
        if step == 15:
            raise KeyboardInterrupt

    with pytest.raises(Exception, match="Interrupted at step 15/20"):
        train(load_recipe(str(tiny_recipe), dict(sets)), "student", out, progress=False, on_step=stop)
    train(load_recipe(str(tiny_recipe), dict(sets)), "student", out, resume=True, progress=False)
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()
             if "task" in json.loads(x)]
    assert steps == [10, 20]  # the step-10 line once, no duplicate from the interrupted segment


def test_folder_without_checkpoint_counts_as_empty_and_temp_files_are_swept(tiny_recipe: Path,
                                                                           tmp_path: Path) -> None:
    out = tmp_path / "left"
    out.mkdir()
    (out / "config.yaml").write_text("left by a failed run\n")
    (out / ".model.pt.abc123.tmp").write_bytes(b"half a file")
    train(load_recipe(str(tiny_recipe), {"train.steps": 1}), "student", out, progress=False)
    assert (out / "model.pt").is_file() and not list(out.glob(".*.tmp"))


def test_out_pointing_at_a_file(tiny_recipe: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    f = tmp_path / "file.txt"
    f.write_text("keep me")
    res = run_cli(capsys, "train", "-r", tiny_recipe, "--out", f, "--no-progress")
    one_line(res, "is a file, not a folder")
    assert f.read_text() == "keep me"


@pytest.mark.parametrize("args, needle", [
    (["train", "--role", "foo"], "--role must be teacher or student"),
    (["train", "--set", "train.lr=fast"], "train.lr must be a positive number, got 'fast'"),
    (["train", "--set", "train.steps=ten"], "train.steps must be a whole number"),
])
def test_bad_values_are_one_line(args: list[str], needle: str, tiny_recipe: Path, tmp_path: Path,
                                 capsys: pytest.CaptureFixture) -> None:
    res = run_cli(capsys, *args, "-r", tiny_recipe, "--out", tmp_path / "x", "--no-progress")
    one_line(res, needle)
    assert not (tmp_path / "x").exists()


def test_error_printer_escapes_markup(capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    from kdcompress.errors import MissingDependencyError
    import kdcompress.cli.app as app_mod

    def boom() -> None:
        raise MissingDependencyError("TensorRT is not installed: pip install 'kdcompress[tensorrt]'")

    monkeypatch.setattr(app_mod, "app", boom)
    from tests.integration.cli_helpers import run_cli as rc

    res = rc(capsys, "models")
    assert res.code == 4 and "pip install 'kdcompress[tensorrt]'" in res.err


def test_checkpoint_damaged_in_place_is_refused(finished: Path, capsys: pytest.CaptureFixture) -> None:
    ckpt = finished / "model.pt"
    data = bytearray(ckpt.read_bytes())
    mid = len(data) // 2
    data[mid:mid + 4096] = bytes(4096)  # still a valid zip: only the CRCs tell
    ckpt.write_bytes(bytes(data))
    res = run_cli(capsys, "evaluate", ckpt)
    one_line(res, "fails its CRC check")


def test_disk_full_is_one_line_and_keeps_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    from kdcompress.engine.checkpoint import atomic_write_text
    from kdcompress.errors import KdError

    target = tmp_path / "config.yaml"
    target.write_text("old\n")

    def full(_tmp: Path) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    from kdcompress.engine import checkpoint

    with pytest.raises(KdError, match=r"Cannot write .*No space left on device \(\d+ MiB free there\)"):
        checkpoint.atomic_write(target, full)
    assert target.read_text() == "old\n" and not list(tmp_path.glob(".*.tmp"))
    atomic_write_text(target, "new\n")
    assert target.read_text() == "new\n"


def test_progress_in_a_log_is_plain_periodic_lines(tiny_recipe: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture) -> None:
    train(load_recipe(str(tiny_recipe), {"train.steps": 20, "train.log_every": 10}), "student", tmp_path / "p",
          progress=True)
    lines = [x for x in capsys.readouterr().out.splitlines() if ": step " in x]
    assert [x.split(": step ")[1].split()[0] for x in lines] == ["10/20", "20/20"]
    assert all("task" in x and "img/s" in x and "ETA" in x for x in lines)


def test_pipeline_with_a_bad_recipe_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import yaml

    from tests.integration.conftest import TINY

    recipe = tmp_path / "bad.yaml"
    recipe.write_text(yaml.safe_dump(dict(TINY, distill={"method": "acamm"})))
    out = tmp_path / "run"
    res = run_cli(capsys, "pipeline", recipe, "--out", out, "--no-progress")
    one_line(res, "Did you mean 'acam'")
    assert not out.exists()


def test_corrupt_onnx_given_to_profile(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not an onnx model")
    res = run_cli(capsys, "profile", bad, "--input-size", "32x32")
    one_line(res, "is not a valid ONNX file")


def test_worker_error_arrives_as_its_one_line() -> None:
    from kdcompress.engine.trainer import worker_message

    wrapped = ("Caught DataError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
               '  File "x.py", line 1, in f\n    raise DataError(msg)\n'
               "kdcompress.errors.DataError: Label 'a.png' has values 40 outside 0..10; fix the file\n")
    assert worker_message(wrapped) == "Label 'a.png' has values 40 outside 0..10; fix the file"
    assert worker_message("plain message") == "plain message"
