"""Detection end to end on tiny data: train, distil at the FPN levels with every feature method,
evaluate (COCO mAP), and the one-line refusals of mixed-up tasks and levels."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests.integration.cli_helpers import run_cli

TINY_DET = {
    "name": "tiny-det",
    "data": {"name": "digits-det", "resize": [64, 64], "scale_range": [0.9, 1.1], "flip": False,
             "val_batch_size": 4, "options": {"image_size": 64, "num_train": 16, "num_val": 4, "max_digits": 3}},
    "train": {"steps": 3, "batch_size": 4, "optimizer": "adamw", "lr": 0.001, "schedule": "onecycle",
              "seed": 0, "device": "cpu"},
    "teacher": {"model": "retinanet-r18"},
    "student": {"model": "retinanet-mbv3"},
    "distill": {"method": "none"},
}


@pytest.fixture(scope="module")
def det_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One tiny teacher (and the recipe) shared by the module's tests."""
    from kdcompress.config import load_recipe
    from kdcompress.engine.trainer import train

    root = tmp_path_factory.mktemp("det")
    recipe_path = root / "tiny-det.yaml"
    recipe_path.write_text(yaml.safe_dump(TINY_DET))
    teacher = train(load_recipe(str(recipe_path)), "teacher", root / "teacher", progress=False)
    return {"recipe": recipe_path, "teacher": teacher.model_path, "root": root}


@pytest.mark.parametrize("method", ["mse", "attnfd", "acam", "cankd"])
def test_distill_every_feature_method_on_fpn_levels(capsys, det_runs, method: str) -> None:
    out = det_runs["root"] / f"student-{method}"
    r = run_cli(capsys, "distill", "-r", det_runs["recipe"], "--method", method, "--teacher", det_runs["teacher"],
                "--out", out, "--steps", "2", "--no-progress")
    assert r.code == 0, r.err
    assert "mAP" in r.out.replace("\n", " ")
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["resolved"]["taps"] == ["p3", "p4", "p5", "p6"]  # the detector's default levels
    log = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    ratios = [e["grad_ratio"] for e in log if "grad_ratio" in e]
    assert ratios and all(r is not None and r > 0 for r in ratios), "the distillation gradient never reached the taps"


def test_evaluate_reports_coco_map(capsys, det_runs) -> None:
    r = run_cli(capsys, "evaluate", det_runs["teacher"], "--json")
    assert r.code == 0, r.err
    rep = json.loads(r.out)
    assert rep["task"] == "detection" and rep["images"] == 4
    for key in ("mAP", "AP50", "AP75", "APs", "APm", "APl", "per_class_AP"):
        assert key in rep
    assert 0.0 <= rep["mAP"] <= 1.0
    assert set(rep["per_class_AP"]) == {str(d) for d in range(10)}


def test_logit_kd_refused_for_detectors(capsys, det_runs) -> None:
    r = run_cli(capsys, "distill", "-r", det_runs["recipe"], "--method", "kd", "--teacher", det_runs["teacher"],
                "--out", det_runs["root"] / "kd", "--steps", "1", "--no-progress")
    assert r.code == 2
    assert "logits" in r.err and "Traceback" not in r.err
    assert not (det_runs["root"] / "kd").exists()


def test_student_levels_must_match_teacher_taps(capsys, det_runs) -> None:
    r = run_cli(capsys, "distill", "-r", det_runs["recipe"], "--method", "mse", "--teacher", det_runs["teacher"],
                "--taps", "p2", "--out", det_runs["root"] / "p2", "--steps", "1", "--no-progress")
    assert r.code == 2 and "p2" in r.err and "p3" in r.err  # names the tap and the valid levels
    assert not (det_runs["root"] / "p2").exists()


def test_tasks_do_not_mix(capsys, det_runs, tiny_recipe) -> None:
    r = run_cli(capsys, "evaluate", det_runs["teacher"], "--data", "digits")
    assert r.code == 2 and "detection checkpoint" in r.err and "segmentation dataset" in r.err
    seg = det_runs["root"] / "seg"
    assert run_cli(capsys, "train", "-r", tiny_recipe, "--out", seg, "--steps", "1", "--no-progress").code == 0
    r = run_cli(capsys, "evaluate", seg / "model.pt", "--data", "digits-det")
    assert r.code == 2 and "segmentation checkpoint" in r.err
    r = run_cli(capsys, "distill", "-r", det_runs["recipe"], "--method", "mse", "--teacher", seg / "model.pt",
                "--out", det_runs["root"] / "mixed", "--steps", "1", "--no-progress")
    assert r.code == 2 and "segmentation checkpoint" in r.err
    assert not (det_runs["root"] / "mixed").exists()


def test_export_with_nms_verified_and_failed_export_keeps_the_good_file(capsys, det_runs) -> None:
    import hashlib

    import torch

    from kdcompress.engine.checkpoint import load_model, save_model_checkpoint

    # A tiny detector barely above its score threshold says nothing about parity: sharpen its class scores
    # so the verified boxes are real (a few per image), as a trained detector's are.
    model, meta = load_model(det_runs["teacher"])
    with torch.no_grad():
        cls = model.detector.head.classification_head.cls_logits
        cls.weight.mul_(5.0)
        cls.bias.copy_(torch.linspace(-3.0, 1.0, cls.bias.numel()))
    ckpt = det_runs["root"] / "sharp" / "model.pt"
    ckpt.parent.mkdir()
    save_model_checkpoint(ckpt, model, meta)
    onnx_path = ckpt.with_name("model.onnx")
    r = run_cli(capsys, "export", ckpt, "--to", "onnx", "--json")
    assert r.code == 0, r.err
    res = json.loads(r.out)
    par = res["parity"]
    assert res["metric"] == "mAP" and par["passed"] and par["reference_boxes"] > 0 and par["box_match"] == 1.0
    assert abs(res["drop"]) <= 0.005
    import onnx

    assert "NonMaxSuppression" in {n.op_type for n in onnx.load(str(onnx_path)).graph.node}
    before = hashlib.sha256(onnx_path.read_bytes()).hexdigest()
    r = run_cli(capsys, "export", ckpt, "--to", "onnx", "--dynamic-batch")
    assert r.code == 2 and "static shapes" in r.err
    r = run_cli(capsys, "export", ckpt, "--to", "onnx", "--max-abs", "0.1")  # a segmentation tolerance
    assert r.code == 2 and "max_abs" in r.err and "min_box_match" in r.err
    assert hashlib.sha256(onnx_path.read_bytes()).hexdigest() == before
    # ORT INT8: only the backbone + heads are quantised (Conv/Gemm/MatMul); decoding and NMS stay fp32
    r = run_cli(capsys, "export", ckpt, "--to", "ort-int8", "--calib-images", "4", "--json")
    assert r.code == 0, r.err
    res = json.loads(r.out)
    assert res["metric"] == "mAP" and res["drop"] is not None and res["parity"]["reference_boxes"] > 0
    graph = onnx.load(str(ckpt.with_name("model.int8.onnx"))).graph
    ops = {n.op_type for n in graph.node}
    assert "QuantizeLinear" in ops and "NonMaxSuppression" in ops
    quantised_inputs = {i for n in graph.node if n.op_type == "DequantizeLinear" for i in n.output}
    nms = next(n for n in graph.node if n.op_type == "NonMaxSuppression")
    assert not quantised_inputs & set(nms.input), "NMS must read fp32 boxes and scores"


def test_grad_balance_sets_the_first_step_gradient_ratio(capsys, det_runs) -> None:
    out = det_runs["root"] / "balanced"
    r = run_cli(capsys, "distill", "-r", det_runs["recipe"], "--method", "mse", "--teacher", det_runs["teacher"],
                "--out", out, "--steps", "2", "--no-progress", "--set", "distill.grad_balance=0.5")
    assert r.code == 0, r.err
    log = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    scale = next(e for e in log if "distill_scale" in e)
    assert scale["grad_ratio_unscaled"] > 0 and scale["distill_scale"] == pytest.approx(0.5 / scale["grad_ratio_unscaled"])
    first = next(e for e in log if "grad_ratio" in e)
    assert first["step"] == 0 and first["grad_ratio"] == pytest.approx(0.5)
    r = run_cli(capsys, "distill", "-r", det_runs["recipe"], "--method", "mse", "--teacher", det_runs["teacher"],
                "--out", det_runs["root"] / "bad-balance", "--steps", "1", "--set", "distill.grad_balance=-1")
    assert r.code == 2 and "grad_balance" in r.err
