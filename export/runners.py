"""The TensorRT runner (the core's runner interface, kdcompress.runtime, holds PyTorch and ONNX Runtime).

It lives in export because loading an engine goes through the compatibility checks of
:mod:`kdcompress.export.tensorrt`; ``kdcompress.export`` registers it as the ``tensorrt`` runtime.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdcompress.errors import ExportError
from kdcompress.runtime import OrtRunner, Runner, TorchRunner, as_batch, to_numpy  # noqa: F401  (the runner family)


class TrtRunner(Runner):
    """A TensorRT 10.x / 11.x engine executed with torch CUDA tensors as I/O buffers (no pycuda).

    The sidecar's TensorRT version and compute capability are checked before deserialising (see
    :func:`kdcompress.export.tensorrt.load_engine`). Outputs must have a shape known once the
    input shape is set; a data-dependent output (``-1`` dims) is refused with an ExportError.
    """

    def __init__(self, engine_path: str | Path, device: str | torch.device = "cuda") -> None:
        from kdcompress.export.tensorrt import import_tensorrt, load_engine, require_cuda

        self.trt = import_tensorrt()
        require_cuda()
        self.device = torch.device(device)
        self.path = Path(engine_path)
        self.engine, self._runtime = load_engine(self.path)
        trt = self.trt
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if len(self.inputs) != 1 or not self.outputs:
            raise ExportError(f"engine '{self.path.name}' has inputs {self.inputs} and outputs {self.outputs}; expected "
                              f"one input and at least one output.")
        self.context = self.engine.create_execution_context()
        if self.context is None:
            raise ExportError(f"TensorRT could not create an execution context for '{self.path.name}' (out of GPU memory?).")
        self.stream = torch.cuda.Stream(device=self.device)
        self.name = "tensorrt"

    def _torch_dtype(self, name: str) -> torch.dtype:
        """torch dtype of an engine I/O tensor (DataType shorthands as confirmed in trt_api.TRT_API)."""
        trt = self.trt
        table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.bfloat16: torch.bfloat16,
                 trt.int8: torch.int8, trt.uint8: torch.uint8, trt.int32: torch.int32, trt.int64: torch.int64,
                 trt.bool: torch.bool}
        if hasattr(torch, "float8_e4m3fn"):
            table[trt.fp8] = torch.float8_e4m3fn  # TensorRT's FP8 is E4M3
        dtype = self.engine.get_tensor_dtype(name)
        if dtype not in table:
            raise ExportError(f"engine '{self.path.name}' tensor '{name}' has TensorRT type {dtype}, which has no torch "
                              f"equivalent here; rebuild the engine with float32 I/O (kdcompress export keeps I/O fp32).")
        return table[dtype]

    def infer_torch(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """GPU in, GPU out (no host copies): what latency benchmarks time. One tensor, or one per output in the
        engine's order (detection: boxes, scores, labels, num_detections)."""
        x = as_batch(x)
        inp = self.inputs[0]
        x = x.to(self.device, self._torch_dtype(inp)).contiguous()
        if not self.context.set_input_shape(inp, tuple(x.shape)):
            lo, opt, hi = self.engine.get_tensor_profile_shape(inp, 0)
            raise ExportError(f"input shape {tuple(x.shape)} is outside the engine's optimisation profile "
                              f"(min {tuple(lo)}, max {tuple(hi)}). Rebuild the engine with a wider profile.")
        self.context.set_tensor_address(inp, x.data_ptr())
        outs = []
        for out_name in self.outputs:
            shape = tuple(int(d) for d in self.context.get_tensor_shape(out_name))
            if any(d < 0 for d in shape):
                raise ExportError(f"engine '{self.path.name}' output '{out_name}' has a data-dependent shape "
                                  f"{list(shape)} for input {tuple(x.shape)}; kdcompress runners need output shapes "
                                  f"known from the input shape (detection exports pad to a fixed number of rows).")
            out = torch.empty(shape, dtype=self._torch_dtype(out_name), device=self.device)
            self.context.set_tensor_address(out_name, out.data_ptr())
            outs.append(out)
        # TensorRT must see the input written before it runs on its own stream.
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise ExportError(f"TensorRT execution failed for '{self.path.name}' (see the TensorRT log above).")
        torch.cuda.current_stream(self.device).wait_stream(self.stream)
        x.record_stream(self.stream)
        for out in outs:
            out.record_stream(self.stream)
        return outs[0] if len(outs) == 1 else tuple(outs)

    def infer(self, x: np.ndarray | torch.Tensor) -> Any:
        t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)) if isinstance(x, np.ndarray) else x
        out = self.infer_torch(t)
        self.stream.synchronize()
        return to_numpy(out)

    def device_memory_bytes(self) -> int:
        """Activation/scratch memory TensorRT allocates for the context (outside torch's allocator).

        ``device_memory_size_v2`` exists from TensorRT 10.1 and is the only one in 11.x;
        ``device_memory_size`` (removed in 11) is the fallback for 10.0.
        """
        if hasattr(self.engine, "device_memory_size_v2"):
            return int(self.engine.device_memory_size_v2)
        return int(self.engine.device_memory_size)

    def close(self) -> None:
        self.context = None
        self.engine = None
        self._runtime = None
