"""Checkpoint I/O: atomic writes, ``weights_only`` loads, and clear errors.

Two kinds of file:

* model checkpoint (``*.pt``): the model's weights alone plus metadata (architecture,
  classes, normalisation, input size). ``evaluate``, ``export`` and ``distill --teacher``
  read it; it never holds optimizer, teacher or distiller state.
* training state (``*.state.pt``): optimizer, scheduler, step, RNG states and, for
  distillation, the method's own modules. Only ``--resume`` reads it.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch

from kdcompress.errors import CheckpointError, KdError

MODEL_FORMAT = "kdcompress.model/1"
STATE_FORMAT = "kdcompress.state/1"


def atomic_write(path: str | Path, write_fn) -> Path:
    """Call ``write_fn(tmp_path)`` then rename over ``path``: readers never see half a file."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise KdError(f"Cannot write to '{path.parent}': {e.strerror}. Choose a writable --out folder.") from e
    os.close(fd)
    try:
        write_fn(Path(tmp))
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; artifacts are meant to be shared
        os.replace(tmp, path)
    except OSError as e:  # disk full, quota, permissions: one line, the old file untouched
        Path(tmp).unlink(missing_ok=True)
        try:
            free = f"{shutil.disk_usage(path.parent).free / 2**20:.0f} MiB free there"
        except OSError:
            free = "free space unknown"
        raise KdError(f"Cannot write '{path}': {e.strerror or e} ({free}). Free some space or choose another "
                      f"output folder; the previous file is unchanged.") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_save(obj: Any, path: str | Path) -> Path:
    """``torch.save`` through a temp file + rename."""
    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hash in chunks so multi-GB teachers do not have to fit in memory."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def paired(model_path: str | Path, state_path: str | Path) -> bool:
    """True when ``model_path`` was written right after ``state_path`` by the same save.

    The trainer writes ``state.pt`` first, then ``model.pt`` naming the state's SHA-256: a crash
    between the two leaves an older ``model.pt`` that no longer pairs, never a model without state.
    """
    model_path, state_path = Path(model_path), Path(state_path)
    if not (model_path.is_file() and state_path.is_file()):
        return False
    want = load_model_checkpoint(model_path)["meta"].get("state_sha256")
    return want is not None and want == sha256_file(state_path)


def safe_load(path: str | Path) -> dict[str, Any]:
    """Load with ``weights_only=True``; turn every failure into one CheckpointError line."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"Checkpoint '{path}' does not exist. Check the path (train one with `kdcompress train`).")
    if not zipfile.is_zipfile(path):  # torch.save always writes a zip; anything else is damaged or foreign
        raise CheckpointError(
            f"Checkpoint '{path}' is corrupt or truncated (not a torch zip archive). Re-create it or pick another file."
        )
    try:  # the archive's CRC-32s catch a file damaged in place (still a valid zip, garbage weights)
        with zipfile.ZipFile(path) as zf:
            bad = zf.testzip()
    except (zipfile.BadZipFile, OSError, RuntimeError) as e:
        raise CheckpointError(f"Checkpoint '{path}' is corrupt ({type(e).__name__}). Re-create it or pick another "
                              f"file.") from None
    if bad is not None:
        raise CheckpointError(f"Checkpoint '{path}' is corrupt: member '{bad}' fails its CRC check (damaged on "
                              f"disk?). Re-create it or pick another file.")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"Refusing to load '{path}': it contains Python objects that are not plain weights "
            f"(weights_only=True). Only load checkpoints written by kdcompress."
        ) from e
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        raise CheckpointError(
            f"Checkpoint '{path}' is corrupt or truncated ({type(e).__name__}). Re-create it or pick another file."
        ) from e
    if not isinstance(obj, dict):
        raise CheckpointError(f"'{path}' is not a kdcompress checkpoint (found {type(obj).__name__}).")
    return obj


def save_model_checkpoint(path: str | Path, model: torch.nn.Module, meta: dict[str, Any]) -> Path:
    """Save weights alone + metadata. ``meta`` must hold at least arch and num_classes."""
    for key in ("arch", "num_classes"):
        if key not in meta:
            raise ValueError(f"model checkpoint metadata needs '{key}'")
    inner = model.module if hasattr(model, "module") else model
    state = {k: v.detach().cpu() for k, v in inner.state_dict().items()}
    return atomic_save({"format": MODEL_FORMAT, "meta": dict(meta), "state_dict": state}, path)


def load_model_checkpoint(path: str | Path) -> dict[str, Any]:
    """Return ``{"meta": ..., "state_dict": ...}`` of a kdcompress model checkpoint."""
    obj = safe_load(path)
    fmt = obj.get("format")
    if fmt == STATE_FORMAT:
        raise CheckpointError(
            f"'{path}' is a resumable training state, not a model. Use the model checkpoint beside it "
            f"(e.g. model.pt), or pass this file to --resume."
        )
    if fmt != MODEL_FORMAT or "state_dict" not in obj or "meta" not in obj:
        raise CheckpointError(
            f"'{path}' has no kdcompress model metadata (format {fmt!r}). Only checkpoints written by "
            f"`kdcompress train` or `kdcompress distill` can be used here."
        )
    meta = obj["meta"]
    for key in ("arch", "num_classes"):
        if key not in meta:
            raise CheckpointError(f"'{path}' metadata lacks '{key}'. Re-create the checkpoint with kdcompress.")
    return obj


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict[str, Any]]:
    """Build the architecture named in the checkpoint and load its weights (strict)."""
    from kdcompress.models import build_model

    obj = load_model_checkpoint(path)
    meta = obj["meta"]
    model = build_model(meta["arch"], num_classes=int(meta["num_classes"]),
                        output_stride=meta.get("output_stride"))
    load_weights(model, obj["state_dict"], str(path))
    return model.to(device).eval(), meta


def load_weights(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Strict load with a one-line explanation of a mismatch (other architecture or class count)."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    if missing or unexpected:
        raise CheckpointError(
            f"'{source}' was saved from another architecture than '{getattr(model, 'arch', type(model).__name__)}' "
            f"({len(missing)} missing, {len(unexpected)} unexpected keys, e.g. "
            f"{(missing or unexpected)[0]!r}). Pass the matching --model or checkpoint."
        )
    for k, v in state_dict.items():
        if own[k].shape != v.shape:
            raise CheckpointError(
                f"'{source}' does not fit the model: '{k}' has shape {tuple(v.shape)}, model expects "
                f"{tuple(own[k].shape)} (different class count or width). Use a matching checkpoint."
            )
    model.load_state_dict(state_dict, strict=True)


def save_state(path: str | Path, state: dict[str, Any]) -> Path:
    return atomic_save({"format": STATE_FORMAT, **state}, path)


def load_state(path: str | Path) -> dict[str, Any]:
    obj = safe_load(path)
    if obj.get("format") != STATE_FORMAT:
        raise CheckpointError(
            f"'{path}' is not a resumable training state. Pass the run's *.state.pt file (or the run folder) to --resume."
        )
    return obj
