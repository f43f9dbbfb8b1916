"""`kdcompress distill` end to end for every method, and its bad inputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from kdcompress.engine.checkpoint import load_model_checkpoint, load_state
from kdcompress.methods import METHODS
from tests.integration.cli_helpers import run_cli
from tests.integration.conftest import TINY


@pytest.fixture(scope="module")
def teacher(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("distill")
    recipe = root / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(dict(TINY, train=dict(TINY["train"], steps=3))))
    from kdcompress.config import load_recipe
    from kdcompress.engine.trainer import train

    res = train(load_recipe(str(recipe)), "teacher", root / "teacher", progress=False)
    return recipe, res.model_path


def built(method: str, student: str = "deeplabv3plus-mbv2", teacher: str = "deeplabv3plus-r18"):
    """The registered method as the trainer builds it for the tiny recipe (48 px crops, 11 classes)."""
    from kdcompress.methods import build_method
    from kdcompress.models import build_model
    from kdcompress.taps import tap_shapes

    s, t = (tap_shapes(build_model(m, 11), (48, 48), batch=1) for m in (student, teacher))
    return build_method(method, s, t, 11)


@pytest.mark.parametrize("method", METHODS.names())
def test_distill_every_method(method: str, teacher: tuple[Path, Path], tmp_path: Path,
                              capsys: pytest.CaptureFixture) -> None:
    recipe, ckpt = teacher
    out = tmp_path / method
    res = run_cli(capsys, "distill", "-r", recipe, "--teacher", ckpt, "--student", "mbv2", "--method", method,
                  "--out", out, "--steps", "2", "--no-progress")
    assert res.code == 0, res.err
    model = load_model_checkpoint(out / "model.pt")
    assert model["meta"]["arch"] == "deeplabv3plus-mbv2" and model["meta"]["method"] == method
    assert all(not k.startswith(("method.", "student.", "teacher")) for k in model["state_dict"])
    state = load_state(out / "state.pt")
    has_method_state = any(k.startswith("method.") for k in state["task"])
    own = built(method)
    assert has_method_state == bool(own.state_dict())
    ev = run_cli(capsys, "evaluate", out / "model.pt", "--json")
    assert ev.code == 0 and 0.0 <= json.loads(ev.out)["mIoU"] <= 1.0
    log = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    terms = {k for e in log for k in e} - {"step", "lr", "img_s", "val", "grad_ratio"}
    expected = set(own.loss_weights())
    assert terms == {"task"} | expected
    ratios = [e["grad_ratio"] for e in log if "grad_ratio" in e]  # first and last step
    assert len(ratios) == (2 if expected else 0) and all(r is None or r > 0 for r in ratios)


def test_taps_and_hparams_from_cli(teacher: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    recipe, ckpt = teacher
    res = run_cli(capsys, "distill", "-r", recipe, "-t", ckpt, "-s", "mbv2", "--method", "attnfd", "--taps",
                  "encoder,decoder", "--set", "method.alpha=10", "--out", tmp_path / "a", "--steps", "1", "--no-progress")
    assert res.code == 0, res.err
    cfg = yaml.safe_load((tmp_path / "a" / "config.yaml").read_text())
    assert cfg["resolved"]["taps"] == ["encoder", "decoder"] and cfg["distill"]["hparams"] == {"alpha": 10}


def errors(res, *needles: str) -> None:
    assert res.code == 2, (res.code, res.err)
    assert res.err.startswith("error:") and "Traceback" not in res.err
    for n in needles:
        assert n in res.err, (n, res.err)


def test_distill_bad_inputs(teacher: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    recipe, ckpt = teacher
    base = ["distill", "-r", recipe, "-s", "mbv2", "--steps", "1", "--no-progress"]
    errors(run_cli(capsys, *base, "-t", ckpt, "--method", "acamm", "--out", tmp_path / "1"),
           "Unknown method 'acamm'", "attnfd")
    errors(run_cli(capsys, *base, "-t", ckpt, "--method", "attnfd", "--taps", "decodr", "--out", tmp_path / "2"),
           "Unknown tap 'decodr'", "decoder")
    errors(run_cli(capsys, *base, "-t", ckpt.parent / "state.pt", "--method", "kd", "--out", tmp_path / "3"),
           "resumable training state")
    errors(run_cli(capsys, *base, "-t", ckpt, "--method", "kd", "--set", "method.tau=3", "--out", tmp_path / "4"),
           "'tau'")
    # a teacher trained for another class count
    obj = torch.load(ckpt, weights_only=True)
    obj["meta"]["num_classes"] = 21
    obj["state_dict"] = {k: (torch.zeros(21, *v.shape[1:]) if k.startswith("head.classifier") else v)
                         for k, v in obj["state_dict"].items()}
    torch.save(obj, tmp_path / "t21.pt")
    errors(run_cli(capsys, *base, "-t", tmp_path / "t21.pt", "--method", "kd", "--out", tmp_path / "5"),
           "21 classes", "11")
    for i in range(1, 6):
        assert not (tmp_path / str(i) / "model.pt").exists()


def test_non_finite_distillation_term_stops(teacher: tuple[Path, Path], tmp_path: Path,
                                            capsys: pytest.CaptureFixture) -> None:
    recipe, ckpt = teacher
    res = run_cli(capsys, "distill", "-r", recipe, "-t", ckpt, "-s", "mbv2", "--method", "mse", "--steps", "2",
                  "--set", "method.weight=1e39", "--out", tmp_path / "nan", "--no-progress")
    assert res.code == 2 and "Loss term 'mse' became non-finite at step 1" in res.err
    assert not (tmp_path / "nan" / "model.pt").exists()


def test_two_phase_attnfd_freezes_the_student_first(teacher: tuple[Path, Path], tmp_path: Path) -> None:
    from kdcompress.config import load_recipe
    from kdcompress.engine.trainer import train

    recipe, ckpt = teacher
    sets = {"distill.method": "attnfd", "distill.teacher_checkpoint": str(ckpt), "student.pretrained": False}

    def run(name: str, steps: int, adapter_steps: int) -> tuple[dict, dict]:
        r = load_recipe(str(recipe), dict(sets, **{"train.steps": steps,
                                                   "distill.hparams": {"adapter_steps": adapter_steps}}))
        res = train(r, "student", tmp_path / name, progress=False)
        task = load_state(tmp_path / name / "state.pt")["task"]
        return load_model_checkpoint(res.model_path)["state_dict"], task

    def params(w: dict, prefix: str = "") -> list[torch.Tensor]:
        return [v for k, v in w.items() if k.startswith(prefix) and k.endswith(("weight", "bias"))]

    one, state_one = run("p1", 1, 3)
    two, state_two = run("p2", 2, 3)  # both still in phase 1: the student never moved
    assert all(torch.equal(a, b) for a, b in zip(params(one), params(two)))
    # ...while the adapters did, and a joint run moves the student from the first step
    assert not all(torch.equal(a, b) for a, b in zip(params(state_one, "method.adapter"),
                                                     params(state_two, "method.adapter")))
    j1, _ = run("j1", 1, 0)
    j2, _ = run("j2", 2, 0)
    assert not all(torch.equal(a, b) for a, b in zip(params(j1), params(j2)))


@pytest.mark.parametrize("sets, message", [
    (["distill.warmup=50"], "distill.warmup is 50 steps, longer than the 2-step schedule"),
    (["distill.warmup=1", "distill.cooldown=2"], "distill.warmup (1 steps) and distill.cooldown (2 steps) overlap"),
])
def test_distill_ramps_that_do_not_fit_are_refused_before_writing(teacher: tuple[Path, Path], tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture, sets: list[str],
                                                                   message: str) -> None:
    recipe, ckpt = teacher
    out = tmp_path / "warm"
    res = run_cli(capsys, "distill", "-r", recipe, "--teacher", ckpt, "--method", "acam", "--out", out,
                  "--steps", "2", *[a for s in sets for a in ("--set", s)], "--no-progress")
    assert res.code == 2 and message in res.err
    assert "Traceback" not in res.err and not out.exists()


def test_pretrained_digits_from_the_cli(teacher: tuple[Path, Path], tmp_path: Path,
                                       capsys: pytest.CaptureFixture) -> None:
    from kdcompress.data.digits import cache_dir

    recipe, ckpt = teacher
    res = run_cli(capsys, "distill", "-r", recipe, "--teacher", ckpt, "--method", "kd", "--out", tmp_path / "pre",
                  "--steps", "1", "--pretrained", "digits", "--set", "pretrain.steps=1",
                  "--set", "pretrain.batch_size=2", "--set", "pretrain.image_size=32", "--set", "pretrain.eval_images=2",
                  "--no-progress")
    assert res.code == 0, res.err
    assert list((cache_dir() / "pretrain").glob("mbv2-*.pth"))
    res = run_cli(capsys, "train", "-r", recipe, "--role", "student", "--out", tmp_path / "bad", "--steps", "1",
                  "--pretrained", str(tmp_path / "missing.pth"), "--no-progress")
    assert res.code == 2 and "does not exist" in res.err and "Traceback" not in res.err


def test_distill_inherit_starts_head_from_teacher(teacher: tuple[Path, Path], tmp_path: Path,
                                                  capsys: pytest.CaptureFixture) -> None:
    """distill.inherit: matching head weights are the teacher's at step 0; a prefix matching nothing is refused."""
    recipe, ckpt = teacher
    t_state = load_model_checkpoint(ckpt)["state_dict"]
    out = tmp_path / "inherit"
    res = run_cli(capsys, "distill", "-r", recipe, "--teacher", ckpt, "--student", "mbv2", "--method", "acam",
                  "--out", out, "--steps", "1", "--no-progress", "--set", "distill.inherit=[head]",
                  "--set", "train.lr=1e-12")  # one negligible step: the weights stay where they started
    assert res.code == 0, res.err
    s_state = load_model_checkpoint(out / "model.pt")["state_dict"]
    same = [k for k in s_state if k.startswith("head.") and k in t_state and t_state[k].shape == s_state[k].shape
            and t_state[k].is_floating_point()]
    assert len(same) > 10
    assert all(torch.allclose(s_state[k], t_state[k], atol=1e-5) for k in same if "running" not in k)
    # `none` + inherit, the inheritance-only control: the teacher's weights are copied, no loss term is added
    res = run_cli(capsys, "distill", "-r", recipe, "--teacher", ckpt, "--student", "mbv2", "--method", "none",
                  "--out", tmp_path / "control", "--steps", "1", "--no-progress", "--set", "distill.inherit=[head]",
                  "--set", "train.lr=1e-12")
    assert res.code == 0, res.err
    c_state = load_model_checkpoint(tmp_path / "control" / "model.pt")["state_dict"]
    assert all(torch.allclose(c_state[k], t_state[k], atol=1e-5) for k in same if "running" not in k)
    bad = run_cli(capsys, "distill", "-r", recipe, "--teacher", ckpt, "--student", "mbv2", "--method", "acam",
                  "--out", tmp_path / "bad", "--steps", "1", "--no-progress", "--set", "distill.inherit=[neck]")
    assert bad.code == 2 and "no student weight under these prefixes" in bad.err and not (tmp_path / "bad").exists()


def test_resume_after_a_method_default_changed_is_one_line(teacher: tuple[Path, Path], tmp_path: Path,
                                                           capsys: pytest.CaptureFixture,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """A run written under AttnFD's former BN adapter, resumed with the same options after the default moved:
    its method modules no longer fit, which is said in one line, and the run's files stay as they were."""
    recipe, ckpt = teacher
    out = tmp_path / "run"
    args = ["distill", "-r", recipe, "-t", ckpt, "-s", "mbv2", "--method", "attnfd", "--out", out, "--no-progress"]
    cls = METHODS.get("attnfd")
    monkeypatch.setattr(cls, "default_hparams", cls.default_hparams | {"adapter_bn": 1.0})
    assert run_cli(capsys, *args, "--steps", "1").code == 0
    before = {f.name: f.read_bytes() for f in out.iterdir()}
    monkeypatch.setattr(cls, "default_hparams", cls.default_hparams | {"adapter_bn": 0.0})
    res = run_cli(capsys, *args, "--steps", "2", "--resume")
    assert res.code == 2 and "a default of the method changed" in res.err and "--force" in res.err
    assert "Traceback (most recent call last)" not in res.err
    assert "a default of the method changed" in res.err.strip().splitlines()[0]
    assert {f.name: f.read_bytes() for f in out.iterdir()} == before
