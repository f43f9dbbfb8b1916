"""report.json + report.md with tables and plots (training curves, per-class IoU, latency per backend), plus
two figures from ``kdcompress.visualize``: the three models' predictions on one validation image and what the
distillation method sees on it. A figure that cannot be made becomes a warning line, never a failed pipeline."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kdcompress.engine.checkpoint import atomic_write, atomic_write_text


def _curve(log: str | None, headline: str) -> tuple[list[int], list[float], list[int], list[float]]:
    steps, loss, vsteps, miou = [], [], [], []
    if not log or not Path(log).is_file():
        return steps, loss, vsteps, miou
    for line in Path(log).read_text().splitlines():
        d = json.loads(line)
        if "val" in d:
            vsteps.append(d["step"])
            miou.append(d["val"][headline])
        elif "task" in d:
            steps.append(d["step"])
            loss.append(d["task"])
    return steps, loss, vsteps, miou


def _plots(out: Path, report: dict[str, Any]) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots = out / "plots"
    plots.mkdir(exist_ok=True)
    files: dict[str, str] = {}

    def save(fig: Any, name: str) -> None:
        atomic_write(plots / name, lambda tmp: fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png"))
        plt.close(fig)
        files[name[:-4]] = f"plots/{name}"

    h, labels = report["headline"], report["labels"]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.5))
    for key in report["evaluation"]:
        rec = report.get(key) or {}
        s, loss, vs, m = _curve(rec.get("log"), h)
        if s:
            a1.plot(s, loss, label=labels[key])
        if vs:
            a2.plot(vs, m, marker="o", label=labels[key])
    a1.set(xlabel="step", ylabel="task loss", title="training loss")
    a2.set(xlabel="step", ylabel=f"val {h}", title=f"validation {h}")
    a1.legend(), a2.legend()
    save(fig, "training_curves.png")

    ev = report["evaluation"]
    per_class = next(iter(ev.values())).get("per_class_iou")
    if per_class:  # segmentation's per-class table
        names = list(per_class)
        fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(names)), 3.5))
        width = 0.8 / len(ev)
        for i, (key, res) in enumerate(ev.items()):
            vals = [res["per_class_iou"][n] or 0.0 for n in names]
            ax.bar([j + i * width for j in range(len(names))], vals, width, label=labels[key])
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(names))], names, rotation=45, ha="right")
        ax.set(ylabel="IoU", title="per-class IoU (validation)")
        ax.legend()
        save(fig, "per_class_iou.png")

    rows = report["profile"]
    fig, ax = plt.subplots(figsize=(7, 0.5 + 0.45 * len(rows)))
    ax.barh([labels.get(r["label"], r["label"]) for r in rows], [r["latency_ms"]["median_ms"] for r in rows])
    ax.invert_yaxis()
    ax.set(xlabel="median latency (ms)", title=f"latency per backend ({rows[0]['device']}, batch {rows[0]['batch']}, "
                                                 f"{rows[0]['input_size'][0]}x{rows[0]['input_size'][1]})")
    save(fig, "latency.png")
    return files


def _pct(v: Any) -> str:
    return "n/a" if v is None else f"{100 * v:.2f}"


def _markdown(report: dict[str, Any], plots: dict[str, str]) -> str:
    from kdcompress.tasks import TASKS

    ev, h, labels = report["evaluation"], report["headline"], report["labels"]
    columns = TASKS.get(report["task"]).report_columns
    lines = [f"# kdcompress pipeline report: {report['recipe']}", "",
             f"Run folder `{report['run']}`, total wall time {report['wall_s']:.0f} s.", "",
             "## Accuracy (validation split)", "",
             "| model | arch | " + " | ".join(c for _, c in columns) + " |", "|---" * (len(columns) + 2) + "|"]
    for key, res in ev.items():
        lines.append(f"| {labels[key]} | {res['arch']} | " + " | ".join(_pct(res.get(k)) for k, _ in columns) + " |")
    t, s, b = ev.get("teacher"), ev.get("student"), ev.get("baseline")
    if t and s and b:
        gap = t[h] - b[h]
        rec = (s[h] - b[h]) / gap if gap > 0 else float("nan")
        lines += ["", f"Distillation gain over the plain student: {100 * (s[h] - b[h]):+.2f} {h} points "
                      f"({100 * rec:.0f} % of the teacher–student gap)."]
    per_class = next(iter(ev.values())).get("per_class_iou")
    if per_class:
        lines += ["", "### Per-class IoU", "", "| class | " + " | ".join(labels[k] for k in ev) + " |",
                  "|---" * (len(ev) + 1) + "|"]
        for n in per_class:
            lines.append(f"| {n} | " + " | ".join(_pct(r["per_class_iou"][n]) for r in ev.values()) + " |")
    lines += ["", f"## Exports (verified against PyTorch on the same {ev['student'].get('images', '')} images as above)", "",
              f"| artifact | precision | outputs vs PyTorch | {h} PyTorch | {h} artifact | drop |",
              "|---|---|---|---|---|---|"]
    parity = TASKS.get(report["task"]).parity_cls  # the task says what its parity report means
    for name, e in report["exports"].items():
        if e.get("skipped"):
            lines.append(f"| {name} | skipped: {e['skipped']} | | | | |")
            continue
        par = e.get("parity") or {}
        lines.append(f"| `{Path(e['artifact']).name}` | {e['precision']} | {parity.summary(par) if par else 'n/a'} | "
                     f"{_pct(e['metric_torch'])} | {_pct(e['metric_artifact'])} | {100 * e['drop']:+.2f} |")
    rows = report["profile"]
    r0 = rows[0]
    lines += ["", f"## Efficiency (batch {r0['batch']}, {r0['input_size'][0]}x{r0['input_size'][1]}, {r0['device']})", "",
              "| model | backend | params (M) | GMACs | memory (MB) | latency median / p90 / p99 (ms) | FPS |",
              "|---|---|---|---|---|---|---|"]
    for r in rows:
        lat = r["latency_ms"]
        gm = "n/a" if r.get("gmacs") is None else f"{r['gmacs']:.2f}"
        mem = "n/a" if r.get("memory_mb") is None else f"{r['memory_mb']:.0f}"
        lines.append(f"| {labels.get(r['label'], r['label'])} | {r['backend']} {r.get('precision') or ''} | {r['params_m']:.2f} | {gm} | {mem} | "
                     f"{lat['median_ms']:.2f} / {lat['p90_ms']:.2f} / {lat['p99_ms']:.2f} | {r['fps']:.1f} |")
    lines += ["", "GMACs are multiply-accumulates (the papers' \"FLOPs\"); GFLOPs = 2 × GMACs.",
              f"Environment: `{json.dumps(r0.get('env', {}))}`"]
    if report["gates"]:
        lines += ["", "## Gates", "", "| gate | what | value | limit | result |", "|---|---|---|---|---|"]
        for g in report["gates"]:
            lines.append(f"| {g['gate']} | {g['what']} | {g['value']:.4g} | {g['limit']:.4g} | "
                         f"{'pass' if g['passed'] else '**FAIL**'} |")
    lines += ["", "## Plots", ""] + [f"![{k}]({v})" for k, v in plots.items()]
    lines += _figures_markdown(report.get("figures") or {})
    lines += ["", "## Stages", "", "| stage | wall (s) | skipped |", "|---|---|---|"]
    for k, v in report["stages"].items():
        lines.append(f"| {k} | {v['wall_s']:.1f} | {bool(v['skipped'])} |")
    return "\n".join(lines) + "\n"


FIGURE_IMAGES = 1  # validation images drawn into the report (the first N)


def _figures(out: Path, report: dict[str, Any]) -> dict[str, Any]:
    """Predictions of teacher / plain / distilled student on a validation image and the distilled run's
    method view, written under plots/: {"files": {name: path}, "models": [...], "warnings": [...]}.
    Each figure fails on its own into a warning line."""
    res: dict[str, Any] = {"files": {}, "models": [], "warnings": []}
    teacher = out / "teacher" / "model.pt"
    if not teacher.is_file() and (report.get("teacher") or {}).get("checkpoint"):
        teacher = Path(report["teacher"]["checkpoint"])  # a teacher given to the pipeline, not trained in it
    distilled = out / "student"
    models = {label: path for label, path in (("teacher", teacher), ("plain", out / "student-none" / "model.pt"),
                                              ("distilled", distilled / "model.pt")) if path.is_file()}
    if "distilled" not in models:
        res["warnings"].append(f"no figures: '{distilled / 'model.pt'}' does not exist")
        return res

    def attempt(what: str, make: Any) -> list[Path]:
        try:
            return make()
        except Exception as e:  # noqa: BLE001 - a figure is optional, the report is not
            text = (str(e).strip().splitlines() or [""])[0]
            res["warnings"].append(f"{what} could not be made ({type(e).__name__}{': ' + text if text else ''})")
            return []

    from kdcompress.visualize import method_figures, predictions_figures

    for p in attempt("prediction figure", lambda: predictions_figures(models, out / "plots", FIGURE_IMAGES,
                                                                      device="auto")):
        res["files"][p.stem] = f"plots/{p.name}"
        res["models"] = list(models)
    teacher_given = teacher if "teacher" in models else None
    for p in attempt("method figure", lambda: method_figures(distilled, out / "plots", FIGURE_IMAGES,
                                                             teacher=teacher_given, device="auto")):
        res["files"][p.stem] = f"plots/{p.name}"
    return res


def _figures_markdown(figures: dict[str, Any]) -> list[str]:
    files, warnings = figures.get("files") or {}, figures.get("warnings") or []
    if not files and not warnings:
        return []
    lines = ["", "## Predictions and what the method sees", ""]
    preds = {k: v for k, v in files.items() if k.startswith("predictions")}
    views = {k: v for k, v in files.items() if k.startswith("method_")}
    if preds:
        lines += [f"Validation image 0, its ground truth (grey: ignore) and the predictions of "
                  f"{', '.join(figures.get('models') or [])}:", ""] + [f"![{k}]({v})" for k, v in preds.items()] + [""]
    if views:
        lines += ["What the distilled student's method sees on the same image: feature energy per tap "
                  "(teacher T, student S) and the method's own maps:", ""] + \
                 [f"![{k}]({v})" for k, v in views.items()] + [""]
    for w in warnings:
        lines += [f"> **Warning:** {w}", ""]
    while lines and lines[-1] == "":
        lines.pop()
    return lines


def write_report(out: Path, report: dict[str, Any]) -> None:
    plots = _plots(out, report)
    report["plots"] = plots
    try:
        report["figures"] = _figures(out, report)
    except Exception as e:  # noqa: BLE001 - never a crashed pipeline for a figure
        report["figures"] = {"files": {}, "models": [], "warnings": [f"figures could not be made ({type(e).__name__})"]}
    atomic_write_text(out / "report.json", json.dumps(report, indent=2, default=str))
    atomic_write_text(out / "report.md", _markdown(report, plots))
