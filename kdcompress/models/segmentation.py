"""Segmentation heads (DeepLabV3+, DeepLabV3, PSPNet) on torchvision backbones.

Heads are written here to match the papers' definitions (AttnFD's DeepLabV3+ zoo at OS16;
the mmseg / CIRKD DeepLabV3 and PSPNet used by ACAM-KD and CanKD at OS8); see
``shared/specs/reference-numbers.md``. Every model declares named taps for distillation.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from kdcompress.errors import KdError
from kdcompress.models.backbones import BACKBONES
from kdcompress.taps import Tap


def conv_bn_relu(cin: int, cout: int, k: int = 1, dilation: int = 1) -> nn.Sequential:
    pad = 0 if k == 1 else dilation
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=pad, dilation=dilation, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class ImagePool(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv = conv_bn_relu(cin, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(F.adaptive_avg_pool2d(x, 1))
        return F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False)


class ASPP(nn.Module):
    """Parallel dilated branches + image pooling, concatenated. ``rates[i] == 1`` gives a 1x1 branch."""

    def __init__(self, cin: int, cout: int, rates: tuple[int, ...]) -> None:
        super().__init__()
        self.pool = ImagePool(cin, cout)
        self.branches = nn.ModuleList(conv_bn_relu(cin, cout, 1 if r == 1 else 3, r) for r in rates)
        self.out_channels = cout * (len(rates) + 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.pool(x)] + [b(x) for b in self.branches], dim=1)


class DeepLabV3PlusHead(nn.Module):
    """AttnFD zoo head: ASPP 256 (1x1 + 3 dilated + pool) -> 1x1 project -> decoder with 48-ch low-level."""

    def __init__(self, cin: int, low_cin: int, num_classes: int, output_stride: int) -> None:
        super().__init__()
        rates = (1, 6, 12, 18) if output_stride == 16 else (1, 12, 24, 36)
        self.aspp = ASPP(cin, 256, rates)
        self.project = conv_bn_relu(self.aspp.out_channels, 256)  # tap: encoder
        self.aspp_drop = nn.Dropout(0.5)
        self.low_proj = conv_bn_relu(low_cin, 48)
        self.fuse1 = conv_bn_relu(304, 256, 3)
        self.drop1 = nn.Dropout(0.5)
        self.fuse2 = conv_bn_relu(256, 256, 3)  # tap: decoder
        self.drop2 = nn.Dropout(0.1)
        self.classifier = nn.Conv2d(256, num_classes, 1)  # tap: logits

    def forward(self, feats: dict[str, torch.Tensor]) -> torch.Tensor:
        x = self.aspp_drop(self.project(self.aspp(feats["out"])))
        low = self.low_proj(feats["low"])
        x = F.interpolate(x, size=low.shape[-2:], mode="bilinear", align_corners=False)
        x = self.fuse2(self.drop1(self.fuse1(torch.cat([x, low], dim=1))))
        return self.classifier(self.drop2(x))

    taps = {"encoder": ("project", 0), "decoder": ("fuse2", 4), "logits": ("classifier", 4)}


class DeepLabV3Head(nn.Module):
    """mmseg ASPPHead: branches (1, r, 2r, 3r) + pool, 3x3 bottleneck, dropout 0.1, 1x1 classifier."""

    def __init__(self, cin: int, num_classes: int, output_stride: int, channels: int) -> None:
        super().__init__()
        rates = (1, 12, 24, 36) if output_stride == 8 else (1, 6, 12, 18)
        self.aspp = ASPP(cin, channels, rates)
        self.bottleneck = conv_bn_relu(self.aspp.out_channels, channels, 3)  # tap: encoder / decoder
        self.drop = nn.Dropout(0.1)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, feats: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.classifier(self.drop(self.bottleneck(self.aspp(feats["out"]))))

    taps = {"encoder": ("bottleneck", None), "decoder": ("bottleneck", None), "logits": ("classifier", None)}


class CirkdDeepLabV3Head(nn.Module):
    """The CIRKD DeepLabV3-MobileNetV2 head: ASPP 128 (rates 12/24/36 at OS8) -> 1x1 project -> 3x3 -> 1x1."""

    def __init__(self, cin: int, num_classes: int, output_stride: int, channels: int = 128) -> None:
        super().__init__()
        rates = (1, 12, 24, 36) if output_stride == 8 else (1, 6, 12, 18)
        self.aspp = ASPP(cin, channels, rates)
        self.project = conv_bn_relu(self.aspp.out_channels, channels)  # tap: encoder
        self.aspp_drop = nn.Dropout(0.5)
        self.conv = conv_bn_relu(channels, channels, 3)  # tap: decoder
        self.drop = nn.Dropout(0.1)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, feats: dict[str, torch.Tensor]) -> torch.Tensor:
        x = self.aspp_drop(self.project(self.aspp(feats["out"])))
        return self.classifier(self.drop(self.conv(x)))

    taps = {"encoder": ("project", None), "decoder": ("conv", None), "logits": ("classifier", None)}


class PPM(nn.Module):
    def __init__(self, cin: int, channels: int, bins: tuple[int, ...]) -> None:
        super().__init__()
        self.bins = bins
        self.stages = nn.ModuleList(conv_bn_relu(cin, channels) for _ in bins)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [x]
        for b, stage in zip(self.bins, self.stages):
            y = stage(F.adaptive_avg_pool2d(x, b))
            outs.append(F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False))
        return torch.cat(outs, dim=1)


class PSPHead(nn.Module):
    """mmseg PSPHead: PPM bins 1/2/3/6 -> 3x3 bottleneck -> dropout 0.1 -> 1x1 classifier."""

    bins = (1, 2, 3, 6)

    def __init__(self, cin: int, num_classes: int, output_stride: int, channels: int) -> None:
        super().__init__()
        self.ppm = PPM(cin, channels, self.bins)
        self.bottleneck = conv_bn_relu(cin + channels * len(self.bins), channels, 3)
        self.drop = nn.Dropout(0.1)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, feats: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.classifier(self.drop(self.bottleneck(self.ppm(feats["out"]))))

    taps = {"encoder": ("bottleneck", None), "decoder": ("bottleneck", None), "logits": ("classifier", None)}


class SegModel(nn.Module):
    """Backbone + head; forward returns logits at the input resolution.

    ``taps()`` names the features distillation methods read: backbone stages with their
    strides, ``backbone`` (last stage, pre-ReLU where possible), ``encoder``, ``decoder``
    and ``logits`` (classifier output at feature resolution, before upsampling).
    """

    def __init__(self, arch: str, head_kind: str, backbone: str, num_classes: int, output_stride: int,
                 pretrained: bool | str | Path = False) -> None:
        super().__init__()
        if output_stride not in (8, 16):
            raise KdError(f"output_stride must be 8 or 16, got {output_stride}.")
        self.arch, self.num_classes, self.output_stride = arch, num_classes, output_stride
        self.backbone = BACKBONES[backbone](output_stride, pretrained, head_kind == "deeplabv3plus")
        spec = self.backbone.spec
        c4 = spec.channels[3]
        if head_kind == "deeplabv3plus":
            self.head = DeepLabV3PlusHead(c4, spec.channels[0], num_classes, output_stride)
        elif head_kind == "deeplabv3" and backbone == "mbv2":
            self.head = CirkdDeepLabV3Head(c4, num_classes, output_stride)
        elif head_kind == "deeplabv3":
            self.head = DeepLabV3Head(c4, num_classes, output_stride, 512 if c4 >= 2048 else 128)
        elif head_kind == "pspnet":
            self.head = PSPHead(c4, num_classes, output_stride, 512 if c4 >= 2048 else 128)
        else:
            raise KdError(f"Unknown head '{head_kind}'.")
        # Feature grids must be whole and (PSPNet) divisible by the pooling bins for a static ONNX graph.
        self.size_multiple = output_stride * (6 if head_kind == "pspnet" else 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.head(self.backbone(x))
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)

    def taps(self) -> dict[str, Tap]:
        spec = self.backbone.spec
        strides = (4, 8, min(16, self.output_stride), self.output_stride)
        out = {f"stage{i + 1}": Tap(f"backbone.{p}", s) for i, (p, s) in enumerate(zip(spec.stage_paths, strides))}
        out["backbone"] = Tap(f"backbone.{spec.pre_relu_path}", self.output_stride, "last stage, pre-ReLU")
        for name, (path, stride) in self.head.taps.items():
            out[name] = Tap(f"head.{path}", stride or self.output_stride)
        return out

    def check_input_size(self, size: tuple[int, int]) -> None:
        """Export-time check: sizes must be multiples of ``size_multiple`` (whole feature grids)."""
        h, w = size
        m = self.size_multiple
        if h % m or w % m or h < m or w < m:
            raise KdError(
                f"Input size {h}x{w} does not fit {self.arch}: height and width must be multiples of {m} "
                f"(e.g. {max(m, h // m * m)}x{max(m, w // m * m)})."
            )
