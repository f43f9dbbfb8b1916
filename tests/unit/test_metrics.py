"""Confusion-matrix metrics against a hand-computed example."""

from __future__ import annotations

import math

import pytest
import torch

from kdcompress.metrics.segmentation import ConfusionMatrix


def test_against_hand_computed_matrix() -> None:
    # 3 classes; 255 ignored. Two "images" accumulated together.
    target1 = torch.tensor([[0, 0, 1], [1, 2, 255]])
    pred1 = torch.tensor([[0, 1, 1], [1, 2, 0]])
    target2 = torch.tensor([[2, 2, 0]])
    pred2 = torch.tensor([[2, 0, 0]])
    cm = ConfusionMatrix(3)
    cm.update(pred1[None], target1[None])
    cm.update(pred2[None], target2[None])
    # Hand-counted (rows = gt, cols = pred):
    # gt0: pred0 x2 (img1 (0,0), img2 (0,2)), pred1 x1 -> [2,1,0]
    # gt1: pred1 x2 -> [0,2,0]
    # gt2: pred2 x2 (img1, img2 (0,0)), pred0 x1 -> [1,0,2]
    assert cm.mat.tolist() == [[2, 1, 0], [0, 2, 0], [1, 0, 2]]
    m = cm.compute()
    iou = [2 / (3 + 3 - 2), 2 / (2 + 3 - 2), 2 / (3 + 2 - 2)]
    assert m.iou == pytest.approx(iou)
    assert m.miou == pytest.approx(sum(iou) / 3)
    assert m.aacc == pytest.approx(6 / 8)  # 8 labelled pixels, 1 ignored
    assert m.macc == pytest.approx((2 / 3 + 1 + 2 / 3) / 3)


def test_whole_split_not_per_image_average() -> None:
    cm = ConfusionMatrix(2)
    cm.update(torch.tensor([[[0, 0, 0, 1]]]), torch.tensor([[[0, 0, 0, 0]]]))  # img IoU_0 = 3/4
    cm.update(torch.tensor([[[1]]]), torch.tensor([[[1]]]))
    m = cm.compute()
    assert m.iou[0] == pytest.approx(3 / 4)
    assert m.iou[1] == pytest.approx(1 / 2)


def test_absent_class_is_nan_and_excluded() -> None:
    cm = ConfusionMatrix(3)
    cm.update(torch.tensor([[[0, 1]]]), torch.tensor([[[0, 1]]]))
    m = cm.compute()
    assert math.isnan(m.iou[2])
    assert m.miou == pytest.approx(1.0)
    assert m.as_dict(["a", "b", "c"])["per_class_iou"]["c"] is None


def test_logits_are_argmaxed_and_labels_checked() -> None:
    cm = ConfusionMatrix(2)
    logits = torch.tensor([[[[2.0, -1.0]], [[0.0, 3.0]]]])  # (1,2,1,2) -> pred [0, 1]
    cm.update(logits, torch.tensor([[[0, 1]]]))
    assert cm.mat.tolist() == [[1, 0], [0, 1]]
    with pytest.raises(ValueError, match="outside"):
        cm.update(torch.tensor([[[0]]]), torch.tensor([[[7]]]))
