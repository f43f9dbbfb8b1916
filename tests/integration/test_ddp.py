"""DDP under torchrun: 2 CPU processes on gloo, rank-0 writes, metrics reduced across ranks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kdcompress.engine.checkpoint import load_model_checkpoint
from kdcompress.engine.evaluation import evaluate_checkpoint


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_torchrun_two_processes_gloo(tiny_recipe: Path, tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "kdcompress", "train", "-r", str(tiny_recipe), "--role", "student", "--out", str(out),
           "--device", "cpu", "--no-progress", "--set", "train.val_every=2"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # rank 0 alone reports and writes
    assert proc.stdout.count("saved ") == 1, proc.stdout
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "metrics.jsonl", "model.pt", "state.pt"]
    assert "world_size: 2" in (out / "config.yaml").read_text()
    ck = load_model_checkpoint(out / "model.pt")
    assert ck["meta"]["step"] == 4
    # validation in DDP shards the split; the reduced confusion matrix must equal a single-process evaluation
    single = evaluate_checkpoint(out / "model.pt", device="cpu", progress=False)
    assert ck["meta"]["metrics"]["mIoU"] == pytest.approx(single["mIoU"], abs=1e-6)
    vals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"val"' in line]
    assert [v["step"] for v in vals] == [2, 4]
