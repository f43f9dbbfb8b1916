"""Built-in pretraining: cached in torchvision layout, loaded by the same path as ImageNet files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kdcompress.errors import CheckpointError, ConfigError
from kdcompress.models import build_model
from kdcompress.pretrain import PretrainConfig, ensure_digits_pretrained, resolve_pretrained, torchvision_classifier

TINY = PretrainConfig(steps=2, batch_size=4, image_size=32, eval_images=4)


@pytest.fixture(scope="module")
def mbv2_file() -> Path:
    return ensure_digits_pretrained("mbv2", 0, TINY, log=lambda _m: None)


def test_cache_is_torchvision_layout_with_a_record(mbv2_file: Path) -> None:
    state = torch.load(mbv2_file, weights_only=True)
    assert set(state) == set(torchvision_classifier("mbv2", 11).state_dict())
    rec = json.loads(mbv2_file.with_suffix(".json").read_text())
    assert rec["backbone"] == "mbv2" and 0.0 <= rec["held_out_accuracy"] <= 1.0 and rec["config"]["steps"] == 2
    # a second call reuses the file untouched
    before = mbv2_file.stat().st_mtime_ns
    assert ensure_digits_pretrained("mbv2", 0, TINY, log=lambda _m: None) == mbv2_file
    assert mbv2_file.stat().st_mtime_ns == before


def test_pretrained_path_loads_the_cached_backbone(mbv2_file: Path) -> None:
    state = torch.load(mbv2_file, weights_only=True)
    model = build_model("deeplabv3plus-mbv2", 11, pretrained=resolve_pretrained("digits", "mbv2", cfg=TINY))
    torch.testing.assert_close(model.backbone.features[0][0].weight, state["features.0.0.weight"], rtol=0, atol=0)
    fresh = build_model("deeplabv3plus-mbv2", 11)
    assert not torch.equal(fresh.backbone.features[0][0].weight, state["features.0.0.weight"])


def test_corrupt_cache_is_rebuilt_with_one_line(mbv2_file: Path) -> None:
    good = torch.load(mbv2_file, weights_only=True)
    data = bytearray(mbv2_file.read_bytes())
    data[len(data) // 2: len(data) // 2 + 64] = b"\0" * 64
    mbv2_file.write_bytes(bytes(data))
    lines: list[str] = []
    assert ensure_digits_pretrained("mbv2", 0, TINY, log=lines.append) == mbv2_file
    assert "is corrupt" in lines[0] and "rebuilding" in lines[0]
    rebuilt = torch.load(mbv2_file, weights_only=True)  # deterministic: the same weights again
    assert all(torch.equal(rebuilt[k], good[k]) for k in good)


def test_weights_of_another_backbone_are_refused(mbv2_file: Path) -> None:
    with pytest.raises(CheckpointError, match="made for another backbone"):
        build_model("deeplabv3plus-r18", 11, pretrained=mbv2_file)


def test_bad_sources_are_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_pretrained(str(tmp_path / "nope.pth"), "mbv2")
    with pytest.raises(ConfigError, match="built-in pretraining for the digits dataset"):
        resolve_pretrained("digits", "mbv2", data_name="voc")
    with pytest.raises(ConfigError, match="pretrain.steps must be a positive integer"):
        PretrainConfig(steps=0).check()
    assert resolve_pretrained(False, "mbv2") is None and resolve_pretrained("none", "mbv2") is None


def test_warm_and_cold_cache_leave_the_callers_rng_alike(mbv2_file: Path) -> None:
    """A warm cache is checked by building a network; that must not shift the caller's model init (it did:
    a cold and a warm run of one recipe trained different detectors)."""
    torch.manual_seed(123)
    before = torch.get_rng_state()
    assert ensure_digits_pretrained("mbv2", 0, TINY, log=lambda _m: None) == mbv2_file  # warm
    assert torch.equal(torch.get_rng_state(), before)
