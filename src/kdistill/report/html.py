"""The report of a run: ``metrics.json`` -> ``report.md`` and a self-contained ``report.html``.

The HTML page needs nothing but itself: CSS inline, figures embedded as base64 ``data:``
URIs, no external resource and no JavaScript library (a Content-Security-Policy forbids
any). One tiny inline script records, after the page loaded, how many images decoded
(``<body data-images-loaded="N">``), so a headless browser can check the page.

Older run directories (no scratch stage, no confusion matrix or agreement, the classic
command's ``distilled`` key and flat config) render too: what is missing is left out or
marked "n/a", never a crash.
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
from pathlib import Path
from typing import Any, Mapping

from ..checkpoint import atomic_write_text
from .figures import plot_confusion_matrix, plot_stage_curves, stage_label
from .markdown import comparison_table, human_bytes
from .plots import plot_curves

#: captions of the figures :func:`write_report` draws (other keys are their own caption)
CAPTIONS = {
    "accuracy": "Test accuracy per epoch of each model (dashed: the teacher's final accuracy).",
    "curves": "Training per stage: loss terms (top) and accuracy (bottom) per epoch; "
              "solid = training batches, dashed = test set.",
    "confusion": "Confusion matrix of the distilled student on the test set: rows are the true "
                 "class, columns the prediction; colours are normalised per row, cells show counts.",
}

_MIME = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".svg": "image/svg+xml",
         ".gif": "image/gif", ".webp": "image/webp"}

_CSS = """
body { font-family: -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif;
       color: #1d2330; background: #fff; margin: 0; line-height: 1.45; }
main { max-width: 1100px; margin: 0 auto; padding: 24px 28px 40px; }
h1 { font-size: 1.6em; margin: 0.2em 0 0.4em; }
h2 { font-size: 1.2em; margin: 1.6em 0 0.5em; border-bottom: 1px solid #dde1e8; padding-bottom: 0.2em; }
code { background: #f2f4f7; padding: 0 4px; border-radius: 3px; font-size: 0.92em; }
.experiment { color: #3a4252; }
.headline { display: flex; flex-wrap: wrap; gap: 14px; margin: 18px 0; }
.card { border: 1px solid #dde1e8; border-radius: 8px; padding: 10px 16px; min-width: 170px; background: #f8f9fb; }
.card .value { font-size: 1.6em; font-weight: 600; }
.card .value.good { color: #137333; } .card .value.bad { color: #b3261e; }
.card .label { font-size: 0.85em; color: #5a6272; }
table.comparison { border-collapse: collapse; width: 100%; font-size: 0.92em; }
table.comparison th, table.comparison td { border-bottom: 1px solid #e3e6ec; padding: 6px 9px; text-align: right; }
table.comparison th:first-child, table.comparison td:first-child { text-align: left; }
table.comparison thead th { background: #f2f4f7; font-weight: 600; }
table.comparison tr.distilled td { font-weight: 600; }
figure { margin: 18px 0 28px; }
figure img { max-width: 100%; height: auto; border: 1px solid #eceef2; }
figcaption { font-size: 0.88em; color: #5a6272; margin-top: 4px; }
.machine, footer { font-size: 0.85em; color: #5a6272; }
"""

# after load: how many <img> decoded (naturalWidth > 0); read by the headless-browser test
_SCRIPT = """
window.addEventListener("load", function () {
  var n = 0, images = document.images;
  for (var i = 0; i < images.length; i++) { if (images[i].naturalWidth > 0) { n++; } }
  document.body.dataset.imagesLoaded = String(n);
});
"""

_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'"


# ---------------------------------------------------------------------------------------
# reading metrics.json (tolerant of older runs)


def _distil_key(models: Mapping[str, Any]) -> str | None:
    """The distilled student's key: ``distil`` (run engine) or ``distilled`` (classic command)."""
    return next((k for k in ("distil", "distilled") if k in models), None)


def _stage_order(metrics: Mapping[str, Any]) -> list[str]:
    """The run's stages that have measurements, in the run's order (then any others)."""
    models = metrics.get("models") or {}
    listed = [s for s in (metrics.get("stages") or []) if s in models]
    return listed + [s for s in models if s not in listed]


def _name_of(value: Any) -> str | None:
    """A model's name from a config value: ``"resnet8"`` or ``{"name": "resnet8", ...}``."""
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping):
        for key in ("name", "_component_", "component", "model", "builder"):
            if isinstance(value.get(key), str):
                return value[key]
    return None


def _model_name(config: Mapping[str, Any], role: str, stages: tuple[str, ...]) -> str | None:
    """The builder name of the teacher or the student, wherever the config keeps it."""
    def section(value: Any) -> Mapping[str, Any]:
        return value if isinstance(value, Mapping) else {}

    # config[role], config["models"][role], then config["stages"][stage]["model"]
    candidates = [config.get(role), section(config.get("models")).get(role)]
    candidates += [section(section(config.get("stages")).get(s)).get("model") for s in stages]
    for value in candidates:
        name = _name_of(value)
        if name:
            return name
    return None


def _distil_settings(config: Mapping[str, Any]) -> dict[str, Any]:
    """``{"alpha", "temperature", "losses": [(name, weight)]}`` of the distillation stage."""
    stages = config.get("stages") if isinstance(config.get("stages"), Mapping) else {}
    cfg = stages.get("distil") or stages.get("distilled") or config  # flat config of older runs
    if not isinstance(cfg, Mapping):
        cfg = {}
    losses = []
    for item in cfg.get("losses") or []:
        if isinstance(item, Mapping):
            name = _name_of(item) or "?"
            losses.append((name, item.get("weight")))
        elif isinstance(item, str):
            losses.append((item, None))
    return {"alpha": cfg.get("alpha"), "temperature": cfg.get("temperature"), "losses": losses}


def loss_names(config: Mapping[str, Any]) -> str:
    """``"kd"``, ``"kd+fitnet"``: the distillation losses of a run's config ("" when none)."""
    return "+".join(name for name, _ in _distil_settings(config)["losses"])


def _recovered(metrics: Mapping[str, Any]) -> float | None:
    """``accuracy_recovered``; computed for older runs that did not record it."""
    if "accuracy_recovered" in metrics:
        return metrics["accuracy_recovered"]
    models = metrics.get("models") or {}
    d = _distil_key(models)
    try:
        t, s, a = (models[k]["test_accuracy"] for k in ("teacher", "scratch", d))
    except (KeyError, TypeError):
        return None
    return None if t <= s else (a - s) / (t - s)


def _gain(metrics: Mapping[str, Any]) -> float | None:
    if metrics.get("distillation_gain_points") is not None:
        return metrics["distillation_gain_points"]
    models = metrics.get("models") or {}
    d = _distil_key(models)
    if d and "scratch" in models:
        return 100 * (models[d]["test_accuracy"] - models["scratch"]["test_accuracy"])
    return None


# ---------------------------------------------------------------------------------------
# the content, once, for both formats


def _num(value: Any, fmt: str, default: str = "n/a") -> str:
    try:
        return format(float(value), fmt)
    except (TypeError, ValueError):
        return default


def _title(metrics: Mapping[str, Any]) -> str:
    dataset = (metrics.get("dataset") or {}).get("name")
    name = metrics.get("name") or dataset or "run"
    return f"Knowledge distillation: {name}"


def _experiment(metrics: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The experiment line as ``(kind, text)`` pieces, ``kind`` ``"text"`` or ``"code"``."""
    config = metrics.get("config") or {}
    ds = metrics.get("dataset") or {}
    out: list[tuple[str, str]] = []
    if ds.get("name"):
        out.append(("text", "Dataset "))
        out.append(("code", str(ds["name"])))
        sizes = []
        if ds.get("train") is not None:
            sizes.append(f"{int(ds['train']):,} training samples")
        if ds.get("labelled") is not None and ds.get("labelled") != ds.get("train"):
            sizes.append(f"{int(ds['labelled']):,} labelled")
        if ds.get("unlabelled"):
            sizes.append(f"{int(ds['unlabelled']):,} unlabelled (soft targets only)")
        if ds.get("test") is not None:
            sizes.append(f"{int(ds['test']):,} test")
        if ds.get("num_classes"):
            sizes.append(f"{int(ds['num_classes'])} classes")
        if ds.get("input_shape"):
            sizes.append("input " + "x".join(str(d) for d in ds["input_shape"]))
        out.append(("text", f" ({', '.join(sizes)}). " if sizes else ". "))
    teacher = _model_name(config, "teacher", ("teacher",))
    student = _model_name(config, "student", ("distil", "distilled", "scratch"))
    if teacher:
        out += [("text", "Teacher "), ("code", teacher), ("text", "; " if student else ". ")]
    if student:
        out += [("text", "student " if teacher else "Student "), ("code", student), ("text", ". ")]
    d = _distil_settings(config)
    parts = []
    if d["losses"]:
        parts.append("loss " + " + ".join(
            name if w is None or w == 1 else f"{_num(w, 'g')} x {name}" for name, w in d["losses"]))
    if d["alpha"] is not None:
        parts.append(f"alpha {_num(d['alpha'], 'g')}")
    if d["temperature"] is not None:
        parts.append(f"temperature {_num(d['temperature'], 'g')}")
    if parts:
        out.append(("text", "Distillation: " + ", ".join(parts) + "."))
    return out


def _table_rows(metrics: Mapping[str, Any]) -> list[dict[str, str]]:
    models = metrics.get("models") or {}
    ref = models.get("teacher") or {}
    rows = []
    for stage in _stage_order(metrics):
        m = models[stage] or {}
        try:
            lat = f"{ref['latency_ms'] / m['latency_ms']:.1f}x"
        except (KeyError, TypeError, ZeroDivisionError):
            lat = "n/a"
        try:
            thr = f"{m['throughput'] / ref['throughput']:.1f}x"
        except (KeyError, TypeError, ZeroDivisionError):
            thr = "n/a"
        train = _num(m.get("train_seconds"), ".0f")
        train = f"{train} s" if train != "n/a" else train
        if m.get("reused"):
            train += " (reused)"
        rows.append({
            "stage": stage,
            "model": stage_label(stage),
            "accuracy": f"{_num(100 * m['test_accuracy'], '.2f')}%" if m.get("test_accuracy") is not None else "n/a",
            "parameters": f"{int(m['parameters']):,}" if m.get("parameters") is not None else "n/a",
            "size": human_bytes(m["size_bytes"]) if m.get("size_bytes") is not None else "n/a",
            "latency": f"{_num(m.get('latency_ms'), '.3f')} / {_num(m.get('latency_p90_ms'), '.3f')}",
            "throughput": _num(m.get("throughput"), ",.0f"),
            "speedup": f"{lat} / {thr}",
            "train": train,
        })
    return rows


def _batches(metrics: Mapping[str, Any]) -> tuple[str, str]:
    models = metrics.get("models") or {}
    any_row = next(iter(models.values()), {}) or {}
    return str(any_row.get("latency_batch", "?")), str(any_row.get("throughput_batch", "?"))


def _headlines(metrics: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    """``(value, label, tone)`` of the headline numbers; tone ``good``, ``bad`` or ``""``."""
    models = metrics.get("models") or {}
    has_scratch = "scratch" in models
    out = []
    gain = _gain(metrics)
    if gain is not None:
        out.append((f"{gain:+.2f} points", "distilled vs the same student from scratch (test accuracy)",
                    "good" if gain > 0 else "bad" if gain < 0 else ""))
    else:
        out.append(("n/a", "distillation gain: " + ("no scratch student in this run" if not has_scratch
                                                    else "not recorded"), ""))
    recovered = _recovered(metrics)
    if recovered is not None:
        out.append((f"{100 * recovered:.1f}%", "of the teacher-scratch accuracy gap recovered",
                    "good" if recovered > 0 else "bad" if recovered < 0 else ""))
    else:
        why = ("no scratch student in this run" if not has_scratch
               else "the teacher is no more accurate than the scratch student" if "teacher" in models
               else "not recorded")
        out.append(("n/a", f"accuracy recovered: {why}", ""))
    agreement = metrics.get("agreement") or {}
    for stage in ("scratch", "distil", "distilled"):
        if agreement.get(stage) is not None:
            out.append((f"{100 * agreement[stage]:.1f}%",
                        f"top-1 agreement of the {stage_label(stage)} student with the teacher", ""))
    return out


def advice(metrics: Mapping[str, Any]) -> str | None:
    """Why distillation did not help in this run, and what to try; ``None`` when it helped
    (or there is no scratch student to compare with)."""
    gain = _gain(metrics)
    models = metrics.get("models") or {}
    if gain is None or gain > 0 or "teacher" not in models or "scratch" not in models:
        return None
    t, sc = 100 * models["teacher"]["test_accuracy"], 100 * models["scratch"]["test_accuracy"]
    if t - sc < 1.0:
        standing = "only slightly more accurate than" if t > sc else "no more accurate than"
        return (f"The teacher ({t:.2f}%) is {standing} the student trained from scratch ({sc:.2f}%), so it "
                "has little to teach: train it longer (stages.teacher.epochs), or give the students fewer "
                "labels (data.subset=N with data.unlabelled=true), where soft targets matter most.")
    return ("The student did not catch up with its softened targets in this budget: try more epochs "
            "(stages.distil.epochs) or a lower temperature (stages.distil.temperature).")


def _machine(metrics: Mapping[str, Any]) -> str:
    m = metrics.get("machine") or {}
    if not m:
        return ""
    parts = [f"Measured on {m.get('processor') or 'an unknown processor'}"]
    if m.get("cpu_count"):
        parts[0] += f" ({m['cpu_count']} CPUs)"
    if m.get("torch_threads") is not None:
        parts.append(f"{m['torch_threads']} PyTorch thread(s)")
    if m.get("torch"):
        parts.append(f"torch {m['torch']}")
    if m.get("python"):
        parts.append(f"Python {m['python']}")
    if m.get("cuda"):
        parts.append(f"GPU {m['cuda']}")
    if m.get("platform"):
        parts.append(str(m["platform"]))
    return ", ".join(parts) + ". Latency: median and 90th percentile of repeated forward passes after warm-up."


def _caption(key: str) -> str:
    return CAPTIONS.get(key, key)


# ---------------------------------------------------------------------------------------
# HTML


def _data_uri(path: Path) -> str:
    mime = _MIME.get(path.suffix.lower(), "application/octet-stream")
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode('ascii')}"


def render_html(metrics: Mapping[str, Any], figures: Mapping[str, str | os.PathLike]) -> str:
    """A self-contained HTML page of a run: no external resource, figures embedded.

    Args:
        metrics: the run's ``metrics.json``.
        figures: ``{figure key: image file}``; keys ``accuracy``, ``curves`` and
            ``confusion`` get their captions from :data:`CAPTIONS`, others are their own.

    Returns:
        The page, every piece of text from ``metrics`` escaped.

    Raises:
        FileNotFoundError: if a figure's file does not exist.
    """
    e = html.escape
    title = _title(metrics)
    experiment = "".join(f"<code>{e(t)}</code>" if kind == "code" else e(t) for kind, t in _experiment(metrics))
    lb, tb = _batches(metrics)

    cards = "\n".join(
        f'<div class="card"><div class="value {e(tone)}">{e(value)}</div><div class="label">{e(label)}</div></div>'
        for value, label, tone in _headlines(metrics)
    )
    header = ("model", "test accuracy", "parameters", "size on disk", f"latency b={lb} (ms, median / p90)",
              f"throughput b={tb} (samples/s)", "speed-up vs teacher (latency / throughput)", "training time")
    cols = ("model", "accuracy", "parameters", "size", "latency", "throughput", "speedup", "train")
    body = "\n".join(
        f'<tr class="{e(r["model"])}" data-stage="{e(r["stage"])}">'
        + "".join(f"<td>{e(r[c])}</td>" for c in cols)
        + "</tr>"
        for r in _table_rows(metrics)
    )
    table = (
        '<table class="comparison" id="comparison">\n<thead><tr>'
        + "".join(f"<th>{e(h)}</th>" for h in header)
        + f"</tr></thead>\n<tbody>\n{body}\n</tbody>\n</table>"
    )

    blocks = []
    for key, path in figures.items():
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"figure {key!r} not found at {path}; draw it first (write_report does)")
        caption = _caption(key)
        blocks.append(
            f'<figure id="figure-{e(key)}"><img src="{_data_uri(path)}" alt="{e(caption)}">'
            f"<figcaption>{e(caption)}</figcaption></figure>"
        )
    note = advice(metrics)
    advice_html = f'<p class="advice"><strong>Why no gain here:</strong> {e(note)}</p>\n' if note else ""
    advice_html = "".join(f'<p class="warning"><strong>Warning:</strong> {e(w)}.</p>\n'
                          for w in metrics.get("warnings") or []) + advice_html
    figures_html = ("<h2>Figures</h2>\n" + "\n".join(blocks)) if blocks else ""
    machine = _machine(metrics)
    version = metrics.get("kdistill_version")
    generated = f"Generated by kdistill {version}." if version else "Generated by kdistill."

    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{_CSP}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{e(title)}</title>
<style>{_CSS}</style>
</head>
<body>
<main>
<h1>{e(title)}</h1>
<p class="experiment">{experiment}</p>
<div class="headline">
{cards}
</div>
{advice_html}<h2>Teacher, student from scratch, distilled student</h2>
{table}
{figures_html}
<footer>
<p class="machine">{e(machine)}</p>
<p>{e(generated)} Accuracies are those of the final epoch (no selection on the test set).</p>
</footer>
</main>
<script>{_SCRIPT}</script>
</body>
</html>
"""


# ---------------------------------------------------------------------------------------
# Markdown


def _md(text: str) -> str:
    """Text safe in Markdown prose: no raw HTML."""
    return html.escape(text, quote=False)


def _md_link(path: Path, base: Path | None) -> str:
    if base is not None:
        try:
            return path.resolve().relative_to(Path(base).resolve()).as_posix()
        except ValueError:
            pass
    return path.as_posix() if not path.is_absolute() else path.name


def render_markdown(
    metrics: Mapping[str, Any],
    figures: Mapping[str, str | os.PathLike],
    *,
    base: str | os.PathLike | None = None,
) -> str:
    """The report as Markdown: the same content as :func:`render_html`, figures as links.

    Args:
        metrics: the run's ``metrics.json``.
        figures: ``{figure key: image file}``.
        base: the folder the Markdown file is written to: links are relative to it
            (``figures/curves.png``). Without it, relative paths are kept and absolute
            ones become the bare file name.
    """
    def code(t: str) -> str:
        return f"`{t.replace('`', '')}`"

    experiment = "".join(code(t) if kind == "code" else _md(t) for kind, t in _experiment(metrics))
    models = metrics.get("models") or {}
    display = {stage_label(s): models[s] for s in _stage_order(metrics)}
    lines = [f"# {_md(_title(metrics))}", ""]
    if experiment:
        lines += [experiment, ""]
    if display:
        try:
            lines += [comparison_table(display), ""]
        except (KeyError, TypeError, ZeroDivisionError):  # a model lacks a measurement: n/a cells
            lb, tb = _batches(metrics)
            lines += [
                "| model | parameters | size on disk | test accuracy | latency b=" + lb + " (ms, median / p90) "
                "| throughput b=" + tb + " (samples/s) | speed-up vs teacher (latency / throughput) |",
                "|" + "---|" * 7,
                *(f"| {r['model']} | {r['parameters']} | {r['size']} | {r['accuracy']} | {r['latency']} "
                  f"| {r['throughput']} | {r['speedup']} |" for r in _table_rows(metrics)),
                "",
            ]
    lines += [f"- **{_md(value)}** {_md(label)}" for value, label, _ in _headlines(metrics)]
    lines += [f"\n**Warning:** {_md(w)}." for w in metrics.get("warnings") or []]
    note = advice(metrics)
    if note:
        lines += ["", f"**Why no gain here:** {_md(note)}"]
    train = [f"{r['model']} {r['train']}" for r in _table_rows(metrics) if r["train"] != "n/a"]
    if train:
        lines += ["", "Training time: " + _md(", ".join(train)) + "."]
    for key, path in figures.items():
        caption = _md(_caption(key)).replace("[", "(").replace("]", ")")
        lines += ["", f"![{caption}]({_md_link(Path(path), Path(base) if base else None)})", "", f"*{caption}*"]
    machine = _machine(metrics)
    if machine:
        lines += ["", _md(machine)]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------
# the run directory


def _accuracy_curves(metrics: Mapping[str, Any]) -> dict[str, list[float]]:
    """``{display label: test accuracy per epoch}`` from the histories (or older ``curves``)."""
    curves = {}
    for stage, record in (metrics.get("histories") or {}).items():
        values = ((record or {}).get("history") or {}).get("val_accuracy")
        if values:
            curves[stage_label(stage)] = [math.nan if v is None else v for v in values]
    if not curves:  # the classic command's metrics.json
        for stage, values in ((metrics.get("curves") or {}).get("val_accuracy") or {}).items():
            if values:
                curves[stage_label(stage)] = [math.nan if v is None else v for v in values]
    return curves


def write_report(run_dir: str | os.PathLike, metrics: Mapping[str, Any] | None = None) -> dict[str, Path]:
    """Draw a run's figures and write ``report.md`` and ``report.html`` into its directory.

    Steps: 1. figures into ``run_dir/figures/`` (``accuracy.png``: test accuracy per epoch;
    ``curves.png``: loss terms and accuracy per stage; ``confusion.png``: the distilled
    student's confusion matrix), each only when the metrics hold its data; 2. the two
    reports, written atomically.

    Args:
        run_dir: the run directory.
        metrics: its ``metrics.json`` content (default: read from ``run_dir/metrics.json``).

    Returns:
        ``{"accuracy", "curves", "confusion" (those drawn), "markdown", "html": path}``.

    Raises:
        FileNotFoundError: if ``metrics`` is not given and ``run_dir/metrics.json`` is missing.
    """
    run_dir = Path(run_dir)
    if metrics is None:
        path = run_dir / "metrics.json"
        if not path.is_file():
            raise FileNotFoundError(f"no metrics.json in {run_dir}; pass the metrics, or run "
                                    "`kdistill run CONFIG.yaml` to make the run directory")
        metrics = json.loads(path.read_text(encoding="utf-8"))
    fig_dir = run_dir / "figures"
    dataset = (metrics.get("dataset") or {}).get("name") or "test set"
    models = metrics.get("models") or {}
    figures: dict[str, Path] = {}

    # 1. figures
    curves = _accuracy_curves(metrics)
    if curves:
        refs = {}
        if (models.get("teacher") or {}).get("test_accuracy") is not None:
            refs["teacher (final)"] = models["teacher"]["test_accuracy"]
        figures["accuracy"] = plot_curves(curves, fig_dir / "accuracy.png",
                                          title=f"Test accuracy per epoch ({dataset})", references=refs)
    histories = metrics.get("histories")
    if histories:
        order = [s for s in _stage_order(metrics) if s in histories] + [s for s in histories if s not in models]
        figures["curves"] = plot_stage_curves({s: histories[s] for s in order}, fig_dir / "curves.png")
    matrix = metrics.get("confusion_matrix")
    if matrix:
        names = (metrics.get("dataset") or {}).get("class_names")
        if names is not None and len(names) != len(matrix):
            names = None  # a mismatch would fail the whole report; indices are still right
        figures["confusion"] = plot_confusion_matrix(
            matrix, names, fig_dir / "confusion.png", title=f"Distilled student on {dataset} (test set)")

    # 2. the reports
    markdown = atomic_write_text(run_dir / "report.md", render_markdown(metrics, figures, base=run_dir))
    page = atomic_write_text(run_dir / "report.html", render_html(metrics, figures))
    return {**figures, "markdown": markdown, "html": page}
