"""One inference interface over PyTorch, ONNX Runtime and (registered by ``kdcompress.export``) TensorRT.

Every runner takes an NCHW float32 batch (numpy or torch) of *normalised* images and returns the
model output as a float32 numpy array, so verification, profiling and the pipeline compare any two
the same way (Polygraphy-style runners). Optional runtimes are imported lazily; a missing one is a
one-line MissingDependencyError. ``RUNNERS`` maps a runtime name to a factory
``(artifact_path, device, threads) -> Runner``; TensorRT's factory is added by ``kdcompress.export``
(it needs the engine-compatibility checks that live there).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from kdcompress.errors import ExportError, KdError, MissingDependencyError
from kdcompress.registry import Registry


def as_batch(x: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4 or x.shape[1] != 3:
        raise KdError(f"runners take an N x 3 x H x W image batch, got shape {tuple(x.shape)}.")
    return x


Outputs = Any  # one float32 array (segmentation logits) or a tuple of arrays (detection: boxes, scores, ...)


def to_numpy(out: Any) -> Outputs:
    """A model's output as numpy: one float32 array, or a tuple (graph output order, dtypes kept)."""
    if isinstance(out, dict):  # torchvision-style {"out": ...}
        out = out["out"]
    if isinstance(out, (tuple, list)):
        return tuple(o.detach().cpu().numpy() if isinstance(o, torch.Tensor) else np.asarray(o) for o in out)
    return out.float().cpu().numpy()


class Runner(ABC):
    """``infer(batch) -> outputs``; usable as a context manager that calls ``close``."""

    name: str = "runner"

    @abstractmethod
    def infer(self, x: np.ndarray | torch.Tensor) -> Outputs:
        """Logits (N x K x H x W float32 numpy) for a normalised N x 3 x H x W batch; a tuple of arrays for
        a multi-output graph (detection: boxes, scores, labels, num_detections)."""

    def close(self) -> None:
        """Release sessions / GPU memory; idempotent."""

    def __enter__(self) -> "Runner":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"


class TorchRunner(Runner):
    """The eager PyTorch model: the reference every artifact is compared with."""

    def __init__(self, model: nn.Module, device: str | torch.device = "cpu") -> None:
        from kdcompress.engine.distributed import resolve_device

        self.device = resolve_device(device)
        self.model = model.to(self.device).eval()
        self.name = f"torch-{self.device.type}"

    @torch.inference_mode()
    def infer(self, x: np.ndarray | torch.Tensor) -> np.ndarray:
        x = as_batch(x)
        t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)) if isinstance(x, np.ndarray) else x
        return to_numpy(self.model(t.to(self.device, torch.float32)))

    def close(self) -> None:
        self.model = None  # type: ignore[assignment]
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


class OrtRunner(Runner):
    """ONNX Runtime session; CPU EP unless ``providers`` asks for another (never a silent fallback)."""

    def __init__(self, onnx_path: str | Path, providers: Sequence[str] | str | None = None,
                 intra_op_num_threads: int | None = None, optimization_level: str = "all") -> None:
        self.path = Path(onnx_path)
        self.session = create_ort_session(self.path, providers, intra_op_num_threads=intra_op_num_threads,
                                          optimization_level=optimization_level)
        self.providers = self.session.get_providers()
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.output_name = self.output_names[0]
        self.name = f"ort-{self.providers[0].replace('ExecutionProvider', '').lower()}"

    def infer(self, x: np.ndarray | torch.Tensor) -> Outputs:
        x = as_batch(x)
        arr = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else x
        arr = np.ascontiguousarray(arr, dtype=np.float32)
        try:
            outs = self.session.run(self.output_names, {self.input_name: arr})
        except Exception as e:
            shape = [d for d in self.session.get_inputs()[0].shape]
            raise ExportError(f"ONNX Runtime failed on an input of shape {list(arr.shape)} (model expects {shape}): "
                              f"{str(e).strip().splitlines()[0][:200]}. Feed the exported size or export with dynamic axes.") from e
        return np.asarray(outs[0], dtype=np.float32) if len(outs) == 1 else tuple(np.asarray(o) for o in outs)

    def close(self) -> None:
        self.session = None


def _ort_factory(path: str | Path, device: str = "cpu", threads: int | None = None) -> OrtRunner:
    return OrtRunner(path, ["CUDAExecutionProvider"] if str(device).startswith("cuda") else None,
                     intra_op_num_threads=threads)


RUNNERS: Registry[Callable[..., Runner]] = Registry("runtime")
RUNNERS.add("ort", _ort_factory)


def create_ort_session(onnx_path: str | Path, providers: Sequence[str] | str | None = None,
                       intra_op_num_threads: int | None = None, inter_op_num_threads: int | None = 1,
                       optimization_level: str = "all") -> Any:
    """An ONNX Runtime session on exactly the requested providers, or one clear error line.

    ORT silently falls back to the CPU EP when e.g. CUDA libraries are missing; we compare
    ``session.get_providers()`` with the request and refuse instead. A model stamped with an
    opset this ORT cannot run is reported with the newest opset it supports.
    """
    import re

    import onnxruntime as ort

    aliases = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider",
               "tensorrt": "TensorrtExecutionProvider", "trt": "TensorrtExecutionProvider"}
    if providers is None:
        wanted = ["CPUExecutionProvider"]
    else:
        wanted = [aliases.get(p.lower(), p) for p in ([providers] if isinstance(providers, str) else providers)]
    path = Path(onnx_path)
    if not path.is_file():
        raise ExportError(f"ONNX file '{path}' does not exist. Export it first with `kdcompress export --to onnx`.")
    available = ort.get_available_providers()
    missing = [p for p in wanted if p not in available]
    if missing:
        hint = (" Install onnxruntime-gpu (pip install 'kdcompress[gpu]') on a CUDA machine."
                if "CUDAExecutionProvider" in missing else "")
        raise MissingDependencyError(
            f"ONNX Runtime provider {missing[0]} is not available (this build has {', '.join(available)}).{hint}")
    levels = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }
    if optimization_level not in levels:
        raise KdError(f"Unknown ORT optimisation level '{optimization_level}'. Available: {', '.join(levels)}")
    so = ort.SessionOptions()
    so.graph_optimization_level = levels[optimization_level]
    so.log_severity_level = 3  # errors only; "unused initializer" warnings are noise
    if intra_op_num_threads is not None:
        so.intra_op_num_threads = int(intra_op_num_threads)
    if inter_op_num_threads is not None:
        so.inter_op_num_threads = int(inter_op_num_threads)
    try:
        session = ort.InferenceSession(str(path), sess_options=so, providers=wanted)
    except Exception as e:
        msg = str(e)
        m = re.search(r"support for domain ai\.onnx is till opset (\d+)", msg)
        if m:
            newest = int(m.group(1))
            import onnx

            stamped = next((i.version for i in onnx.load(str(path), load_external_data=False).opset_import
                            if i.domain in ("", "ai.onnx")), None)
            raise ExportError(
                f"ONNX Runtime {ort.__version__} cannot run '{path.name}' (opset {stamped}): it supports ai.onnx "
                f"up to opset {newest}. Re-export with --opset {min(newest, 18)}.") from e
        first = msg.strip().splitlines()[0][:300] if msg.strip() else type(e).__name__
        raise ExportError(f"ONNX Runtime could not load '{path.name}': {first}. Re-export the model.") from e
    actual = session.get_providers()
    if actual[: len(wanted)] != wanted:
        raise ExportError(f"ONNX Runtime fell back to {actual} although {wanted} was requested. "
                          f"Fix the CUDA/cuDNN installation or ask for the CPU provider explicitly.")
    return session
