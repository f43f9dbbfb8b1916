"""Static cost of a model: parameters and FLOPs/MACs.

FLOPs come from ``torch.utils.flop_counter.FlopCounterMode``, which counts 2 FLOPs per
multiply-accumulate for conv / matmul / SDPA only (BN, ReLU, interpolation are free). The
segmentation papers' "FLOPs" columns are *multiply-accumulates* (mmengine/fvcore: 1 FMA = 1),
so we report both and name them explicitly:

* ``gflops`` = FlopCounterMode count / 1e9 (2 per MAC),
* ``gmacs``  = FlopCounterMode count / 2 / 1e9 — compare this with the papers' tables
  (within ~0.3 % for ResNet models, ~2.6 % for BN-heavy MobileNetV2, see reference-numbers.md).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch import nn

FLOPS_CONVENTION = ("gflops: FlopCounterMode count (2 FLOPs per multiply-accumulate, conv/matmul/SDPA only); "
                    "gmacs: gflops / 2 = multiply-accumulates, the convention of the papers' 'FLOPs' columns")


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    """``sum(p.numel())`` over parameters (buffers such as BN running stats excluded)."""
    return int(sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only))


def count_flops(model: nn.Module, input_size: tuple[int, int], batch: int = 1,
                use_meta: bool = True) -> dict[str, Any]:
    """FLOPs of one forward pass at ``batch x 3 x H x W``.

    With ``use_meta`` the forward runs on a meta-device copy (shapes only, no arithmetic), so a
    101-layer teacher at 1024x2048 is counted in a second; models whose forward needs real data
    fall back to a real CPU forward under ``torch.no_grad``.
    """
    from torch.utils.flop_counter import FlopCounterMode

    h, w = int(input_size[0]), int(input_size[1])
    was_training = model.training

    def run(m: nn.Module, device: torch.device) -> tuple[int, dict[str, int]]:
        x = torch.zeros(batch, 3, h, w, device=device)
        fcm = FlopCounterMode(display=False)
        with torch.no_grad(), fcm:
            m(x)
        return int(fcm.get_total_flops()), {str(k): int(v) for k, v in fcm.get_flop_counts().get("Global", {}).items()}

    method = "meta"
    try:
        if not use_meta:
            raise RuntimeError("meta disabled")
        meta_model = copy.deepcopy(model).to("meta").eval()
        total, by_op = run(meta_model, torch.device("meta"))
    except Exception:
        method = "cpu forward"
        model.eval()
        try:
            device = next(model.parameters()).device
        except StopIteration:
            device = torch.device("cpu")
        try:
            total, by_op = run(model, device)
        finally:
            model.train(was_training)
    return {
        "flops": total,
        "gflops": total / 1e9,
        "gmacs": total / 2 / 1e9,
        "by_op": by_op,
        "input_shape": [batch, 3, h, w],
        "method": method,
        "convention": FLOPS_CONVENTION,
    }


def onnx_param_count(path_or_proto: str | Path | Any) -> int:
    """Number of deployed weights: floating-point initializers (shape constants excluded).

    Counts what the runtime holds, so BatchNorm folded into convs by the exporter is not
    counted separately; it can differ slightly from ``sum(p.numel())`` of the PyTorch model.
    """
    import onnx
    from onnx import TensorProto

    if isinstance(path_or_proto, (str, Path)):
        try:
            proto = onnx.load(str(path_or_proto), load_external_data=False)
        except Exception as e:  # DecodeError and friends: a truncated or foreign file
            from kdcompress.errors import KdError

            raise KdError(f"'{path_or_proto}' is not a valid ONNX file ({type(e).__name__}). Re-export it with "
                          f"`kdcompress export --to onnx`.") from None
    else:
        proto = path_or_proto
    floats = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE}
    quantized = {TensorProto.INT8, TensorProto.UINT8, TensorProto.INT32}
    not_weights: set[str] = set()  # quantisation scales / zero points, Resize roi / scales
    dq_values: set[str] = set()  # int8 weights and int32 biases of a QDQ graph
    for node in proto.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            not_weights.update(node.input[1:])
            if node.op_type == "DequantizeLinear":
                dq_values.add(node.input[0])
        elif node.op_type == "Resize":
            not_weights.update(node.input[1:])
    total = 0
    for t in proto.graph.initializer:
        if t.name in not_weights or len(t.dims) == 0:
            continue
        if t.data_type in floats or (t.data_type in quantized and t.name in dq_values):
            n = 1
            for d in t.dims:
                n *= int(d)
            total += n
    return total
