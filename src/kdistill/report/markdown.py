"""The Markdown pages: the teacher / scratch / distilled comparison table and a run's ``report.md``.

The text comes from :mod:`kdistill.report.content`; this module lays it out as Markdown,
with any HTML in it escaped (a Markdown viewer would render it).
"""

from __future__ import annotations

import html
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from . import content


def _md(text: str) -> str:
    """Text safe in Markdown prose: no raw HTML."""
    return html.escape(text, quote=False)


def _link(path: Path, base: Path | None) -> str:
    if base is not None:
        try:
            return path.resolve().relative_to(base.resolve()).as_posix()
        except ValueError:
            pass
    return path.as_posix() if not path.is_absolute() else path.name


def _table(rows: Sequence[Mapping[str, str]], batches: tuple[str, str], reference: str) -> str:
    """Rows of :func:`kdistill.report.content.model_row` (plus ``"model"``) as a Markdown table."""
    lb, tb = batches
    lines = [
        f"| model | parameters | size on disk | test accuracy | latency b={lb} (ms, median / p90) "
        f"| throughput b={tb} (samples/s) | speed-up vs {reference} (latency / throughput) |",
        "|" + "---|" * 7,
    ]
    lines += [f"| {r['model']} | {r['parameters']} | {r['size']} | {r['accuracy']} | {r['latency']} "
              f"| {r['throughput']} | {r['speedup']} |" for r in rows]
    return "\n".join(lines)


def comparison_table(models: Mapping[str, Mapping[str, float]], *, reference: str = "teacher") -> str:
    """A Markdown table, one row per model.

    Args:
        models: ``{name: {"parameters", "size_bytes", "test_accuracy", "latency_ms",
            "latency_p90_ms", "latency_batch", "throughput", "throughput_batch"}}``
            (the dict :func:`kdistill.bench.benchmark_model` returns plus ``test_accuracy``);
            a value a model lacks reads ``n/a``.
        reference: the row speed-ups are measured against (no such row: speed-ups ``-``).
    """
    ref = models.get(reference)
    rows = [{"model": name, **content.model_row(m, ref)} for name, m in models.items()]
    return _table(rows, content.batches(models), reference)


def render_markdown(
    metrics: Mapping[str, Any],
    figures: Mapping[str, str | os.PathLike],
    *,
    base: str | os.PathLike | None = None,
) -> str:
    """A run's report as Markdown: the content of the HTML page, figures as links.

    Args:
        metrics: the run's ``metrics.json``.
        figures: ``{figure key: image file}``.
        base: the folder the Markdown file is written to: links are relative to it
            (``figures/curves.png``). Without it, relative paths are kept and absolute
            ones become the bare file name.

    Returns:
        The page; text from ``metrics`` cannot inject HTML (it is escaped).
    """
    def code(t: str) -> str:
        return f"`{t.replace('`', '')}`"

    rows = content.table_rows(metrics)
    experiment = "".join(code(t) if kind == "code" else _md(t) for kind, t in content.experiment(metrics))
    lines = [f"# {_md(content.title(metrics))}", "", experiment, ""]
    lines += [_table(rows, content.batches(metrics["models"]), "teacher"), ""]
    lines += [f"- **{_md(value)}** {_md(label)}" for value, label, _ in content.headlines(metrics)]
    lines += [f"\n**Warning:** {_md(w)}." for w in metrics["warnings"]]
    note = content.advice(metrics)
    if note:
        lines += ["", f"**Why no gain here:** {_md(note)}"]
    train = [f"{r['model']} {r['train']}" for r in rows if r["train"] != content.MISSING]
    if train:
        lines += ["", "Training time: " + _md(", ".join(train)) + "."]
    for key, path in figures.items():
        caption = _md(content.caption(key)).replace("[", "(").replace("]", ")")
        lines += ["", f"![{caption}]({_link(Path(path), Path(base) if base else None)})", "", f"*{caption}*"]
    lines += ["", _md(content.machine(metrics))]
    return "\n".join(lines) + "\n"
