"""What an export backend receives and returns, and the backend record itself.

``export_checkpoint`` does what every target shares (check inputs, load the model, build and verify
the fp32 ONNX, PyTorch mIoU, calibration images) and hands an :class:`ExportJob` to the target's
:class:`Backend`, one module per target, registered by name in ``kdcompress.export.BACKENDS``.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from kdcompress.engine.evaluate import eval_count
from kdcompress.export.metadata import sidecar_path


@dataclass
class ExportResult:
    """What an export produced and how it was verified (all metrics measured in this run)."""

    target: str
    precision: str
    artifact: Path
    sidecar: Path
    parity: dict[str, Any]  # the artifact vs PyTorch (see verify_against), incl. miou_* and eval_images
    miou_torch: float | None
    miou_artifact: float | None
    drop: float | None  # miou_torch - miou_artifact (absolute mIoU)
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage
    onnx_fp32: Path | None = None
    onnx_parity: dict[str, Any] = field(default_factory=dict)  # the fp32 ONNX vs PyTorch (== parity for --to onnx)
    onnx_reused: bool = False
    eval_images: int = 0
    metric: str = "mIoU"  # the task's headline metric that miou_torch / miou_artifact / drop hold
    summary: str = ""  # the task's one-line parity summary

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("artifact", "sidecar", "onnx_fp32"):
            d[k] = str(d[k]) if d[k] is not None else None
        return d


class _Progress:
    """Stage lines on stderr (``✓ export ONNX 3.1 s``) and the per-stage timings."""

    def __init__(self, enabled: bool) -> None:
        self.timings: dict[str, float] = {}
        self.console = None
        if enabled:
            from rich.console import Console

            self.console = Console(stderr=True)

    @contextmanager
    def stage(self, key: str, label: str) -> Iterator[None]:
        t0 = time.perf_counter()
        status = self.console.status(f"{label} ...") if self.console is not None else None
        if status is not None:
            status.start()
        try:
            yield
        finally:
            if status is not None:
                status.stop()
        dt = time.perf_counter() - t0
        self.timings[key] = self.timings.get(key, 0.0) + dt
        if self.console is not None:
            self.console.print(f"[green]✓[/green] {label} [dim]({dt:.1f} s)[/dim]")

    def note(self, text: str) -> None:
        if self.console is not None:
            self.console.print(text)


@dataclass
class ExportJob:
    """The checked, shared part of one export; a backend builds and verifies ``artifact`` from it."""

    target: str
    ckpt: Path
    model: Any
    meta: dict[str, Any]
    task: Any  # kdcompress.tasks.Task: metric, parity and tolerances
    size: tuple[int, int]
    val: Any  # validation split resized to ``size``
    torch_ref: Any  # the PyTorch runner every artifact is compared with (CPU)
    precision: str
    tol: Any  # the task's Tolerances for ``precision``
    artifact: Path
    fp32_path: Path
    fp32_parity: dict[str, Any]
    miou_torch: float
    reused: bool
    prog: _Progress
    common: dict[str, Any]  # sidecar fields every artifact shares
    eval_config: dict[str, Any]
    verify_images: int
    max_eval_images: int | None
    calib: list[Any]
    opset: int
    options: dict[str, Any] = field(default_factory=dict)  # backend-specific (TensorRT: workspace, shapes, caches)

    def eval_images(self) -> int:
        return eval_count(self.val, self.max_eval_images)

    def result(self, parity: dict[str, Any], miou_artifact: float, drop: float) -> ExportResult:
        return ExportResult(target=self.target, precision=self.precision, artifact=self.artifact,
                            sidecar=sidecar_path(self.artifact), parity=parity, miou_torch=self.miou_torch,
                            miou_artifact=miou_artifact, drop=drop, timings=self.prog.timings,
                            onnx_fp32=self.fp32_path, onnx_parity=self.fp32_parity, onnx_reused=self.reused,
                            eval_images=parity["eval_images"])


@dataclass(frozen=True)
class Backend:
    """An export target: its precisions, default precision, artifact suffix and builder.

    ``build`` is None for the fp32 ONNX itself (made and verified for every target). ``preflight``
    runs before minutes of ONNX export, to fail early on a machine that cannot build the target.
    """

    name: str
    precisions: tuple[str, ...]
    default_precision: str
    suffix: Callable[[str], str]  # precision -> artifact file suffix
    build: Callable[[ExportJob], ExportResult] | None = None
    preflight: Callable[[], None] | None = None
