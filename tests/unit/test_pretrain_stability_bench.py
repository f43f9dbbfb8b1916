"""benchmarks/pretrain_stability.py: a seeded run repeats exactly, and the fp32 switch is undone afterwards."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import kdcompress.engine.trainer as trainer

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "pretrain_stability.py"
_spec = importlib.util.spec_from_file_location("pretrain_stability_bench", _PATH)
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def test_seeded_run_repeats_and_restores_autocast_choice() -> None:
    before = trainer.amp_dtype_for
    a = bench.run_one("mbv2", 0, "fp32", steps=2, lr=0.003, image_size=32)
    b = bench.run_one("mbv2", 0, "fp32", steps=2, lr=0.003, image_size=32)
    assert trainer.amp_dtype_for is before
    assert a["held_out_accuracy"] == b["held_out_accuracy"]
    assert 0.0 <= a["held_out_accuracy"] <= 1.0
    assert (a["seed"], a["precision"]) == (0, "fp32")
