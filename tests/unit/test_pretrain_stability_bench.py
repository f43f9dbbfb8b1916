"""benchmarks/pretrain_stability.py: a seeded run repeats exactly and leaves the caller's RNG alone."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "pretrain_stability.py"
_spec = importlib.util.spec_from_file_location("pretrain_stability_bench", _PATH)
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def test_seeded_run_repeats_and_leaves_rng_alone() -> None:
    before = torch.random.get_rng_state()
    a = bench.run_one("mbv2", 0, "fp32", steps=2, lr=0.003, image_size=32)
    b = bench.run_one("mbv2", 0, "fp32", steps=2, lr=0.003, image_size=32)
    assert torch.equal(torch.random.get_rng_state(), before)
    assert a["held_out_accuracy"] == b["held_out_accuracy"]
    assert 0.0 <= a["held_out_accuracy"] <= 1.0
    assert (a["seed"], a["precision"]) == (0, "fp32")
