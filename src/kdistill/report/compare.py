"""Several runs side by side: a table of methods and settings, and a plot of one swept value.

Each run is its ``metrics.json``; a sweep (over ``alpha``, the temperature, the loss, ...)
is a list of them. Rows are plain dicts, so a caller can add what it swept in ``params``
(``{"alpha": 0.1, "temperature": 4}``), which :func:`plot_sweep` reads first.

Language-model runs (``"task": "text"``) are compared on held-out perplexity instead of
test accuracy: their rows carry ``"task": "text"`` and their own fields, and
:func:`compare_table` puts them in a table of their own (image runs given with them get
theirs).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from .content import distil_settings, loss_names
from .figures import pyplot, save_png


def compare_runs(metrics_list: Sequence[tuple[str, Mapping[str, Any]]]) -> list[dict[str, Any]]:
    """One row per run: its method and settings, the three accuracies, gain and student cost.

    Args:
        metrics_list: ``[(run label, metrics.json content), ...]``.

    Returns:
        ``[{"run", "method", "alpha", "temperature", "teacher_accuracy", "scratch_accuracy",
        "distilled_accuracy", "gain_points", "recovered", "student_parameters",
        "distilled_latency_ms"}, ...]``; the scratch accuracy, the gain and the accuracy
        recovered are ``None`` where the run has no scratch student (the recovered
        ratio also where its teacher is no more accurate than the scratch student).
        A language-model run's row has ``"task": "text"`` and held-out perplexities in
        place of accuracies (``teacher_perplexity``, ``scratch_perplexity``,
        ``distilled_perplexity``, ``perplexity_gain``, ``recovered`` of the gap in
        held-out loss, ``distilled_tokens_per_second``).
    """
    rows = []
    for label, metrics in metrics_list:
        if metrics.get("task") == "text":
            rows.append(_text_row(label, metrics))
            continue
        models = metrics["models"]
        settings = distil_settings(metrics["config"])
        distilled = models["distil"]
        rows.append({
            "run": str(label),
            "method": loss_names(metrics["config"]),
            "alpha": settings["alpha"],
            "temperature": settings["temperature"],
            "teacher_accuracy": models["teacher"]["test_accuracy"],
            "scratch_accuracy": models["scratch"]["test_accuracy"] if "scratch" in models else None,
            "distilled_accuracy": distilled["test_accuracy"],
            "gain_points": metrics["distillation_gain_points"],
            "recovered": metrics["accuracy_recovered"],
            "student_parameters": distilled["parameters"],
            "distilled_latency_ms": distilled["latency_ms"],
        })
    return rows


def _text_row(label: str, metrics: Mapping[str, Any]) -> dict[str, Any]:
    """The row of a language-model run.

    Returns:
        ``{"task": "text", "run", "method", "alpha", "temperature", "teacher_perplexity",
        "scratch_perplexity", "distilled_perplexity", "perplexity_gain", "recovered" (the
        share of the teacher-scratch gap in held-out loss), "student_parameters",
        "distilled_tokens_per_second"}``; the scratch perplexity, the gain and the share
        recovered are ``None`` where the run has no scratch student.
    """
    models = metrics["models"]
    settings = distil_settings(metrics["config"])
    distilled = models["distil"]
    return {
        "task": "text",
        "run": str(label),
        "method": loss_names(metrics["config"]),
        "alpha": settings["alpha"],
        "temperature": settings["temperature"],
        "teacher_perplexity": models["teacher"]["perplexity"],
        "scratch_perplexity": models["scratch"]["perplexity"] if "scratch" in models else None,
        "distilled_perplexity": distilled["perplexity"],
        "perplexity_gain": metrics.get("perplexity_gain"),
        "recovered": metrics.get("loss_gap_recovered"),
        "student_parameters": distilled.get("parameters"),
        "distilled_tokens_per_second": distilled.get("generate_tokens_per_second"),
    }


def _is_text(row: Mapping[str, Any]) -> bool:
    return row.get("task") == "text"


def _cell(value: Any, fmt: str = "") -> str:
    if value is None:
        return "-"
    if fmt and isinstance(value, (int, float)) and not isinstance(value, bool):
        return format(value, fmt)
    return str(value).replace("|", "\\|").replace("\n", " ")


def _percent(value: Any) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def _settings(rows: Sequence[Mapping[str, Any]]) -> tuple[list[str], Any]:
    """The swept columns of ``rows`` besides alpha and temperature, and a function giving a
    row's first cells (run, method, alpha, temperature, the swept values)."""
    extra = list(dict.fromkeys(k for r in rows for k in (r.get("params") or {}) if k not in ("alpha", "temperature")))

    def cells(r: Mapping[str, Any]) -> list[str]:
        params = r.get("params") or {}
        alpha = params.get("alpha", r.get("alpha"))
        temperature = params.get("temperature", r.get("temperature"))
        return [_cell(r.get("run")), _cell(r.get("method")), _cell(alpha, "g"), _cell(temperature, "g"),
                *(_cell(params.get(k), "g") for k in extra)]

    return extra, cells


def _parameters(value: Any) -> str:
    return _cell(value, ",d") if isinstance(value, int) else _cell(value, ",.0f")


def _recovered(value: Any) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _image_table(rows: Sequence[Mapping[str, Any]]) -> str:
    extra, settings = _settings(rows)
    header = ["run", "method", "alpha", "temperature", *extra, "teacher", "scratch", "distilled",
              "gain (points)", "recovered", "student parameters", "distilled latency (ms)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [
            *settings(r),
            _percent(r.get("teacher_accuracy")), _percent(r.get("scratch_accuracy")),
            _percent(r.get("distilled_accuracy")),
            _cell(r.get("gain_points"), "+.2f"),
            _recovered(r.get("recovered")),
            _parameters(r.get("student_parameters")),
            _cell(r.get("distilled_latency_ms"), ".3f"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _text_table(rows: Sequence[Mapping[str, Any]]) -> str:
    extra, settings = _settings(rows)
    header = ["run", "method", "alpha", "temperature", *extra, "teacher perplexity", "scratch perplexity",
              "distilled perplexity", "perplexity gain", "loss gap recovered", "student parameters",
              "distilled generation (tokens/s)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [
            *settings(r),
            _cell(r.get("teacher_perplexity"), ",.2f"), _cell(r.get("scratch_perplexity"), ",.2f"),
            _cell(r.get("distilled_perplexity"), ",.2f"),
            _cell(r.get("perplexity_gain"), "+,.2f"),
            _recovered(r.get("recovered")),
            _parameters(r.get("student_parameters")),
            _cell(r.get("distilled_tokens_per_second"), ",.0f"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def compare_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """The rows of :func:`compare_runs` as a Markdown table.

    Swept values in a row's ``params`` other than alpha and temperature get a column each.
    Language-model runs get a table of their own (held-out perplexities, perplexity gain =
    scratch - distilled, share of the teacher-scratch gap in held-out loss recovered);
    when image runs are given with them, each kind's table follows a line naming it.
    """
    image = [r for r in rows if not _is_text(r)]
    text = [r for r in rows if _is_text(r)]
    if not text:
        return _image_table(image)
    if not image:
        return _text_table(text)
    return ("Image classification runs (test accuracy):\n\n" + _image_table(image)
            + "\n\nLanguage-model runs (held-out perplexity, lower is better):\n\n" + _text_table(text))


def _swept(row: Mapping[str, Any], key: str) -> Any:
    params = row.get("params") or {}
    return params[key] if key in params else row.get(key)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def plot_sweep(
    rows: Sequence[Mapping[str, Any]],
    key: str,
    path: str | os.PathLike,
    *,
    title: str | None = None,
) -> Path:
    """Test accuracy of the distilled student against one swept value, written as PNG
    (language-model runs: held-out perplexity).

    The scratch student is a reference: one dashed line when all runs share it, else a
    dashed curve; the teacher likewise (dotted). Several runs at the same value (seeds)
    show as points, the line joining their means.

    Args:
        rows: rows of :func:`compare_runs`; the swept value is read from ``row["params"][key]``
            when present, else ``row[key]``. When every row is a language-model run's, the
            y axis is the held-out perplexity.
        key: the swept setting (``"alpha"``, ``"temperature"``, ``"method"``, ...). The x axis
            is numeric when every value is a number, categorical (in first-seen order) otherwise.
        path: the ``.png`` file to write.
        title: the figure's title (default: "Distilled accuracy against <key>").

    Returns:
        The path written.

    Raises:
        ValueError: if no row has both a value for ``key`` and a distilled accuracy (perplexity).
    """
    text = bool(rows) and all(_is_text(r) for r in rows)
    measure, scale = ("perplexity", 1) if text else ("accuracy", 100)
    points = [(_swept(r, key), r) for r in rows]
    points = [(x, r) for x, r in points if x is not None and r.get(f"distilled_{measure}") is not None]
    if not points:
        have = sorted({k for r in rows for k in (*r.keys(), *(r.get("params") or {}).keys())})
        raise ValueError(f"no row has a value for {key!r} and a distilled {measure}; "
                         f"swept values are read from row['params'] or the row itself, which have: {have}")

    # 1. x positions: the values themselves, or category indices
    numeric = all(_is_number(x) for x, _ in points)
    if numeric:
        order = sorted({x for x, _ in points})
        pos = {x: x for x in order}
    else:
        order = list(dict.fromkeys(str(x) for x, _ in points))
        pos = {x: i for i, x in enumerate(order)}
        points = [(str(x), r) for x, r in points]

    def series(field: str) -> tuple[list[float], list[float], list[float], list[float]]:
        """All points, and the mean per x, of one accuracy (in %) or perplexity field."""
        xs, ys, by_x = [], [], {}
        for x, r in points:
            if r.get(field) is not None:
                xs.append(pos[x])
                ys.append(scale * r[field])
                by_x.setdefault(x, []).append(scale * r[field])
        mx = [pos[x] for x in order if x in by_x]
        my = [sum(by_x[x]) / len(by_x[x]) for x in order if x in by_x]
        return xs, ys, mx, my

    plt = pyplot()
    import matplotlib.ticker

    # 2. draw: distilled students, then scratch and teacher as references
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    xs, ys, mx, my = series(f"distilled_{measure}")
    join = "-" if numeric else "none"  # a line between categories would suggest an order
    ax.plot(mx, my, marker="o", linestyle=join, color="C0", label="distilled")
    if len(xs) > len(mx):
        ax.scatter(xs, ys, color="C0", alpha=0.4, s=14)
    for field, label, colour, style in ((f"scratch_{measure}", "scratch", "C1", "--"),
                                        (f"teacher_{measure}", "teacher", "gray", ":")):
        xs, ys, mx, my = series(field)
        if not ys:
            continue
        if max(ys) - min(ys) < 1e-9:
            ax.axhline(ys[0], linestyle=style, linewidth=1.2, color=colour, label=label)
        else:
            ax.plot(mx, my, linestyle=style if numeric else "none", marker="_" if not numeric else ".",
                    markersize=14 if not numeric else 6, color=colour, label=label)
    if numeric:
        positive = all(x > 0 for x in order)
        if positive and len(order) > 2 and max(order) / min(order) >= 50:
            ax.set_xscale("log")  # temperatures 1..100, learning rates: spread evenly
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xticks(order)
        ax.set_xticklabels([f"{x:g}" for x in order])
    else:
        ax.set_xticks(range(len(order)))
        ax.set_xticklabels(order, rotation=30 if max(len(s) for s in order) > 8 else 0, ha="right"
                           if max(len(s) for s in order) > 8 else "center")
    ax.set_xlabel(key)
    ax.set_ylabel("held-out perplexity" if text else "test accuracy (%)")
    ax.set_title(title or f"Distilled {measure} against {key}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return save_png(fig, path)
