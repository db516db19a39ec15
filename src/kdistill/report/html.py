"""The HTML page of a run, and :func:`write_report`, which writes a run's whole report.

Pages are rendered from the Jinja templates in ``kdistill/report/templates/`` with
autoescaping: every value put in a page is escaped. The pages need nothing but
themselves: CSS inline, figures embedded as base64 ``data:`` URIs, no external resource
and no JavaScript library (a Content-Security-Policy forbids any).
"""

from __future__ import annotations

import base64
import functools
import json
import math
import os
from pathlib import Path
from typing import Any, Mapping

from ..atomic import atomic_write_text
from . import content
from .figures import plot_confusion_matrix, plot_stage_curves
from .markdown import render_markdown
from .plots import plot_curves
from .text import write_text_report

_MIME = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".svg": "image/svg+xml",
         ".gif": "image/gif", ".webp": "image/webp"}


@functools.lru_cache(maxsize=1)
def _environment() -> Any:
    import jinja2

    return jinja2.Environment(
        loader=jinja2.PackageLoader("kdistill.report", "templates"),
        autoescape=jinja2.select_autoescape(["html"]),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )


def render_template(name: str, **context: Any) -> str:
    """Render one of the report templates (``"run.html"``, ``"regimes.html"``).

    Args:
        name: the template's file name in ``kdistill/report/templates/``.
        **context: the template's variables; every one is escaped where it is put in the page.

    Returns:
        The page.
    """
    return _environment().get_template(name).render(**context)


def data_uri(path: str | os.PathLike) -> str:
    """A file as a ``data:`` URI (``data:image/png;base64,...``), to embed it in a page."""
    path = Path(path)
    mime = _MIME.get(path.suffix.lower(), "application/octet-stream")
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode('ascii')}"


def render_html(metrics: Mapping[str, Any], figures: Mapping[str, str | os.PathLike]) -> str:
    """A self-contained HTML page of a run: no external resource, figures embedded.

    Args:
        metrics: the run's ``metrics.json``.
        figures: ``{figure key: image file}``; keys ``accuracy``, ``curves`` and
            ``confusion`` get their captions from :data:`kdistill.report.content.CAPTIONS`,
            others are their own.

    Returns:
        The page, every piece of text from ``metrics`` escaped.

    Raises:
        FileNotFoundError: if a figure's file does not exist.
    """
    embedded = []
    for key, path in figures.items():
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"figure {key!r} not found at {path}; draw it first (write_report does)")
        embedded.append({"key": key, "src": data_uri(path), "caption": content.caption(key)})
    latency_batch, throughput_batch = content.batches(metrics["models"])
    return render_template(
        "run.html",
        title=content.title(metrics),
        experiment=content.experiment(metrics),
        headlines=content.headlines(metrics),
        warnings=metrics["warnings"],
        advice=content.advice(metrics),
        latency_batch=latency_batch,
        throughput_batch=throughput_batch,
        rows=content.table_rows(metrics),
        figures=embedded,
        machine=content.machine(metrics),
        version=metrics["kdistill_version"],
    )


def _accuracy_curves(metrics: Mapping[str, Any]) -> dict[str, list[float]]:
    """``{display label: test accuracy per epoch}`` of the stages whose history has one."""
    curves = {}
    for stage, record in metrics["histories"].items():
        values = record["history"].get("val_accuracy")
        if values:
            curves[content.stage_label(stage)] = [math.nan if v is None else v for v in values]
    return curves


def write_report(run_dir: str | os.PathLike, metrics: Mapping[str, Any] | None = None) -> dict[str, Path]:
    """Draw a run's figures and write ``report.md`` and ``report.html`` into its directory.

    Steps: 1. figures into ``run_dir/figures/`` (``accuracy.png``: test accuracy per epoch;
    ``curves.png``: loss terms and accuracy per stage; ``confusion.png``: the distilled
    student's confusion matrix), the first two from the stages' training histories
    (a teacher used as it is from a checkpoint has none); 2. the two reports, written atomically.
    A language-model run (``metrics["task"] == "text"``) gets its own report
    (:func:`kdistill.report.text.write_text_report`: ``loss`` and ``curves`` figures).

    Args:
        run_dir: the run directory.
        metrics: its ``metrics.json`` content (default: read from ``run_dir/metrics.json``).

    Returns:
        ``{"accuracy", "curves", "confusion" (those drawn), "markdown", "html": path}``
        (a language-model run: ``{"loss", "curves", "markdown", "html"}``).

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
    if metrics.get("task") == "text":  # a language-model run: measured on held-out text
        return write_text_report(run_dir, metrics)
    fig_dir = run_dir / "figures"
    dataset = metrics["dataset"]["name"]
    figures: dict[str, Path] = {}

    # 1. figures
    curves = _accuracy_curves(metrics)
    if curves:
        refs = {"teacher (final)": metrics["models"]["teacher"]["test_accuracy"]}
        figures["accuracy"] = plot_curves(curves, fig_dir / "accuracy.png",
                                          title=f"Test accuracy per epoch ({dataset})", references=refs)
    histories = metrics["histories"]
    if histories:
        ordered = {s: histories[s] for s in metrics["stages"] if s in histories}
        figures["curves"] = plot_stage_curves(ordered, fig_dir / "curves.png")
    matrix = metrics["confusion_matrix"]
    names = metrics["dataset"]["class_names"]
    if names is not None and len(names) != len(matrix):
        names = None  # a mismatch would fail the whole report; indices are still right
    figures["confusion"] = plot_confusion_matrix(
        matrix, names, fig_dir / "confusion.png", title=f"Distilled student on {dataset} (test set)")

    # 2. the reports
    markdown = atomic_write_text(run_dir / "report.md", render_markdown(metrics, figures, base=run_dir))
    page = atomic_write_text(run_dir / "report.html", render_html(metrics, figures))
    return {**figures, "markdown": markdown, "html": page}
