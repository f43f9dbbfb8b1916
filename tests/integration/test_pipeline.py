"""`kdcompress pipeline` end to end on tiny data: artifacts, report, re-run skipping, gates, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests.integration.cli_helpers import run_cli
from tests.integration.conftest import TINY


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A finished tiny pipeline run: every test below starts from it, in any order or alone."""
    from kdcompress.config import load_recipe
    from kdcompress.pipeline import run_pipeline

    root = tmp_path_factory.mktemp("pipe")
    recipe = dict(TINY, distill={"method": "attnfd"},
                  pipeline={"calib_images": 4, "verify_images": 2, "profile_iters": 3})
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump(recipe))
    run_pipeline(load_recipe(str(path)), root / "run", progress=False)
    return path, root / "run"


def test_pipeline_end_to_end_then_skips(pipeline_run: tuple[Path, Path], capsys: pytest.CaptureFixture) -> None:
    recipe, out = pipeline_run
    for rel in ("teacher/model.pt", "student-none/model.pt", "student/model.pt", "artifacts/student.onnx",
                "artifacts/student.onnx.json", "artifacts/student.int8.onnx", "artifacts/student.int8.onnx.json",
                "report.json", "report.md", "recipe.yaml", "plots/training_curves.png", "plots/per_class_iou.png",
                "plots/latency.png"):
        assert (out / rel).is_file(), rel
    report = json.loads((out / "report.json").read_text())
    assert list(report["evaluation"]) == ["teacher", "baseline", "student"]  # role ids; labels for display only
    assert report["labels"]["baseline"] == "student (plain)" and report["task"] == "segmentation"
    assert report["exports"]["onnx"]["parity"]["argmax_agreement"] >= 0.999
    assert [r["label"] for r in report["profile"]][-2:] == ["student/onnx", "student/ort-int8"]
    # one evaluation path: the evaluate stage and the export's PyTorch reference score the same images
    ev, onnx_rec = report["evaluation"]["student"], report["exports"]["onnx"]
    assert ev["images"] == onnx_rec["parity"]["eval_images"] == 8
    assert ev["mIoU"] == pytest.approx(onnx_rec["metric_torch"], abs=1e-6)
    assert report["profile"][0]["input_size"] == [48, 48]  # the export size (digits: the scenes' own size)
    md = (out / "report.md").read_text()
    assert "## Exports" in md and "## Efficiency" in md and "![latency]" in md

    res = run_cli(capsys, "pipeline", recipe, "--out", out, "--no-progress")
    assert res.code == 0
    assert res.err.count("up to date, skipped") == 6

    # a damaged output is detected and its stage runs again
    (out / "artifacts" / "student.int8.onnx").unlink()
    res = run_cli(capsys, "pipeline", recipe, "--out", out, "--no-progress")
    assert res.code == 0 and "export: recorded outputs failed their check" in res.err
    assert (out / "artifacts" / "student.int8.onnx").is_file()


def test_gates_fail_with_distinct_exit_code(pipeline_run: tuple[Path, Path], capsys: pytest.CaptureFixture) -> None:
    recipe, out = pipeline_run
    res = run_cli(capsys, "pipeline", recipe, "--out", out, "--no-progress", "--min-miou", "0.99")
    assert res.code == 3, res.err
    assert "Gate 'min_miou' failed" in res.err
    res = run_cli(capsys, "pipeline", recipe, "--out", out, "--no-progress", "--max-latency-ms", "0.0001")
    assert res.code == 3 and "Gate 'max_latency_ms' failed" in res.err
    res = run_cli(capsys, "pipeline", recipe, "--out", out, "--no-progress", "--max-export-drop", "1.0",
                  "--min-fps", "0.001")
    assert res.code == 0, res.err
    gates = json.loads((out / "report.json").read_text())["gates"]
    assert {g["gate"] for g in gates} == {"max_export_drop", "min_fps"} and all(g["passed"] for g in gates)


def test_pipeline_bad_input(pipeline_run: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    recipe, out = pipeline_run
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(dict(TINY, pipeline={"exprt": ["onnx"]})))
    res = run_cli(capsys, "pipeline", bad, "--out", tmp_path / "r")
    assert res.code == 2 and "pipeline.exprt" in res.err
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump(dict(TINY, name="other")))
    res = run_cli(capsys, "pipeline", other, "--out", out)
    assert res.code == 2 and "another recipe" in res.err and "--force" in res.err
    (tmp_path / "notrun").mkdir()
    (tmp_path / "notrun" / "x.txt").write_text("mine")
    res = run_cli(capsys, "pipeline", other, "--out", tmp_path / "notrun")
    assert res.code == 2 and "not a pipeline run" in res.err
    assert (tmp_path / "notrun" / "x.txt").read_text() == "mine"


def test_pipeline_target_preset(pipeline_run: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """pipeline.target adds the preset's artifact, verified with the preset's tolerances; gates can read it."""
    import shutil

    recipe, src = pipeline_run
    out = tmp_path / "run"
    shutil.copytree(src, out)  # the shared run stays as it was for the other tests
    res = run_cli(capsys, "pipeline", recipe, "--out", out, "--no-progress", "--resume",
                  "--set", "pipeline.target=cpu-ort-int8", "--set", "pipeline.gate_artifact=target", "--min-fps", "0.001")
    assert res.code == 0, res.err
    report = json.loads((out / "report.json").read_text())
    rec = report["exports"]["target"]
    assert Path(rec["artifact"]).name == "cpu-ort-int8.int8.onnx" and rec["precision"] == "int8"
    assert rec["parity"]["tolerances"] == {"max_abs": None, "min_argmax_agreement": 0.95, "max_miou_drop": 0.03}
    assert [g["what"] for g in report["gates"]] == ["FPS of student target"]
    bad = run_cli(capsys, "pipeline", recipe, "--out", tmp_path / "r2", "--set", "pipeline.target=nowhere")
    assert bad.code == 2 and "Unknown target 'nowhere'" in bad.err and not (tmp_path / "r2").exists()
