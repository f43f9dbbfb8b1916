"""A new method is one class, one registry line and one test file: proved with a method defined here.

``cosine`` (1 − cosine similarity of channel vectors at each teacher position, with a 1×1
adapter) exists only in this module. Registered for these tests, it passes the shared conformance
suite and then trains through the real CLI, is listed by ``kdcompress list methods``, and shows
up in the metrics log — without touching any file of the package.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import ClassVar, Mapping, Sequence

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import Tensor, nn

from kdcompress.methods import METHODS, build_method
from kdcompress.methods.base import DistillMethod, Shapes, at_least_fp32, conv1x1, resize_to
from tests.integration.cli_helpers import run_cli
from tests.integration.conftest import TINY
from tests.methods.method_conformance import NUM_CLASSES, TEACHER, MethodConformance, make_feats


class CosineKD(DistillMethod):
    """1 − cos(adapter(F_s), F_t) per teacher position, averaged (a test-only plug-in)."""

    name: ClassVar[str] = "cosine"
    default_taps: ClassVar[tuple[str, ...]] = ("backbone",)
    default_hparams: ClassVar[dict[str, float]] = {"weight": 1.0}

    def __init__(self, student_shapes: Shapes, teacher_shapes: Shapes, taps: Sequence[str], num_classes: int,
                 **hparams: float) -> None:
        super().__init__(student_shapes, teacher_shapes, taps, num_classes, **hparams)
        self.adapter = nn.ModuleDict({t: conv1x1(self.student_shapes[t][1], self.teacher_shapes[t][1], bias=True)
                                      for t in self.taps})

    def forward(self, student_feats: Mapping[str, Tensor],  # type: ignore[override]
                teacher_feats: Mapping[str, Tensor]) -> dict[str, Tensor]:
        terms = []
        for tap in self.taps:
            t = at_least_fp32(self._teacher(teacher_feats, tap))
            s = at_least_fp32(resize_to(self.adapter[tap](student_feats[tap]), t))
            terms.append((1 - F.cosine_similarity(s, t, dim=1)).mean())
        return {"cos": torch.stack(terms).mean()}

    def loss_weights(self) -> dict[str, float]:
        return {"cos": self.hparams["weight"]}


@pytest.fixture(autouse=True)
def registered(monkeypatch: pytest.MonkeyPatch) -> None:
    """The one registry line, undone after each test so other tests see the shipped registry."""
    monkeypatch.setitem(METHODS._items, "cosine", CosineKD)


class TestCosinePlugin(MethodConformance):
    method = "cosine"
    expected_terms = ("cos",)
    expected_weights = {"cos": 1.0}

    def reference(self, method, s, t):  # type: ignore[no-untyped-def]
        tap = "backbone"
        a = method.adapter[tap](s[tap])
        a = F.interpolate(a, size=t[tap].shape[-2:], mode="bilinear", align_corners=False)
        num = (a * t[tap]).sum(1)
        den = a.norm(dim=1).clamp_min(1e-8) * t[tap].norm(dim=1).clamp_min(1e-8)
        return {"cos": (1 - num / den).mean()}

    def zero_case(self):  # type: ignore[no-untyped-def]
        method = build_method("cosine", TEACHER, TEACHER, NUM_CLASSES)
        with torch.no_grad():  # identity adapter: equal maps give cos = 1
            for conv in method.adapter.values():
                conv.weight.copy_(torch.eye(conv.weight.shape[0]).view_as(conv.weight))
                conv.bias.zero_()
        feats = make_feats(TEACHER, seed=2)
        return method, feats, {k: v.clone() for k, v in feats.items()}, ("cos",)


def test_plugin_trains_through_the_cli_and_is_listed(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from kdcompress.config import load_recipe
    from kdcompress.engine.trainer import train

    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(dict(TINY, train=dict(TINY["train"], steps=2))))
    teacher = train(load_recipe(str(recipe)), "teacher", tmp_path / "teacher", progress=False)
    res = run_cli(capsys, "distill", "-r", recipe, "-t", teacher.model_path, "-s", "mbv2", "--method", "cosine",
                  "--out", tmp_path / "cos", "--steps", "2", "--no-progress")
    assert res.code == 0, res.err
    log = [json.loads(x) for x in (tmp_path / "cos" / "metrics.jsonl").read_text().splitlines()]
    assert any("cos" in e for e in log)
    listed = run_cli(capsys, "list", "methods", "--json")
    assert "cosine" in json.loads(listed.out)["methods"]
