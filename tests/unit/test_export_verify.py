"""The segmentation task's parity and tolerances, failure messages, metrics of a runner through the one
evaluation path, cleanup guard."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from kdcompress.errors import ExportError, KdError
from kdcompress.engine.evaluate import Resized, select_indices
from kdcompress.export.verify import ArtifactGuard, check_metric_drop, metrics_of, resolve_tolerances, verify_against
from kdcompress.tasks import task_for
from kdcompress.tasks.segmentation import DEFAULT_TOLERANCES, SegmentationTask, Tolerances, compare_outputs


class Info:
    task, num_classes, class_names, ignore_index = "segmentation", 6, tuple("abcdef"), 255


SEG = task_for(Info)


class ArrayRunner:
    """Logits = a fixed function of the input, so expected metrics are known exactly."""

    def __init__(self, fn, name: str = "fake") -> None:
        self.fn, self.name = fn, name

    def infer(self, x):
        return self.fn(np.asarray(x, dtype=np.float32))


def _logits(x: np.ndarray) -> np.ndarray:
    return np.concatenate([x, -x], axis=1)  # 6 "classes"


def test_compare_outputs_exact_and_worst_index() -> None:
    ref = np.zeros((1, 3, 4, 5), np.float32)
    ref[0, 0] = 2.0  # class 0 wins everywhere
    out = ref.copy()
    out[0, 1, 2, 3] = 0.5
    r = compare_outputs(ref, out)
    assert r["max_abs"] == pytest.approx(0.5)
    assert r["max_rel"] == pytest.approx(0.25)  # relative to max|ref| = 2
    assert r["worst_index"] == [0, 1, 2, 3]
    assert r["argmax_agreement"] == 1.0 and r["pixels"] == 20
    out[0, 2, 0, 0] = 3.0  # one pixel flips class
    assert compare_outputs(ref, out)["argmax_agreement"] == pytest.approx(19 / 20)


def test_compare_outputs_shape_mismatch_and_nan() -> None:
    with pytest.raises(ExportError, match="shapes differ"):
        compare_outputs(np.zeros((1, 2, 4, 4)), np.zeros((1, 2, 4, 5)))
    bad = np.zeros((1, 2, 4, 4), np.float32)
    bad[0, 1, 1, 1] = np.nan
    r = compare_outputs(np.zeros_like(bad), bad)
    assert r["nonfinite"] == 1 and r["argmax_agreement"] == 0.0 and r["max_abs"] == float("inf")


def test_tolerance_defaults_and_overrides() -> None:
    assert DEFAULT_TOLERANCES["fp32"] == Tolerances(1e-3, 0.999, 0.005)
    assert DEFAULT_TOLERANCES["fp16"].min_argmax_agreement == 0.99 and DEFAULT_TOLERANCES["fp16"].max_miou_drop == 0.01
    assert DEFAULT_TOLERANCES["int8"].min_argmax_agreement == 0.95 and DEFAULT_TOLERANCES["int8"].max_miou_drop == 0.03
    assert isinstance(SEG, SegmentationTask) and SEG.tolerances is DEFAULT_TOLERANCES
    t = resolve_tolerances("int8", {"max_miou_drop": 0.05}, SEG)
    assert t.max_miou_drop == 0.05 and t.min_argmax_agreement == 0.95
    assert SEG.metric_drop_limit(t) == 0.05
    own = Tolerances(max_abs=1.0)
    assert resolve_tolerances("fp32", own, SEG) is own
    with pytest.raises(KdError, match="Unknown tolerance 'max_abss' for segmentation"):
        resolve_tolerances("fp32", {"max_abss": 1}, SEG)
    with pytest.raises(KdError, match="Unknown precision"):
        resolve_tolerances("fp8", None, SEG)
    with pytest.raises(KdError, match="must be a Tolerances or a dict"):
        resolve_tolerances("fp32", 0.1, SEG)


def test_metric_drop_names_headline_and_limit() -> None:
    tol = SEG.tolerance("fp32")
    assert check_metric_drop(0.5, 0.498, tol, SEG) == pytest.approx(0.002)
    with pytest.raises(ExportError, match=r"mIoU drop 0\.0100 \(0\.5000 -> 0\.4900\) > limit 0\.005"):
        check_metric_drop(0.5, 0.49, tol, SEG, "x")


def test_verify_against_passes_and_reports() -> None:
    imgs = [np.random.default_rng(i).standard_normal((3, 8, 8)).astype(np.float32) for i in range(3)]
    rep = verify_against(ArrayRunner(_logits, "ref"), ArrayRunner(lambda x: _logits(x) + 1e-5, "cand"), imgs,
                         SEG.tolerance("fp32"), task=SEG)
    assert rep["passed"] and rep["images"] == 3 and rep["argmax_agreement"] == 1.0
    assert rep["max_abs"] == pytest.approx(1e-5, rel=1e-2)
    assert rep["reference"] == "ref" and rep["candidate"] == "cand"


def test_verify_against_failure_names_metric_value_and_limit() -> None:
    rng = np.random.default_rng(0)
    imgs = [rng.standard_normal((1, 3, 8, 8)).astype(np.float32) for _ in range(2)]
    noisy = ArrayRunner(lambda x: _logits(x) + rng.normal(0, 0.5, _logits(x).shape).astype(np.float32))
    with pytest.raises(ExportError, match=r"max_abs [0-9.e+-]+ > limit 0\.001") as ei:
        verify_against(ArrayRunner(_logits), noisy, imgs, SEG.tolerance("fp32"), task=SEG)
    assert "argmax_agreement" in str(ei.value) and "deleted" in str(ei.value)
    assert ei.value.report["passed"] is False  # type: ignore[attr-defined]
    rep = verify_against(ArrayRunner(_logits), noisy, imgs, SEG.tolerance("fp32"), task=SEG, raise_on_failure=False)
    assert not rep["passed"] and len(rep["failures"]) == 2


def test_verify_against_needs_images() -> None:
    with pytest.raises(ExportError, match="no verification images"):
        verify_against(ArrayRunner(_logits), ArrayRunner(_logits), [], Tolerances(), task=SEG)


class LabelDataset:
    """Images whose channel 0 holds the label, so an 'oracle' runner is exact."""

    class info:  # noqa: N801 - mimics DatasetInfo
        task, num_classes, class_names, ignore_index = "segmentation", 3, ("a", "b", "c"), 255

    def __init__(self, n: int = 5, size: tuple[int, int] = (6, 7)) -> None:
        g = torch.Generator().manual_seed(0)
        self.labels = [torch.randint(0, 3, size, generator=g) for _ in range(n)]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        lab = self.labels[i]
        return torch.stack([lab.float(), torch.zeros_like(lab, dtype=torch.float32), torch.zeros_like(lab, dtype=torch.float32)]), lab


def _oracle(x: np.ndarray) -> np.ndarray:
    lab = x[:, 0].astype(np.int64)
    return np.eye(3, dtype=np.float32)[lab].transpose(0, 3, 1, 2)


@pytest.mark.parametrize("batch_size", [1, 2])
def test_metrics_of_oracle_is_one(batch_size: int) -> None:
    ds = LabelDataset()
    m = metrics_of(ArrayRunner(_oracle), ds, task_for(ds.info), None, batch_size=batch_size)
    assert m["mIoU"] == pytest.approx(1.0) and m["aAcc"] == pytest.approx(1.0) and m["images"] == 5


def test_metrics_of_wrong_runner_and_max_images() -> None:
    always0 = ArrayRunner(lambda x: np.stack([np.ones_like(x[:, 0]), np.zeros_like(x[:, 0]), np.zeros_like(x[:, 0])], 1))
    ds = LabelDataset()
    m = metrics_of(always0, ds, task_for(ds.info), 2)
    assert 0.0 < m["mIoU"] < 0.5 and m["images"] == 2
    assert select_indices(10, 3) == [0, 4, 9] and select_indices(3, None) == [0, 1, 2] and select_indices(3, 0) == []
    with pytest.raises(KdError, match="predicts 6 classes but the dataset has 3"):
        metrics_of(ArrayRunner(_logits), ds, task_for(ds.info), None)


def test_resized_dataset_resizes_image_and_label() -> None:
    src = LabelDataset(size=(6, 7))
    ds = Resized(src, task_for(src.info), (12, 14))
    img, lab = ds[0]
    assert img.shape == (3, 12, 14) and lab.shape == (12, 14) and lab.dtype == torch.int64
    assert set(lab.unique().tolist()) <= {0, 1, 2}  # nearest: no interpolated label values


def test_artifact_guard_deletes_on_failure(tmp_path: Path) -> None:
    art, side = tmp_path / "a.onnx", tmp_path / "a.onnx.json"
    with pytest.raises(ExportError):
        with ArtifactGuard(art, side):
            art.write_text("x")
            side.write_text("{}")
            raise ExportError("boom")
    assert not art.exists() and not side.exists()
    with ArtifactGuard(art):
        art.write_text("kept")
    assert art.exists()
