"""Detectors from torchvision (RetinaNet, FCOS, Faster R-CNN) with FPN levels exposed as taps.

Heads, FPN, anchors, losses and post-processing are torchvision's; this module only builds the
backbone + FPN from a (possibly pretrained) torchvision classifier, turns torchvision's own
resize/normalisation off (kdcompress's datasets size and normalise images, so the teacher, the
student and an exported graph see identical tensors), and names the FPN outputs ``p2``…``p7``:

* RetinaNet / FCOS: torchvision keys ``'0','1','2','p6','p7'`` = P3–P7 (strides 8–128), as in the
  papers (mmdet ``start_level=1`` + P6/P7 from P5).
* Faster R-CNN: ``'0','1','2','3','pool'`` = P2–P6 (``pool`` is a parameter-free max-pool of P5).

The teacher of a distillation run executes ``features`` (backbone + FPN), never its head.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchvision.models.detection import FCOS, FasterRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN, _resnet_fpn_extractor
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7

from kdcompress.errors import KdError
from kdcompress.taps import Tap

# name -> (detector, backbone, paper reference)
DET_ZOO: dict[str, tuple[str, str, str]] = {
    "retinanet-r101": ("retinanet", "r101", "ACAM-KD/CanKD teacher (mmdet 56.96 M)"),
    "retinanet-r50": ("retinanet", "r50", "ACAM-KD/CanKD student (mmdet 37.97 M)"),
    "retinanet-r18": ("retinanet", "r18", "CPU-sized student"),
    "retinanet-mbv2": ("retinanet", "mbv2", "CPU-sized student"),
    "retinanet-mbv3": ("retinanet", "mbv3", "CPU-sized student"),
    "fcos-r101": ("fcos", "r101", "CanKD teacher"),
    "fcos-r50": ("fcos", "r50", "CanKD student (RepPoints stand-in for ACAM-KD)"),
    "fcos-r18": ("fcos", "r18", "CPU-sized student"),
    "fcos-mbv2": ("fcos", "mbv2", "CPU-sized student"),
    "fcos-mbv3": ("fcos", "mbv3", "CPU-sized student"),
    "fasterrcnn-r101": ("fasterrcnn", "r101", "ACAM-KD/CanKD teacher (mmdet 60.75 M)"),
    "fasterrcnn-r50": ("fasterrcnn", "r50", "ACAM-KD/CanKD student (mmdet 41.75 M)"),
    "fasterrcnn-r18": ("fasterrcnn", "r18", "CPU-sized student"),
    "fasterrcnn-mbv2": ("fasterrcnn", "mbv2", "CPU-sized student"),
    "fasterrcnn-mbv3": ("fasterrcnn", "mbv3", "CPU-sized student"),
}

#: Levels each detector family distils by default (the CanKD configs' first four neck outputs).
DISTILL_LEVELS: dict[str, tuple[str, ...]] = {
    "retinanet": ("p3", "p4", "p5", "p6"),
    "fcos": ("p3", "p4", "p5", "p6"),
    "fasterrcnn": ("p2", "p3", "p4", "p5"),
}
#: MobileNet ``features`` blocks ending the stride-8/16/32 stages, and their channels (block -> channels;
#: MobileNetV2 without its last 1x1 expansion to 1280, which adds width but no new resolution).
MOBILE_STAGES: dict[str, dict[str, int]] = {"mbv2": {"6": 32, "13": 96, "17": 320},
                                            "mbv3": {"6": 40, "12": 112, "16": 960}}
SIZE_MULTIPLE = 32  # the deepest backbone stride: whole feature grids, identical padding for every model


class PassThroughTransform(GeneralizedRCNNTransform):
    """torchvision's transform minus resize and normalisation: the dataset already did both.

    Only the batching (padding to a multiple of 32) stays; boxes therefore come out in the input
    tensor's pixels and ``postprocess`` is an identity rescale.
    """

    def __init__(self) -> None:
        super().__init__(min_size=1, max_size=1, image_mean=[0.0, 0.0, 0.0], image_std=[1.0, 1.0, 1.0],
                         size_divisible=SIZE_MULTIPLE)

    def normalize(self, image: torch.Tensor) -> torch.Tensor:
        return image

    def resize(self, image: torch.Tensor, target: dict[str, torch.Tensor] | None = None):  # type: ignore[override]
        return image, target


class LevelTaps(nn.Module):
    """The FPN backbone with each output level passed through a named Identity (``levels.p3``…).

    Forward hooks on those Identities are how distillation records a level; the returned dict
    keeps torchvision's keys, so heads, RPN and RoI pooling are untouched.
    """

    def __init__(self, body: BackboneWithFPN, names: dict[str, str]) -> None:
        super().__init__()
        self.body = body
        self.out_channels = body.out_channels
        self.names = dict(names)
        self.levels = nn.ModuleDict({level: nn.Identity() for level in names.values()})

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        feats = self.body(x)
        return OrderedDict((k, self.levels[self.names[k]](v)) for k, v in feats.items())


def _classifier(backbone: str, pretrained: bool | str | Path) -> tuple[nn.Module, bool]:
    """A torchvision classifier (pretrained weights loaded when given) and whether it was pretrained.

    Its BatchNorm layers stay ordinary ``BatchNorm2d`` either way, so a checkpoint loads into a model built
    without weights; a pretrained backbone keeps its statistics through ``DetModel.norm_eval`` instead."""
    from kdcompress.pretrain import imagenet_file, load_backbone_state, torchvision_classifier

    trained = bool(pretrained)
    net = torchvision_classifier(backbone)  # the one table of torchvision backbones (pretraining uses it too)
    if trained:
        load_backbone_state(net, imagenet_file(backbone) if pretrained is True else Path(pretrained))
    return net, trained


def fpn_backbone(detector: str, backbone: str, pretrained: bool | str | Path = False) -> LevelTaps:
    """Backbone + FPN with named levels: P3–P7 (RetinaNet, FCOS) or P2–P6 (Faster R-CNN)."""
    net, trained = _classifier(backbone, pretrained)
    two_stage = detector == "fasterrcnn"
    if backbone in MOBILE_STAGES:
        layers = dict(MOBILE_STAGES[backbone])
        trainable_from = int(list(layers)[0]) + 1 if trained else 0  # the stride-16 and deeper stages train
        for i, block in enumerate(net.features):
            for p in block.parameters():
                p.requires_grad_(i >= trainable_from)
        extra = LastLevelMaxPool() if two_stage else LastLevelP6P7(256, 256)
        body = BackboneWithFPN(net.features, {k: str(i) for i, k in enumerate(layers)}, list(layers.values()), 256,
                               extra_blocks=extra)
        first = 3
    else:
        returned = [1, 2, 3, 4] if two_stage else [2, 3, 4]
        extra = LastLevelMaxPool() if two_stage else LastLevelP6P7(256, 256)
        body = _resnet_fpn_extractor(net, 3 if trained else 5, returned, extra)
        first = returned[0] + 1
    return LevelTaps(body, _level_names(detector, backbone, first))


def _level_names(detector: str, backbone: str, first: int) -> dict[str, str]:
    """torchvision FPN key -> ``p<level>`` for a backbone whose first returned stage is C<first>."""
    if detector == "fasterrcnn":
        count = 3 if backbone in MOBILE_STAGES else 4
        names = {str(i): f"p{first + i}" for i in range(count)}
        names["pool"] = f"p{first + count}"
        return names
    return {"0": "p3", "1": "p4", "2": "p5", "p6": "p6", "p7": "p7"}


class DetModel(nn.Module):
    """A torchvision detector on a tapped FPN backbone.

    ``forward(images, targets)`` returns torchvision's loss dict in training mode and its
    detections (list of ``{boxes, scores, labels}``) in eval mode; ``images`` may be a batch
    tensor (padded to a multiple of 32) or a list. ``num_classes`` counts the background (label 0).
    """

    task = "detection"

    def __init__(self, arch: str, detector: str, backbone: str, num_classes: int,
                 pretrained: bool | str | Path = False) -> None:
        super().__init__()
        self.arch, self.detector_kind, self.backbone_name = arch, detector, backbone
        self.num_classes = int(num_classes)
        self.output_stride = None  # no single output stride: one per FPN level (see taps())
        self.size_multiple = SIZE_MULTIPLE
        # mmdet's norm_eval: a pretrained backbone's BatchNorm statistics are not re-estimated from small
        # detection batches (torchvision freezes them with FrozenBatchNorm2d for the same reason)
        self.norm_eval = bool(pretrained)
        body = fpn_backbone(detector, backbone, pretrained)
        if detector == "retinanet":
            # 100 detections per image as COCO's maxDets, mmdet and torchvision's other detectors (RetinaNet: 300)
            self.detector: nn.Module = RetinaNet(body, num_classes, detections_per_img=100)
        elif detector == "fcos":
            self.detector = FCOS(body, num_classes)
        elif detector == "fasterrcnn":
            levels = [k for k in body.names if k != "pool"]
            sizes = ((32,), (64,), (128,), (256,), (512,))[-len(body.names):]
            anchors = AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(sizes))
            self.detector = FasterRCNN(body, num_classes, rpn_anchor_generator=anchors,
                                       box_roi_pool=MultiScaleRoIAlign(levels, 7, 2))
        else:
            raise KdError(f"Unknown detector '{detector}'. Detectors: retinanet, fcos, fasterrcnn")
        self.detector.transform = PassThroughTransform()
        self.distill_taps = tuple(t for t in DISTILL_LEVELS[detector] if t in body.names.values())

    def train(self, mode: bool = True) -> "DetModel":
        super().train(mode)
        if mode and self.norm_eval:
            for m in self.detector.backbone.body.body.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    @property
    def levels(self) -> dict[str, str]:
        """torchvision key -> level name of this model's FPN outputs."""
        return dict(self.detector.backbone.names)

    def forward(self, images: torch.Tensor | list[torch.Tensor],
                targets: list[dict[str, torch.Tensor]] | None = None) -> Any:
        imgs = list(images.unbind(0)) if isinstance(images, torch.Tensor) else list(images)
        return self.detector(imgs, targets)

    def features(self, images: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        """Backbone + FPN only: what a distillation teacher runs (no head, no post-processing)."""
        return self.detector.backbone(images)

    def taps(self) -> dict[str, Tap]:
        out = {}
        for key, level in self.levels.items():
            note = "max-pool of P5 (no parameters)" if key == "pool" else ("from P5" if key.startswith("p") else "")
            out[level] = Tap(f"detector.backbone.levels.{level}", 2 ** int(level[1:]), note)
        return out

    def check_input_size(self, size: tuple[int, int]) -> None:
        h, w = size
        m = self.size_multiple
        if h % m or w % m or h < m or w < m:
            raise KdError(f"Input size {h}x{w} does not fit {self.arch}: height and width must be multiples of {m} "
                          f"(e.g. {max(m, h // m * m)}x{max(m, w // m * m)}).")
