"""Detector zoo: FPN level taps and strides, parameter counts against mmdet (ACAM-KD Table 6), the
teacher's features-only forward, losses in training and detections in eval, the pretrained path."""

from __future__ import annotations

import pytest
import torch

from kdcompress.errors import ConfigError, KdError
from kdcompress.models import MODELS, build_model, task_of
from kdcompress.models.detection import DET_ZOO
from kdcompress.taps import record, tap_shapes

# mmdet (80 classes) minus ours (80 + background, torchvision heads): mmdet's RetinaNet builds P6 from
# C5 (2048 -> 256 3x3 conv, `add_extra_convs='on_input'`), torchvision from P5 (256 -> 256): 4,129,024 fewer
# weights in ours; RetinaNet heads of 81 vs 80 classes: 9 anchors x 256 x 9 + 9 = +20,745 in ours.
MMDET = {"retinanet-r50": 37.97e6, "retinanet-r101": 56.96e6, "fasterrcnn-r50": 41.75e6, "fasterrcnn-r101": 60.75e6}
P6_FROM_C5 = (2048 - 256) * 256 * 9


def n_params(name: str, k: int = 81) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in build_model(name, k).parameters())


@pytest.mark.parametrize("name", sorted(MMDET))
def test_params_next_to_acam_table6(name: str) -> None:
    ours = n_params(name)
    delta = P6_FROM_C5 if name.startswith("retinanet") else 0
    assert abs(ours + delta - MMDET[name]) / MMDET[name] < 0.005, (name, ours)


def test_zoo_names_and_task() -> None:
    assert {n for n in MODELS.names() if task_of(n) == "detection"} == set(DET_ZOO)
    assert all(n.split("-")[0] in ("retinanet", "fcos", "fasterrcnn") for n in DET_ZOO)


@pytest.mark.parametrize("name, levels, distill", [
    ("retinanet-r18", ("p3", "p4", "p5", "p6", "p7"), ("p3", "p4", "p5", "p6")),
    ("fcos-mbv3", ("p3", "p4", "p5", "p6", "p7"), ("p3", "p4", "p5", "p6")),
    ("fasterrcnn-r18", ("p2", "p3", "p4", "p5", "p6"), ("p2", "p3", "p4", "p5")),
    ("fasterrcnn-mbv3", ("p3", "p4", "p5", "p6"), ("p3", "p4", "p5")),
])
def test_fpn_taps_named_by_level(name: str, levels: tuple[str, ...], distill: tuple[str, ...]) -> None:
    m = build_model(name, 4)
    taps = m.taps()
    assert tuple(taps) == levels
    assert m.distill_taps == distill
    shapes = tap_shapes(m, (128, 192), batch=2)
    for level, tap in taps.items():
        assert tap.stride == 2 ** int(level[1:])
        s = shapes[level]
        assert s[0] == 2 and s[1] == 256
        assert (s[2], s[3]) == (-(-128 // tap.stride), -(-192 // tap.stride)), (level, s)


def test_teacher_features_skip_head_and_match_taps() -> None:
    torch.manual_seed(0)
    m = build_model("retinanet-r18", 4).eval()
    x = torch.randn(1, 3, 96, 96)
    called = []
    m.detector.head.register_forward_hook(lambda *_: called.append(1))
    with torch.no_grad(), record(m, ["p3", "p7"]) as feats:
        out = m.features(x)
        assert torch.equal(feats["p3"], out["0"]) and torch.equal(feats["p7"], out["p7"])
    assert not called, "the features-only forward must not run the head"


@pytest.mark.parametrize("name", ["retinanet-r18", "fcos-r18", "fasterrcnn-r18"])
def test_losses_in_training_and_detections_in_eval(name: str) -> None:
    torch.manual_seed(0)
    m = build_model(name, 4)
    x = torch.randn(2, 3, 64, 96)
    targets = [{"boxes": torch.tensor([[4.0, 6.0, 30.0, 40.0]]), "labels": torch.tensor([2])},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}]
    m.train()
    losses = m(x, targets)
    total = sum(losses.values())
    assert torch.isfinite(total) and total > 0
    total.backward()
    m.eval()
    with torch.no_grad():
        dets = m(x)
    assert len(dets) == 2 and set(dets[0]) == {"boxes", "scores", "labels"}
    for d in dets:  # no resize inside: boxes stay in the input's pixels
        if len(d["boxes"]):
            assert d["boxes"][:, 2].max() <= 96 and d["boxes"][:, 3].max() <= 64


def test_pretrained_backbone_loads_torchvision_layout(tmp_path) -> None:
    from torchvision.models import resnet18

    net = resnet18()
    with torch.no_grad():
        net.conv1.weight.fill_(0.25)
        net.bn1.running_var.fill_(4.0)
    path = tmp_path / "r18.pth"
    torch.save(net.state_dict(), path)
    m = build_model("retinanet-r18", 4, pretrained=str(path))
    body = m.detector.backbone.body.body
    assert torch.all(body.conv1.weight == 0.25)
    m.train()
    assert not body.bn1.training and m.detector.head.training  # norm_eval: the pretraining's statistics stay
    m(torch.randn(2, 3, 64, 64), [{"boxes": torch.tensor([[2.0, 2.0, 30.0, 30.0]]), "labels": torch.tensor([1])}] * 2)
    assert torch.all(body.bn1.running_var == 4.0)
    assert not body.conv1.weight.requires_grad and body.layer4[0].conv1.weight.requires_grad
    plain = build_model("retinanet-r18", 4)  # a checkpoint of the pretrained model loads into a plain build
    plain.load_state_dict(m.state_dict())
    torch.save({"conv1.weight": torch.zeros(1)}, path)
    with pytest.raises(KdError, match="another backbone"):
        build_model("retinanet-r18", 4, pretrained=str(path))


def test_output_stride_refused_for_detectors() -> None:
    with pytest.raises(ConfigError, match="output_stride does not apply"):
        build_model("retinanet-r18", 4, output_stride=8)


def test_input_size_multiple_of_32() -> None:
    m = build_model("fcos-r18", 4)
    m.check_input_size((96, 128))
    with pytest.raises(KdError, match="multiples of 32"):
        m.check_input_size((100, 128))


def test_inheritance_copies_neck_and_head_where_shapes_match() -> None:
    """ACAM-KD's inheritance between a ResNet-18 teacher and a MobileNetV3 student: the head and the FPN's
    3x3 output convs match in shape and are copied; the FPN's 1x1 lateral convs (other input widths) are not."""
    from kdcompress.methods.base import inherit_from_teacher

    torch.manual_seed(0)
    teacher, student = build_model("retinanet-r18", 4), build_model("retinanet-mbv3", 4)
    copied = inherit_from_teacher(student, teacher, ["detector.head", "detector.backbone.body.fpn"])
    s, t = student.state_dict(), teacher.state_dict()
    head = [k for k in s if k.startswith("detector.head.")]
    assert head and set(head) <= set(copied)
    assert all(torch.equal(s[k], t[k]) for k in copied)
    assert any(k.startswith("detector.backbone.body.fpn.layer_blocks") for k in copied)
    assert "detector.backbone.body.fpn.inner_blocks.0.0.weight" not in copied


def test_digits_det_recipe_inherits_neck_and_head() -> None:
    """The built-in recipe's inheritance prefixes name real modules of its teacher and student (a typo would only
    surface minutes into the demo, as a refusal)."""
    from kdcompress.config import load_recipe
    from kdcompress.methods.base import inherit_from_teacher

    r = load_recipe("digits-det")
    teacher, student = build_model(r.teacher.model, 11), build_model(r.student.model, 11)
    copied = inherit_from_teacher(student, teacher, r.distill.inherit)
    for prefix in r.distill.inherit:
        assert any(k.startswith(prefix + ".") for k in copied), prefix
