"""ONNX Runtime static INT8 quantisation (QDQ, per-channel weights) calibrated on training images.

Calibration uses the *training* split so the validation split used to judge the result never
influences the quantisation ranges. Images go through the val transform (normalisation only)
and are resized to the export input size, i.e. exactly what the deployed model sees.
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from kdcompress.errors import ExportError, KdError

CALIBRATION_METHODS = ("minmax", "entropy", "percentile")


def _calibration_reader_class() -> type:
    from onnxruntime.quantization import CalibrationDataReader

    class ImageCalibrationReader(CalibrationDataReader):
        """Feeds one normalised 1 x 3 x H x W image per call; ``rewind`` restarts (ORT may read twice)."""

        def __init__(self, images: Sequence[np.ndarray], input_name: str = "input") -> None:
            self.images = [np.ascontiguousarray(im[None] if im.ndim == 3 else im, dtype=np.float32) for im in images]
            self.input_name = input_name
            self._pos = 0

        def get_next(self) -> dict[str, np.ndarray] | None:
            if self._pos >= len(self.images):
                return None
            self._pos += 1
            return {self.input_name: self.images[self._pos - 1]}

        def rewind(self) -> None:
            self._pos = 0

        def __len__(self) -> int:
            return len(self.images)

    return ImageCalibrationReader


def make_calibration_reader(images: Sequence[np.ndarray], input_name: str = "input") -> Any:
    """A ``CalibrationDataReader`` over in-memory images (built lazily: onnxruntime is optional at import)."""
    return _calibration_reader_class()(images, input_name)


def calibration_images(dataset: Any, n: int, size: tuple[int, int] | None = None) -> list[np.ndarray]:
    """``n`` evenly spread, normalised images of ``dataset`` resized to ``size`` (1 x 3 x H x W)."""
    from kdcompress.export.verify import ResizedDataset, images_of

    if n is None or n <= 0:
        raise ExportError(f"calibration set is empty: --calib-images must be >= 1 (got {n}).")
    ds = ResizedDataset(dataset, size)
    imgs = list(images_of(ds, n))
    if not imgs:
        raise ExportError("calibration set is empty: the training split has no images. "
                          "Point --data-root at the dataset the model was trained on.")
    return imgs


def quantize_int8(
    fp32_onnx: str | Path,
    out_path: str | Path,
    calib_images: Sequence[np.ndarray] | Iterable[np.ndarray],
    per_channel: bool = True,
    calibrate_method: str = "minmax",
    activation_type: str = "quint8",
) -> Path:
    """Static QDQ INT8 model of ``fp32_onnx``, written atomically to ``out_path``.

    ``quant_pre_process`` (symbolic shape inference + ORT graph optimisation) runs first, as ORT
    recommends, so BN-folded convs and fused patterns are what gets quantised. Activations are
    uint8 / weights int8 per output channel: the U8S8 combination ORT's x86 kernels are fast at.
    """
    import onnxruntime  # noqa: F401  (clear error below if missing)
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    images = list(calib_images)
    if not images:
        raise ExportError("calibration set is empty: no training images were found for INT8 calibration. "
                          "Pass --calib-images >= 1 and a --data-root with a training split.")
    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    if calibrate_method not in methods:
        raise KdError(f"Unknown calibration method '{calibrate_method}'. Available: {', '.join(methods)}")
    acts = {"quint8": QuantType.QUInt8, "qint8": QuantType.QInt8}
    if activation_type not in acts:
        raise KdError(f"Unknown activation type '{activation_type}'. Available: {', '.join(acts)}")
    fp32_onnx = Path(fp32_onnx)
    if not fp32_onnx.is_file():
        raise ExportError(f"'{fp32_onnx}' does not exist: INT8 quantisation needs the fp32 ONNX first.")

    from kdcompress.engine.checkpoint import atomic_write

    with tempfile.TemporaryDirectory(prefix="kd-int8-") as tmp:
        pre = Path(tmp) / "preprocessed.onnx"
        quiet = logging.getLogger()
        old_level = quiet.level
        quiet.setLevel(logging.ERROR)  # quantize_static logs every node at INFO
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                quant_pre_process(str(fp32_onnx), str(pre), skip_symbolic_shape=False)
        except Exception as e:
            quiet.setLevel(old_level)
            raise ExportError(f"ONNX Runtime quant_pre_process failed: {type(e).__name__}: "
                              f"{str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}. Re-export the fp32 ONNX.") from e

        def write(tmp_out: Path) -> None:
            reader = make_calibration_reader(images)
            try:
                with contextlib.redirect_stdout(io.StringIO()):
                    quantize_static(
                        str(pre), str(tmp_out), reader,
                        quant_format=QuantFormat.QDQ,
                        per_channel=per_channel,
                        activation_type=acts[activation_type],
                        weight_type=QuantType.QInt8,
                        calibrate_method=methods[calibrate_method],
                    )
            except Exception as e:
                raise ExportError(f"ONNX Runtime static quantisation failed: {type(e).__name__}: "
                                  f"{str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}.") from e

        try:
            return atomic_write(Path(out_path), write)
        finally:
            quiet.setLevel(old_level)
