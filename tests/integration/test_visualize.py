"""`kdcompress visualize`: prediction figures and method views on tiny runs (48 px digits, 2 steps)."""

from __future__ import annotations

import shutil
import struct
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
import yaml

from kdcompress.errors import ConfigError, KdError
from tests.integration.cli_helpers import CliResult, run_cli
from tests.integration.conftest import TINY

METHODS = ("attnfd", "acam", "cankd")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny teacher, a plain student and one distilled student per method (2 steps each)."""
    from kdcompress.config import load_recipe
    from kdcompress.engine.trainer import train

    root = tmp_path_factory.mktemp("viz")
    recipe = root / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(dict(TINY, train=dict(TINY["train"], steps=2))))
    teacher = train(load_recipe(str(recipe)), "teacher", root / "teacher", progress=False)
    out = {"teacher": root / "teacher"}
    for method in ("none",) + METHODS:
        r = load_recipe(str(recipe), {"distill.method": method, "distill.teacher_checkpoint": str(teacher.model_path)})
        train(r, "student", root / f"student-{method}", progress=False)
        out[method] = root / f"student-{method}"
    return out


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from the IHDR chunk, after checking the file is a complete PNG."""
    from PIL import Image

    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR", path
    with Image.open(path) as im:
        im.verify()
    return struct.unpack(">II", data[16:24])


def test_prediction_figures_sizes_and_determinism(runs: dict[str, Path], tmp_path: Path) -> None:
    from kdcompress.visualize import DPI, PANEL_IN, predictions_figures

    models = {"teacher": runs["teacher"] / "model.pt", "plain": runs["none"] / "model.pt",
              "distilled": runs["attnfd"]}  # a run folder stands for its model.pt
    first = predictions_figures(models, tmp_path / "a", images=2)
    assert [p.name for p in first] == ["predictions_000.png", "predictions_001.png"]
    again = predictions_figures(models, tmp_path / "b", images=2)
    for a, b in zip(first, again):
        assert a.read_bytes() == b.read_bytes(), f"{a.name} differs between two runs"
    w5, h5 = png_size(first[0])  # image | ground truth | three models, square 48 px panels
    assert w5 == round(5 * PANEL_IN * DPI)
    one = predictions_figures({"distilled": runs["attnfd"]}, tmp_path / "c", images=1)
    w3, h3 = png_size(one[0])
    assert h3 == h5 and abs(w5 / w3 - 5 / 3) < 0.01  # same height, width proportional to the columns
    assert 2.5 < w5 / h5 < 5 / 1.0  # five panels side by side, a title and a legend band above/below
    grid = predictions_figures(models, tmp_path / "d", images=2, grid=True)
    assert [p.name for p in grid] == ["predictions_grid.png"]
    wg, hg = png_size(grid[0])
    assert wg == w5 and hg > h5
    # default folder: figures/ of the last model's run folder
    assert predictions_figures({"t": runs["teacher"]}, images=1)[0] == runs["teacher"] / "figures" / "predictions_000.png"


@pytest.mark.parametrize("method", METHODS)
def test_method_figure_every_method(method: str, runs: dict[str, Path], tmp_path: Path) -> None:
    from kdcompress.visualize import method_figures

    paths = method_figures(runs[method], tmp_path, images=1)
    assert paths == [tmp_path / f"method_{method}_000.png"]
    w, h = png_size(paths[0])
    assert w > 0 and h > 0


def test_method_arrays(runs: dict[str, Path]) -> None:
    from kdcompress.data import build_dataset, val_transform
    from kdcompress.methods.base import resize_to
    from kdcompress.visualize import acam_masks, attnfd_gates, cankd_affinity, feature_energy, load_method_run, \
        tap_features

    ds = build_dataset("digits", None, "val", val_transform((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
                       **TINY["data"]["options"])
    rgb, _ = ds[0]

    mr = load_method_run(runs["cankd"])
    s, t, _, _ = tap_features(mr, rgb)
    tap = mr.taps[0]
    block = mr.method.can[tap]
    with torch.no_grad():  # direct: θ(y_s)[p] · φ(y_t)ᵀ / N over the 2×2-pooled teacher positions
        y_t = t[tap]
        y_s = resize_to(mr.method.adapter[tap](s[tap]), y_t)
        q = block.theta(y_s)[0]
        k = block.pool(block.phi(y_t))[0]
    h, w = y_t.shape[-2:]
    pos = (h - 1, 0)
    direct = torch.einsum("c,cij->ij", q[:, pos[0], pos[1]], k) / (k.shape[1] * k.shape[2])
    aff, used = cankd_affinity(mr.method, s, t, tap, pos)
    assert used == pos and aff.shape == tuple(k.shape[1:]) == (-(-h // 2), -(-w // 2))
    assert np.isclose(aff.sum(), float(direct.sum()), rtol=1e-5, atol=1e-7)
    assert np.allclose(aff, direct.numpy(), rtol=1e-5, atol=1e-7)
    _, centre = cankd_affinity(mr.method, s, t, tap)
    assert centre == (h // 2, w // 2)
    with pytest.raises(ConfigError, match="outside"):
        cankd_affinity(mr.method, s, t, tap, (h, 0))
    assert np.allclose(feature_energy(y_t), y_t[0].pow(2).mean(0).numpy())

    mr = load_method_run(runs["acam"])
    s, t, _, _ = tap_features(mr, rgb)
    masks = acam_masks(mr.method, s, t)
    assert masks.shape == (mr.method.num_masks["logits"], *t["logits"].shape[-2:])
    assert masks.min() >= 0 and masks.max() <= 1

    mr = load_method_run(runs["attnfd"])
    s, t, _, _ = tap_features(mr, rgb)
    gates = attnfd_gates(mr.method, s, t)
    assert set(gates) == set(mr.taps)
    for tap, (tg, sg) in gates.items():
        assert tg.shape == tuple(t[tap].shape[-2:]) and sg.shape == tuple(s[tap].shape[-2:])
    from kdcompress.methods import build_method

    shapes = {name: v.shape for name, v in t.items()}
    for flag in ("teacher_cbam", "student_cbam"):  # ablations whose loss uses no such gate
        off = build_method("attnfd", shapes, shapes, 11, taps=list(t), **{flag: 0})
        with pytest.raises(ConfigError, match=f"method.{flag}=0"):
            attnfd_gates(off, t, t)
    no_block = build_method("cankd", shapes, shapes, 11, taps=list(t)[:1], block=0)
    with pytest.raises(ConfigError, match="block=0"):
        cankd_affinity(no_block, t, t)


def test_runs_without_method_state_are_refused(runs: dict[str, Path], tmp_path: Path) -> None:
    from kdcompress.visualize import method_figures

    with pytest.raises(KdError) as e:
        method_figures(runs["none"], tmp_path)
    msg = str(e.value)
    assert "\n" not in msg and "state.pt" in msg and "'none'" in msg and "--method attnfd" in msg
    copy = tmp_path / "nostate"
    shutil.copytree(runs["attnfd"], copy)
    (copy / "state.pt").unlink()
    with pytest.raises(KdError) as e:
        method_figures(copy, tmp_path)
    assert "\n" not in str(e.value) and str(copy / "state.pt") in str(e.value) and "Re-run" in str(e.value)
    assert not list(tmp_path.glob("*.png"))


@pytest.fixture
def viz_cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> Callable[..., CliResult]:
    """``kdcompress visualize ...`` through the real entry point (registered on a local app until
    cli/app.py registers the group)."""
    import typer

    import kdcompress.cli.app as app_mod
    from kdcompress.cli import visualize

    names = {g.name if isinstance(g.name, str) else g.typer_instance.info.name for g in app_mod.app.registered_groups}
    if "visualize" not in names:
        local = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
        local.add_typer(visualize.app, name="visualize")
        monkeypatch.setattr(app_mod, "app", local)
    return lambda *args: run_cli(capsys, "visualize", *args)


def one_line_error(res: CliResult, *needles: str) -> None:
    assert res.code == 2, (res.code, res.err)
    assert res.err.startswith("error:") and "Traceback" not in res.err
    assert len([ln for ln in res.err.splitlines() if ln.startswith("error:")]) == 1
    for n in needles:
        assert n in res.err, (n, res.err)


def test_cli(runs: dict[str, Path], tmp_path: Path, viz_cli: Callable[..., CliResult]) -> None:
    res = viz_cli("predictions", "--model", f"teacher={runs['teacher'] / 'model.pt'}", "--model", runs["cankd"],
                  "--images", "1", "--out", tmp_path)
    assert res.code == 0, res.err
    assert res.out.split() == [str(tmp_path / "predictions_000.png")]
    res = viz_cli("method", runs["cankd"], "-n", "1", "--position", "0,0", "--out", tmp_path)
    assert res.code == 0, res.err
    assert res.out.split() == [str(tmp_path / "method_cankd_000.png")]

    one_line_error(viz_cli("predictions", "--model", f"t={tmp_path / 'missing.pt'}", "--out", tmp_path / "x"),
                   "missing.pt", "does not exist")
    one_line_error(viz_cli("predictions", "--model", f"t={runs['teacher']}", "--images", "0"), "--images", "at least 1")
    one_line_error(viz_cli("predictions"), "--model")
    one_line_error(viz_cli("method", runs["none"]), "state.pt", "'none'")
    one_line_error(viz_cli("method", runs["cankd"], "--position", "99,0", "--out", tmp_path / "y"), "outside", "99,0")
    one_line_error(viz_cli("method", runs["cankd"], "--position", "a,b"), "Y,X")
    one_line_error(viz_cli("method", runs["acam"], "--tap", "decoder"), "--tap 'decoder'", "logits")
    one_line_error(viz_cli("method", tmp_path / "nowhere"), "does not exist")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
