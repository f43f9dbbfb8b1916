"""torchvision backbones turned into dilated feature extractors with named stages.

Every backbone exposes four stages (``stage1``..``stage4``) and a ``backbone`` tap: the last
stage before its final ReLU where the block allows it (ResNet's last residual sum; for
MobileNetV2 the last linear bottleneck is already pre-activation).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck



@dataclass(frozen=True)
class BackboneSpec:
    channels: tuple[int, int, int, int]  # stage1..stage4 output channels
    low_level: str  # stage used as DeepLabV3+ low-level feature
    stage_paths: tuple[str, str, str, str]
    pre_relu_path: str


def _load_tv(backbone: str, pretrained: "bool | str | Path | None") -> nn.Module:
    """The torchvision network of ``backbone``; ``pretrained`` is False, True (ImageNet) or a
    torchvision-layout weights file (ImageNet or the built-in pretraining: one loader for both)."""
    from kdcompress.pretrain import imagenet_file, load_backbone_state, torchvision_classifier

    net = torchvision_classifier(backbone)
    if pretrained:
        load_backbone_state(net, imagenet_file(backbone) if pretrained is True else Path(pretrained))
    return net


class PreReluBottleneck(Bottleneck):
    """Last residual block whose sum passes through an Identity ``pre_relu`` (the AttnFD tap).

    The final ReLU is out-of-place so the recorded pre-activation tensor is not overwritten.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out = self.pre_relu(out + identity)
        return F.relu(out)


class PreReluBasicBlock(BasicBlock):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out = self.pre_relu(out + identity)
        return F.relu(out)


def _make_pre_relu(block: nn.Module) -> None:
    # Swapping the class keeps parameters and state_dict keys identical (pre_relu has no state),
    # so torchvision's pretrained weights still load.
    block.__class__ = PreReluBottleneck if isinstance(block, Bottleneck) else PreReluBasicBlock
    block.pre_relu = nn.Identity()


def _set_conv_dilation(conv: nn.Conv2d, dilation: int) -> None:
    conv.stride = (1, 1)
    conv.dilation = (dilation, dilation)
    conv.padding = (dilation, dilation)


def _dilate_resnet_layer(layer: nn.Sequential, dilation: int, multi_grid: tuple[int, ...] | None) -> None:
    """Turn a stride-2 ResNet layer into a dilated stride-1 one (works for BasicBlock too,
    which torchvision refuses to dilate). First block uses dilation/2 (contracted) unless multi-grid."""
    for i, block in enumerate(layer):
        if multi_grid is not None:
            d = dilation * multi_grid[i % len(multi_grid)]
        else:
            d = max(1, dilation // 2) if i == 0 else dilation
        convs = [block.conv2] if isinstance(block, Bottleneck) else [block.conv1, block.conv2]
        for conv in convs:
            if conv.kernel_size == (3, 3):
                _set_conv_dilation(conv, d)
        if block.downsample is not None:
            block.downsample[0].stride = (1, 1)


class ResNetBackbone(nn.Module):
    def __init__(self, depth: int, output_stride: int, pretrained: "bool | str | Path", multi_grid: bool) -> None:
        super().__init__()
        net = _load_tv(f"r{depth}", pretrained)
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        mg = (1, 2, 4) if multi_grid and depth >= 50 else None
        if output_stride == 16:
            _dilate_resnet_layer(self.layer4, 2, mg)
        elif output_stride == 8:
            _dilate_resnet_layer(self.layer3, 2, None)
            _dilate_resnet_layer(self.layer4, 4, mg)
        _make_pre_relu(self.layer4[-1])
        c = 64 if depth < 50 else 256
        self.spec = BackboneSpec(
            channels=(c, c * 2, c * 4, c * 8),
            low_level="layer1",
            stage_paths=("layer1", "layer2", "layer3", "layer4"),
            pre_relu_path=f"layer4.{len(self.layer4) - 1}.pre_relu",
        )

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        l1 = self.layer1(x)
        l4 = self.layer4(self.layer3(self.layer2(l1)))
        return {"low": l1, "out": l4}


class MobileNetV2Backbone(nn.Module):
    """``features[:-1]`` (320 ch, the 1280-ch conv dropped), dilated once the output stride is reached."""

    def __init__(self, output_stride: int, pretrained: "bool | str | Path") -> None:
        super().__init__()
        net = _load_tv("mbv2", pretrained)
        self.features = net.features[:-1]
        stride, dilation = 1, 1
        for block in self.features:
            dw = next((m for m in block.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)), None)
            if dw is None:
                continue
            if dw.stride == (2, 2):
                if stride >= output_stride:
                    dilation *= 2
                    _set_conv_dilation(dw, dilation)
                else:
                    stride *= 2
            elif dilation > 1:
                _set_conv_dilation(dw, dilation)
        self.spec = BackboneSpec(
            channels=(24, 32, 96, 320),
            low_level="features.3",
            stage_paths=("features.3", "features.6", "features.13", "features.17"),
            pre_relu_path="features.17",
        )

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        low = self.features[:4](x)
        return {"low": low, "out": self.features[4:](low)}


BACKBONES: dict[str, Callable[[int, bool, bool], nn.Module]] = {
    "r18": lambda os_, pre, mg: ResNetBackbone(18, os_, pre, mg),
    "r50": lambda os_, pre, mg: ResNetBackbone(50, os_, pre, mg),
    "r101": lambda os_, pre, mg: ResNetBackbone(101, os_, pre, mg),
    "mbv2": lambda os_, pre, mg: MobileNetV2Backbone(os_, pre),
}
