"""Every feature method on a detector's FPN levels (p3–p6: equal widths, halving resolution), through the
same conformance suite and reference formulas as on segmentation taps: one module per level, one loss per
level, summed (mmrazor's recorders on ``neck``)."""

from __future__ import annotations

import torch

from tests.methods import test_acam, test_attnfd, test_baselines, test_cankd  # modules: no re-collection

LEVELS = ("p3", "p4", "p5", "p6")
# FPN maps are 256 wide on both sides; 64 keeps the suite fast (and CBAM's reduction-16 MLP 4 wide). The student's grid equals the teacher's
# (same input, same strides), as in detection.
FPN = {lvl: torch.Size((2, 64, 16 >> i, 16 >> i)) for i, lvl in enumerate(LEVELS)}


class TestCanKDOnFPN(test_cankd.TestCanKD):
    taps = LEVELS
    student_shapes = FPN
    teacher_shapes = FPN


class TestACAMOnFPN(test_acam.TestACAMLogits):
    """M = 6 masks per level (the paper's detection setting, chosen automatically off the logits tap)."""

    taps = LEVELS
    student_shapes = FPN
    teacher_shapes = FPN

    def test_six_masks_per_level(self) -> None:
        method = self.build()
        assert method.num_masks == {lvl: 6 for lvl in LEVELS}


class TestAttnFDOnFPN(test_attnfd.TestAttnFD):
    """AttnFD's CBAM-refined loss per level: an extension beyond its paper (segmentation only)."""

    taps = LEVELS
    student_shapes = FPN
    teacher_shapes = FPN


class TestFeatureMSEOnFPN(test_baselines.TestFeatureMSE):
    taps = LEVELS
    student_shapes = FPN
    teacher_shapes = FPN
