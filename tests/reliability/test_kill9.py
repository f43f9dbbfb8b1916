"""kill -9 in the middle of a checkpoint write, then ``--resume``: the run ends bit-identical to an
uninterrupted one, and the half-written temp file is swept."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from kdcompress.config import load_recipe
from kdcompress.engine.checkpoint import load_model_checkpoint, load_state, paired
from kdcompress.engine.trainer import train
from tests.integration.cli_helpers import run_cli

SETS = {"train.steps": 4, "train.ckpt_every": 1}

# The real CLI in a child process whose Nth torch.save writes half of its temp file, then the process
# receives SIGKILL: exactly what a power cut or the OOM killer does in the middle of a save.
DRIVER = textwrap.dedent("""
    import os, signal, sys, torch
    kill_at, calls, real = int(os.environ["KILL_AT"]), [0], torch.save
    def save(obj, f, *a, **k):
        calls[0] += 1
        real(obj, f, *a, **k)
        if calls[0] == kill_at:
            os.truncate(f, os.path.getsize(f) // 2)
            os.kill(os.getpid(), signal.SIGKILL)
    torch.save = save
    sys.argv = ["kdcompress", *sys.argv[1:]]
    from kdcompress.cli.app import main
    main()
""")


def cli_args(recipe: Path, out: Path) -> list[str]:
    return ["train", "-r", str(recipe), "--role", "student", "--out", str(out), "--no-progress",
            *[a for k, v in SETS.items() for a in ("--set", f"{k}={v}")]]


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("kill_at,state_step,model_step", [(5, 2, 2), (4, 2, 1)],
                         ids=["during-state-write", "during-model-write"])
def test_kill9_during_checkpoint_write_then_resume_is_bit_identical(kill_at: int, state_step: int, model_step: int,
                                                                    tiny_recipe: Path,
                                                                    tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture) -> None:
    full = train(load_recipe(str(tiny_recipe), dict(SETS)), "student", tmp_path / "full", progress=False)
    cut = tmp_path / "cut"
    # saves: state(step 1), model(1), state(2), model(2), state(3) ... (state first, then the model naming it)
    child = subprocess.run([sys.executable, "-c", DRIVER, *cli_args(tiny_recipe, cut)], cwd=tmp_path,
                           env=os.environ | {"KILL_AT": str(kill_at)}, capture_output=True, text=True, timeout=240)
    assert child.returncode == -signal.SIGKILL, child.stderr
    assert list(cut.glob(".*.tmp")), "the kill should leave a half-written temp file"
    assert load_state(cut / "state.pt")["step"] == state_step
    assert load_model_checkpoint(cut / "model.pt")["meta"]["step"] == model_step
    assert paired(cut / "model.pt", cut / "state.pt") == (state_step == model_step)  # a cut save: unpaired

    res = run_cli(capsys, *cli_args(tiny_recipe, cut), "--resume")
    assert res.code == 0, res.err
    assert not list(cut.glob(".*.tmp"))
    a, b = load_model_checkpoint(full.model_path)["state_dict"], load_model_checkpoint(cut / "model.pt")["state_dict"]
    assert a.keys() == b.keys() and all(bool((a[k] == b[k]).all()) for k in a)
    assert paired(cut / "model.pt", cut / "state.pt")
