"""PyTorch -> ONNX through the dynamo exporter, checked and simplified before it is written.

Only ``torch.onnx.export(..., dynamo=True)`` is used: if it fails the user gets its reason,
not a silently different graph from the legacy TorchScript exporter.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from kdcompress.errors import ExportError, KdError
from kdcompress.profiling.static import onnx_param_count  # noqa: F401  (re-exported)

MIN_OPSET = 17  # LayerNormalization / stable Resize semantics; TensorRT 10 and ORT >= 1.14 run it
DEFAULT_OPSET = 18
INPUT_NAME = "input"
OUTPUT_NAME = "logits"


def check_opset(opset: int) -> int:
    """Reject opsets below 17 and above what the installed ``onnx`` package defines."""
    import onnx

    newest = onnx.defs.onnx_opset_version()
    if not isinstance(opset, int) or isinstance(opset, bool):
        raise ExportError(f"opset must be an integer, got {opset!r}. Use --opset {DEFAULT_OPSET}.")
    if opset < MIN_OPSET:
        raise ExportError(f"opset {opset} is too old: kdcompress exports need opset >= {MIN_OPSET}. Use --opset {DEFAULT_OPSET}.")
    if opset > newest:
        raise ExportError(f"opset {opset} is newer than the installed onnx package supports ({newest}). "
                          f"Use --opset {DEFAULT_OPSET} or upgrade onnx.")
    return opset


def _check_size(model: nn.Module, input_size: tuple[int, int]) -> tuple[int, int]:
    if len(tuple(input_size)) != 2 or any(int(s) <= 0 for s in input_size):
        raise ExportError(f"input size must be two positive integers (H, W), got {input_size!r}.")
    h, w = int(input_size[0]), int(input_size[1])
    check = getattr(model, "check_input_size", None)
    if callable(check):
        check((h, w))  # KdError naming the multiples that work
    return h, w


def export_onnx(
    model: nn.Module,
    out_path: str | Path,
    input_size: tuple[int, int],
    dynamic_batch: bool = True,
    dynamic_spatial: bool = False,
    opset: int = DEFAULT_OPSET,
    simplify: bool = True,
    input_names: Sequence[str] = (INPUT_NAME,),
    output_names: Sequence[str] = (OUTPUT_NAME,),
) -> Path:
    """Export ``model`` alone (eval mode, fp32) to ``out_path``; I/O names from the task
    (segmentation: input ``input``, output ``logits``).

    Spatial axes are static by default because TensorRT/ORT optimise fixed shapes much better
    and the models need sizes that are multiples of their output stride anyway.
    """
    import onnx

    check_opset(opset)
    h, w = _check_size(model, input_size)
    out_path = Path(out_path)
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
    except StopIteration:
        device = torch.device("cpu")
    example = torch.randn(1, 3, h, w, device=device)

    dims: dict[int, Any] = {}
    if dynamic_batch:
        dims[0] = torch.export.Dim("batch", min=1, max=4096)
    if dynamic_spatial:
        # Dim.DYNAMIC lets export infer the divisibility constraints the backbone imposes.
        dims[2] = torch.export.Dim.DYNAMIC
        dims[3] = torch.export.Dim.DYNAMIC
    try:
        with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                model, (example,), dynamo=True, opset_version=opset,
                input_names=list(input_names), output_names=list(output_names),
                dynamic_shapes=(dims,) if dims else None, external_data=False, verbose=False,
            )
        proto = program.model_proto
    except KdError:
        raise
    except Exception as e:  # the exporter raises many types; the user needs its first line
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise ExportError(
            f"torch.onnx.export (dynamo) failed for {getattr(model, 'arch', type(model).__name__)} at "
            f"{h}x{w}: {type(e).__name__}: {reason}. Try another --opset or a static shape "
            f"(no --dynamic-spatial); set KDCOMPRESS_DEBUG=1 for the traceback."
        ) from e
    finally:
        model.train(was_training)

    if dynamic_spatial:
        _rename_symbols(proto, {2: "height", 3: "width"})
    _check(proto, "exported")
    if simplify:
        proto = _slim(proto)
        _check(proto, "simplified")
    names_in = [i.name for i in proto.graph.input]
    names_out = [o.name for o in proto.graph.output]
    if names_in != list(input_names) or names_out != list(output_names):
        raise ExportError(f"exported graph has inputs {names_in} / outputs {names_out}, expected "
                          f"{list(input_names)} / {list(output_names)}: the model's outputs do not match its task.")

    from kdcompress.engine.checkpoint import atomic_write

    return atomic_write(out_path, lambda tmp: onnx.save(proto, str(tmp)))


def _check(proto: Any, stage: str) -> None:
    import onnx

    try:
        onnx.checker.check_model(proto, full_check=True)
    except Exception as e:
        raise ExportError(f"the {stage} ONNX graph is invalid: {str(e).splitlines()[0][:300]}. "
                          f"Report this with the model name and opset.") from e


def _slim(proto: Any) -> Any:
    """onnxslim: constant folding + dead-node removal + fusion; keeps I/O names."""
    import onnxslim

    try:
        with contextlib.redirect_stdout(io.StringIO()):
            slim = onnxslim.slim(proto)
    except Exception as e:
        raise ExportError(f"onnxslim failed to simplify the graph: {type(e).__name__}: "
                          f"{str(e).splitlines()[0][:200] if str(e) else ''}. Re-run with simplification off.") from e
    if slim is None:
        raise ExportError("onnxslim returned no model. Re-run with simplification off.")
    return slim


def _rename_symbols(proto: Any, axis_names: dict[int, str]) -> None:
    """Give the exporter's symbols (``s53``) readable names taken from the input's axes."""
    inp = proto.graph.input[0].type.tensor_type.shape.dim
    mapping = {inp[a].dim_param: n for a, n in axis_names.items() if a < len(inp) and inp[a].dim_param}
    if not mapping:
        return
    for vi in list(proto.graph.input) + list(proto.graph.output) + list(proto.graph.value_info):
        for d in vi.type.tensor_type.shape.dim:
            if d.dim_param in mapping:
                d.dim_param = mapping[d.dim_param]


def onnx_opset(path_or_proto: str | Path | Any) -> int | None:
    import onnx

    proto = onnx.load(str(path_or_proto), load_external_data=False) if isinstance(path_or_proto, (str, Path)) else path_or_proto
    for imp in proto.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    return None
