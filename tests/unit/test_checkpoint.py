"""Checkpoint safety: weights_only loads, atomic writes, clear errors for wrong files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from kdcompress.engine.checkpoint import (atomic_save, load_model, load_model_checkpoint, save_model_checkpoint,
                                          save_state)
from kdcompress.errors import CheckpointError, KdError
from kdcompress.models import build_model


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/kdcompress-pwned",))


def test_pickle_with_code_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"format": "kdcompress.model/1", "payload": Evil()}, path)
    marker = Path("/tmp/kdcompress-pwned")
    marker.unlink(missing_ok=True)
    with pytest.raises(CheckpointError, match="Refusing to load"):
        load_model_checkpoint(path)
    assert not marker.exists()


def test_truncated_checkpoint(tmp_path: Path) -> None:
    m = build_model("deeplabv3plus-mbv2", 3)
    path = save_model_checkpoint(tmp_path / "m.pt", m, {"arch": "deeplabv3plus-mbv2", "num_classes": 3})
    data = path.read_bytes()
    bad = tmp_path / "bad.pt"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_model_checkpoint(bad)
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError):
        load_model_checkpoint(tmp_path / "garbage.pt")


def test_roundtrip_and_wrong_architecture(tmp_path: Path) -> None:
    m = build_model("deeplabv3plus-mbv2", 3)
    path = save_model_checkpoint(tmp_path / "m.pt", m, {"arch": "deeplabv3plus-mbv2", "num_classes": 3})
    m2, meta = load_model(path)
    assert meta["arch"] == "deeplabv3plus-mbv2"
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), m2.state_dict().values()))
    # claims another arch -> mismatch reported in one line
    obj = torch.load(path, weights_only=True)
    obj["meta"]["arch"] = "deeplabv3plus-r18"
    torch.save(obj, tmp_path / "lie.pt")
    with pytest.raises(CheckpointError, match="another architecture"):
        load_model(tmp_path / "lie.pt")
    obj["meta"]["arch"], obj["meta"]["num_classes"] = "deeplabv3plus-mbv2", 5
    torch.save(obj, tmp_path / "k.pt")
    with pytest.raises(CheckpointError, match="different class count"):
        load_model(tmp_path / "k.pt")


def test_state_file_is_not_a_model(tmp_path: Path) -> None:
    save_state(tmp_path / "state.pt", {"step": 3})
    with pytest.raises(CheckpointError, match="resumable training state"):
        load_model_checkpoint(tmp_path / "state.pt")
    torch.save({"state_dict": {}}, tmp_path / "plain.pt")
    with pytest.raises(CheckpointError, match="no kdcompress model metadata"):
        load_model_checkpoint(tmp_path / "plain.pt")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model_checkpoint(tmp_path / "missing.pt")


def test_atomic_save_leaves_nothing_on_failure(tmp_path: Path) -> None:
    class Boom:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        atomic_save({"x": Boom()}, tmp_path / "out.pt")
    assert list(tmp_path.iterdir()) == []


def test_unwritable_folder(tmp_path: Path) -> None:
    # A path below a regular file cannot be created, even as root.
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    with pytest.raises(KdError, match="Cannot write"):
        atomic_save({"a": 1}, blocker / "out" / "x.pt")
