"""Detectors with an exportable post-processing: static shapes, NMS as the only data-dependent step.

``torch.onnx.export(detector, dynamo=True)`` fails on torchvision's own post-processing (the
``numel()`` branches of ``batched_nms`` guard on data-dependent sizes). :class:`ExportableDetector`
re-states that post-processing with the detector's own attributes (thresholds, top-k, box coder,
anchors, heads) so that every shape is fixed once the input size is:

* per-level ``topk`` over *all* scores with ``k = min(topk_candidates, scores at that level)``
  instead of "threshold, then topk of the survivors" (the same set: everything above the
  threshold outranks everything below it);
* candidates below the score threshold stay in NMS with their low scores: they rank after every
  valid candidate, so they cannot suppress one, and are masked out after NMS;
* per-class NMS is one ``torchvision.ops.nms`` over boxes shifted by ``class * (max(H, W) + 1)``
  (boxes are clipped to the image, so classes never overlap), exported as ONNX
  ``NonMaxSuppression``;
* the kept indices are padded with -1 to a static ``max_detections`` rows.

Images of a batch are post-processed one by one in a Python loop (the batch size is static at
export); backbone and heads run batched.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torchvision.models.detection import FCOS, FasterRCNN, RetinaNet
from torchvision.models.detection.image_list import ImageList
from torchvision.ops import boxes as box_ops
from torchvision.ops import nms, roi_align
from torchvision.ops.poolers import MultiScaleRoIAlign, initLevelMapper

from kdcompress.errors import ExportError, KdError

DET_OUTPUTS = ["boxes", "scores", "labels", "num_detections"]
#: ``raw=True`` outputs of the one-stage heads; Faster R-CNN's are the RPN's per level (see ``output_names``).
RAW_OUTPUTS = {"retinanet": ["cls_logits", "bbox_regression"], "fcos": ["cls_logits", "bbox_regression", "bbox_ctrness"]}
INPUT_NAME = "input"


def _kind(detector: nn.Module) -> str:
    if isinstance(detector, RetinaNet):
        return "retinanet"
    if isinstance(detector, FCOS):
        return "fcos"
    if isinstance(detector, FasterRCNN):
        return "fasterrcnn"
    raise ExportError(f"Cannot export detector {type(detector).__name__}: only RetinaNet, FCOS and Faster R-CNN are "
                      f"supported.")


def _pad_keep(keep: Tensor, n: int) -> Tensor:
    """The first ``n`` kept indices, padded with -1: the static-shape end of a data-dependent NMS."""
    return torch.cat([keep, torch.full((n,), -1, dtype=keep.dtype, device=keep.device)])[:n]


def _class_nms(boxes: Tensor, scores: Tensor, classes: Tensor, iou: float, offset: float) -> Tensor:
    """Per-class NMS as one NMS: boxes lie in [0, offset), so shifting by class * offset separates classes."""
    shifted = boxes + (classes.to(boxes.dtype) * offset)[:, None]
    return nms(shifted, scores, iou)


def _not_small(boxes: Tensor, min_size: float) -> Tensor:
    """``torchvision.ops.remove_small_boxes`` as a mask."""
    ws, hs = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    return (ws >= min_size) & (hs >= min_size)


class ExportableDetector(nn.Module):
    """``DetModel`` -> ``(boxes [B,D,4], scores [B,D], labels [B,D] int64, num_detections [B] int64)``.

    Same detections as the torchvision model in eval mode (its ``postprocess_detections``), rows
    beyond ``num_detections`` zero; ``D = max_detections`` (at most ``detections_per_img`` rows are
    valid). ``raw=True`` returns the heads' raw outputs instead (for INT8 quantisation of
    backbone + heads, with the post-processing done outside the graph).
    """

    def __init__(self, model: nn.Module, max_detections: int = 100, raw: bool = False) -> None:
        super().__init__()
        detector = getattr(model, "detector", model)
        self.kind = _kind(detector)
        if int(max_detections) < 1:
            raise ExportError(f"max_detections must be >= 1, got {max_detections}.")
        self.detector = detector
        self.max_detections = int(max_detections)
        self.raw = bool(raw)

    @property
    def output_names(self) -> list[str]:
        """ONNX output names; raw Faster R-CNN = the RPN's per-level maps (the box head needs proposals)."""
        if not self.raw:
            return list(DET_OUTPUTS)
        if self.kind == "fasterrcnn":
            n = len(self.detector.rpn.anchor_generator.sizes)
            return [f"objectness_{i}" for i in range(n)] + [f"rpn_bbox_deltas_{i}" for i in range(n)]
        return list(RAW_OUTPUTS[self.kind])

    def forward(self, images: Tensor) -> tuple[Tensor, ...]:
        feats = self.detector.backbone(images)
        if self.kind == "fasterrcnn":
            return self._two_stage(images, feats)
        levels = list(feats.values())
        head = self.detector.head(levels)
        if self.raw:
            return tuple(head[k] for k in RAW_OUTPUTS[self.kind])
        h, w = int(images.shape[-2]), int(images.shape[-1])
        anchors = self._anchors(images, levels, self.detector.anchor_generator)
        per_level = [int(f.shape[-2]) * int(f.shape[-1]) for f in levels]
        a = int(head["cls_logits"].shape[1]) // sum(per_level)  # anchors per location
        sizes = [n * a for n in per_level]
        split = {k: v.split(sizes, dim=1) for k, v in head.items()}
        anchors_l = anchors.split(sizes)
        outs = [self._one_stage_image({k: [t[i] for t in v] for k, v in split.items()}, anchors_l, (h, w))
                for i in range(images.shape[0])]
        return tuple(torch.stack(t) for t in zip(*outs))

    @staticmethod
    def _anchors(images: Tensor, levels: list[Tensor], generator: nn.Module) -> Tensor:
        """The first image's anchors (all images share the padded size, hence the anchors)."""
        shapes = [(int(images.shape[-2]), int(images.shape[-1]))] * int(images.shape[0])
        return generator(ImageList(images, shapes), levels)[0]

    def _finish(self, boxes: Tensor, scores: Tensor, labels: Tensor, valid: Tensor, iou: float,
                offset: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Class-offset NMS, valid survivors first (they outrank the masked ones), padded to D rows."""
        d = self.max_detections
        keep = _pad_keep(_class_nms(boxes, scores, labels, iou, offset), d)
        idx = keep.clamp(min=0)
        ok = (keep >= 0) & valid[idx]
        ok = ok & (torch.arange(d, device=boxes.device) < int(self.detector_limit))
        zero = torch.zeros((), dtype=boxes.dtype, device=boxes.device)
        return (torch.where(ok[:, None], boxes[idx], zero), torch.where(ok, scores[idx], zero),
                torch.where(ok, labels[idx], torch.zeros_like(labels[idx])), ok.sum().to(torch.int64))

    @property
    def detector_limit(self) -> int:
        det = self.detector
        return int(det.roi_heads.detections_per_img if self.kind == "fasterrcnn" else det.detections_per_img)

    def _one_stage_image(self, head: dict[str, list[Tensor]], anchors: tuple[Tensor, ...],
                         size: tuple[int, int]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """RetinaNet/FCOS ``postprocess_detections`` for one image, with static shapes."""
        det = self.detector
        all_boxes, all_scores, all_labels = [], [], []
        for lvl, anchors_l in enumerate(anchors):
            logits = head["cls_logits"][lvl]
            num_classes = int(logits.shape[-1])
            if self.kind == "fcos":
                scores = torch.sqrt(torch.sigmoid(logits) * torch.sigmoid(head["bbox_ctrness"][lvl])).flatten()
            else:
                scores = torch.sigmoid(logits).flatten()
            scores, idx = scores.topk(min(int(det.topk_candidates), int(scores.shape[0])))
            anchor_idx = torch.div(idx, num_classes, rounding_mode="floor")
            reg, anc = head["bbox_regression"][lvl][anchor_idx], anchors_l[anchor_idx]
            boxes = det.box_coder.decode(reg, anc) if self.kind == "fcos" else det.box_coder.decode_single(reg, anc)
            all_boxes.append(box_ops.clip_boxes_to_image(boxes, size))
            all_scores.append(scores)
            all_labels.append(idx % num_classes)
        boxes, scores, labels = torch.cat(all_boxes), torch.cat(all_scores), torch.cat(all_labels)
        return self._finish(boxes, scores, labels, scores > det.score_thresh, det.nms_thresh, float(max(size) + 1))

    # ---- Faster R-CNN ---------------------------------------------------------------------------

    def _two_stage(self, images: Tensor, feats: dict[str, Tensor]) -> tuple[Tensor, ...]:
        det = self.detector
        rpn = det.rpn
        levels = list(feats.values())
        objectness, deltas = rpn.head(levels)
        if self.raw:
            return tuple(objectness) + tuple(deltas)
        h, w = int(images.shape[-2]), int(images.shape[-1])
        anchors = self._anchors(images, levels, rpn.anchor_generator)
        sizes = [int(o.shape[1]) * int(o.shape[2]) * int(o.shape[3]) for o in objectness]
        pool = det.roi_heads.box_roi_pool
        if not isinstance(pool, MultiScaleRoIAlign):
            raise ExportError(f"Faster R-CNN export needs a MultiScaleRoIAlign box pooler, got {type(pool).__name__}.")
        pooled = [feats[k] for k in feats if k in pool.featmap_names]
        scales = [2.0 ** round(math.log2(int(f.shape[-2]) / h)) for f in pooled]
        mapper = initLevelMapper(int(-math.log2(scales[0])), int(-math.log2(scales[-1])),
                                 canonical_scale=pool.canonical_scale, canonical_level=pool.canonical_level)
        outs = []
        for i in range(images.shape[0]):
            obj = torch.cat([o[i].permute(1, 2, 0).reshape(-1) for o in objectness])
            reg = torch.cat([d[i].view(-1, 4, d.shape[-2], d.shape[-1]).permute(2, 3, 0, 1).reshape(-1, 4)
                             for d in deltas])
            proposals, prop_ok = self._proposals(obj, reg, anchors, sizes, (h, w))
            outs.append(self._roi_image([p[i:i + 1] for p in pooled], scales, mapper, proposals, prop_ok, (h, w)))
        return tuple(torch.stack(t) for t in zip(*outs))

    def _proposals(self, obj: Tensor, reg: Tensor, anchors: Tensor, sizes: list[int],
                   size: tuple[int, int]) -> tuple[Tensor, Tensor]:
        """RPN ``filter_proposals`` for one image: static ``min(post_nms_top_n, candidates)`` rows + validity."""
        rpn = self.detector.rpn
        top = []
        start = 0
        for n in sizes:
            _, idx = obj[start:start + n].topk(min(int(rpn.pre_nms_top_n()), n))
            top.append(idx + start)
            start += n
        lvl = torch.cat([torch.full((int(t.shape[0]),), j, dtype=torch.int64, device=obj.device)
                         for j, t in enumerate(top)])
        idx = torch.cat(top)
        boxes = box_ops.clip_boxes_to_image(rpn.box_coder.decode_single(reg[idx], anchors[idx]), size)
        prob = torch.sigmoid(obj[idx])
        valid = _not_small(boxes, rpn.min_size) & (prob >= rpn.score_thresh)
        nms_scores = torch.where(valid, prob, torch.full_like(prob, -1.0))  # invalid ones rank last
        n_out = min(int(rpn.post_nms_top_n()), int(idx.shape[0]))
        keep = _pad_keep(_class_nms(boxes, nms_scores, lvl, rpn.nms_thresh, float(max(size) + 1)), n_out)
        k = keep.clamp(min=0)
        return boxes[k], (keep >= 0) & valid[k]

    def _roi_image(self, pooled: list[Tensor], scales: list[float], mapper: Any, proposals: Tensor, prop_ok: Tensor,
                   size: tuple[int, int]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Box head + ``RoIHeads.postprocess_detections`` for one image's (padded) proposals."""
        heads = self.detector.roi_heads
        pool = heads.box_roi_pool
        rois = torch.cat([torch.zeros_like(proposals[:, :1]), proposals], dim=1)
        target = mapper([proposals])
        feat = None
        for lvl, (f, s) in enumerate(zip(pooled, scales)):  # every RoI at every level, then pick: static shapes
            out = roi_align(f, rois, output_size=pool.output_size, spatial_scale=s, sampling_ratio=pool.sampling_ratio)
            feat = out if feat is None else torch.where((target == lvl)[:, None, None, None], out, feat)
        class_logits, box_regression = heads.box_predictor(heads.box_head(feat))
        num_classes = int(class_logits.shape[-1])
        boxes = heads.box_coder.decode_single(box_regression, proposals).reshape(-1, num_classes, 4)
        boxes = box_ops.clip_boxes_to_image(boxes, size)[:, 1:].reshape(-1, 4)
        scores = torch.softmax(class_logits, -1)[:, 1:]
        labels = torch.arange(1, num_classes, device=scores.device).view(1, -1).expand_as(scores).reshape(-1)
        ok = prop_ok[:, None].expand_as(scores).reshape(-1)
        scores = scores.reshape(-1)
        valid = ok & (scores > heads.score_thresh) & _not_small(boxes, 1e-2)
        nms_scores = torch.where(valid, scores, torch.full_like(scores, -1.0))
        return self._finish(boxes, nms_scores, labels, valid, heads.nms_thresh, float(max(size) + 1))


def export_detector_onnx(model: nn.Module, path: Path, input_size: tuple[int, int], batch: int = 1, opset: int = 18,
                         raw: bool = False, max_detections: int = 100) -> list[str]:
    """Export ``model`` (a ``DetModel``) with its post-processing (or raw heads) to ``path``; returns output names.

    Static shapes (``batch`` x 3 x H x W); dynamo exporter only. The graph is written to a temp file
    beside ``path`` and moved over it only after ``onnx.checker`` accepts it, so a failure leaves a
    previous file at ``path`` untouched.
    """
    import onnx

    from kdcompress.export.onnx import check_opset

    check_opset(opset)
    if len(tuple(input_size)) != 2 or any(int(s) <= 0 for s in input_size):
        raise ExportError(f"input size must be two positive integers (H, W), got {input_size!r}.")
    if int(batch) < 1:
        raise ExportError(f"batch must be >= 1, got {batch}.")
    h, w = int(input_size[0]), int(input_size[1])
    check = getattr(model, "check_input_size", None)
    if callable(check):
        check((h, w))
    wrapper = ExportableDetector(model, max_detections=max_detections, raw=raw)
    names = wrapper.output_names
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        example = torch.randn(int(batch), 3, h, w, device=device)
        try:
            with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
                warnings.simplefilter("ignore")
                torch.onnx.export(wrapper, (example,), str(tmp), dynamo=True, opset_version=opset,
                                  input_names=[INPUT_NAME], output_names=names, external_data=False, verbose=False)
        except KdError:
            raise
        except Exception as e:  # the exporter raises many types; the user needs its first line
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
            raise ExportError(f"torch.onnx.export (dynamo) failed for {getattr(model, 'arch', wrapper.kind)} at "
                              f"{h}x{w}: {type(e).__name__}: {reason}. Set KDCOMPRESS_DEBUG=1 for the traceback.") from e
        try:
            onnx.checker.check_model(str(tmp), full_check=True)
        except Exception as e:
            raise ExportError(f"the exported detector ONNX graph is invalid: {str(e).splitlines()[0][:300]}. "
                              f"Report this with the model name and opset.") from e
        os.replace(tmp, path)
    finally:
        model.train(was_training)
        tmp.unlink(missing_ok=True)
    return names
