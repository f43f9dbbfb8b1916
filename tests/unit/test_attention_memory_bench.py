"""benchmarks/attention_memory.py compares like with like: both orders of each attention give one value."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "attention_memory.py"
_spec = importlib.util.spec_from_file_location("attention_memory_bench", _PATH)
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


@pytest.mark.parametrize("case", list(bench.ATTENTION_CASES))
def test_attention_cases_naive_and_ours_agree(case: str) -> None:
    values, grads = [], []
    for mode in ("naive", "ours"):
        inputs, step = bench.attention_step(case, mode, (6, 5), "cpu", torch.float32)
        values.append(step())
        grads.append([inputs[k].grad.clone() for k in ("q", "k", "v")])
    assert values[0] == pytest.approx(values[1], rel=1e-5)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_attention_case_shapes_follow_the_methods() -> None:
    # CanKD's keys are 2x2 max-pooled (ceil), ACAM-KD attends over every position
    inputs, _ = bench.attention_step("cankd_attn_c256", "ours", (5, 7), "cpu", torch.float32)
    assert [tuple(inputs[k].shape) for k in ("q", "k", "v")] == [(1, 35, 128), (1, 12, 128), (1, 12, 128)]
    inputs, _ = bench.attention_step("acam_attn_c256", "ours", (5, 7), "cpu", torch.float32)
    assert [tuple(inputs[k].shape) for k in ("q", "k", "v")] == [(1, 35, 128), (1, 35, 128), (1, 35, 256)]


def test_cankd_banded_and_one_pass_modes_measure_the_same_loss() -> None:
    # 50x50 = 2500 positions: above the default chunk_positions (2048), so "ours" runs in row bands
    rows = {mode: bench.run_case("cankd_c256", mode, "50x50", "cpu", 1, "float32") for mode in ("ours", "one-pass")}
    assert rows["ours"]["loss"] == pytest.approx(rows["one-pass"]["loss"], rel=1e-5)
