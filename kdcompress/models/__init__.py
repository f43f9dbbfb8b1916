"""Model zoo: ``<head>-<backbone>`` names in one registry, plus backbone shorthands."""

from __future__ import annotations

from typing import Callable

from torch import nn

from kdcompress.errors import ConfigError, KdError
from kdcompress.models.detection import DET_ZOO, DetModel
from kdcompress.models.segmentation import SegModel
from kdcompress.registry import Registry

MODELS: Registry[Callable[..., nn.Module]] = Registry("model")

# name -> (head, backbone, default output stride, paper reference)
ZOO: dict[str, tuple[str, str, int, str]] = {
    "deeplabv3plus-r101": ("deeplabv3plus", "r101", 16, "AttnFD teacher, 59.3 M"),
    "deeplabv3plus-r18": ("deeplabv3plus", "r18", 16, "AttnFD student, 16.6 M"),
    "deeplabv3plus-mbv2": ("deeplabv3plus", "mbv2", 16, "AttnFD student, 5.9 M"),
    "deeplabv3-r101": ("deeplabv3", "r101", 8, "ACAM-KD/CanKD teacher, 84.74 M"),
    "deeplabv3-r18": ("deeplabv3", "r18", 8, "ACAM-KD/CanKD student, 13.84 M"),
    "deeplabv3-mbv2": ("deeplabv3", "mbv2", 8, "ACAM-KD student, 3.2 M"),
    "pspnet-r18": ("pspnet", "r18", 8, "ACAM-KD/AttnFD student, 12.61 M"),
}


def _factory(name: str, head: str, backbone: str, default_os: int) -> Callable[..., nn.Module]:
    def build(num_classes: int, output_stride: int | None = None, pretrained: bool = False) -> nn.Module:
        return SegModel(name, head, backbone, num_classes, output_stride or default_os, pretrained)

    return build


def _det_factory(name: str, detector: str, backbone: str) -> Callable[..., nn.Module]:
    def build(num_classes: int, output_stride: int | None = None, pretrained: bool = False) -> nn.Module:
        if output_stride is not None:
            raise ConfigError(f"output_stride does not apply to detector '{name}' (one stride per FPN level); "
                              f"remove it from the recipe.")
        return DetModel(name, detector, backbone, num_classes, pretrained)

    return build


for _name, (_head, _bb, _os, _ref) in ZOO.items():
    MODELS.add(_name, _factory(_name, _head, _bb, _os))
for _name, (_det, _bb, _ref) in DET_ZOO.items():
    MODELS.add(_name, _det_factory(_name, _det, _bb))


def build_model(name: str, num_classes: int, output_stride: int | None = None, pretrained: bool = False) -> nn.Module:
    return MODELS.get(name)(num_classes=num_classes, output_stride=output_stride, pretrained=pretrained)


def backbone_of(name: str) -> str:
    """Backbone key (``r18``, ``mbv2``...) of a zoo model, for pretrained-weight lookup."""
    MODELS.get(name)
    return ZOO[name][1] if name in ZOO else DET_ZOO[name][1]


def task_of(name: str) -> str:
    """The task a zoo model solves (a checkpoint of one task is refused by the other's commands)."""
    MODELS.get(name)
    return "detection" if name in DET_ZOO else "segmentation"


def resolve_model_name(name: str, reference: str | None = None) -> str:
    """Accept a full name or a backbone shorthand (``mbv2``) resolved against the head of ``reference``."""
    if name in MODELS or "-" in name:
        MODELS.get(name)  # a full name: unknown ones raise the listing error
        return name
    if reference is not None and "-" in reference:
        candidate = f"{reference.split('-', 1)[0]}-{name}"
        if candidate in MODELS:
            return candidate
        raise KdError(f"No model '{candidate}' for shorthand '{name}' (head of '{reference}'). "
                      f"Available: {', '.join(MODELS.names())}")
    MODELS.get(name)  # raises the listing error
    return name


def zoo_table(num_classes: int = 21, det_classes: int = 81) -> list[dict]:
    """Name, task, parameter count and paper reference of every model (built on the meta device: no
    memory); segmentation counted at ``num_classes``, detection at ``det_classes`` (COCO: 80 + background)."""
    import torch

    rows = []
    for name in MODELS.names():
        seg = name in ZOO
        head, backbone, os_, ref = ZOO[name] if seg else (DET_ZOO[name][0], DET_ZOO[name][1], None, DET_ZOO[name][2])
        with torch.device("meta"):
            m = build_model(name, num_classes if seg else det_classes)
        rows.append({"name": name, "task": task_of(name), "head": head, "backbone": backbone, "output_stride": os_,
                     "params": sum(p.numel() for p in m.parameters()), "paper": ref})
    return rows
