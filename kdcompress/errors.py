"""Errors meant for the user: one line that names the problem and the fix.

The CLI prints ``str(err)`` in red and exits with ``err.exit_code``; the traceback is shown
only with ``KDCOMPRESS_DEBUG=1``. Library code raises these instead of letting a deep
PyTorch/PIL traceback reach the user.
"""

from __future__ import annotations


class KdError(Exception):
    """A user-facing failure (bad input, missing file, mismatch)."""

    exit_code = 2


class DataError(KdError):
    """Dataset folder missing, wrong layout or labels out of range."""


class CheckpointError(KdError):
    """Checkpoint missing, corrupt, unsafe, or made for another model."""


class ConfigError(KdError):
    """Unknown keys, bad values or conflicting options in a recipe or on the command line."""


class ExportError(KdError):
    """An export could not be produced or failed its verification."""


class NonFiniteLossError(KdError):
    """Training produced NaN/Inf; the last good checkpoint is kept."""


class GateError(KdError):
    """A CI gate (min mIoU, max export drop, FPS, latency) failed. Distinct exit code for CI."""

    exit_code = 3


class MissingDependencyError(KdError):
    """An optional dependency (TensorRT, CUDA) is needed for the requested action."""

    exit_code = 4
