"""Several runs side by side: a table of methods and settings, and a plot of one swept value.

Each run is its ``metrics.json``; a sweep (over ``alpha``, the temperature, the loss, ...)
is a list of them. Rows are plain dicts, so a caller can add what it swept in ``params``
(``{"alpha": 0.1, "temperature": 4}``), which :func:`plot_sweep` reads first.
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
    """
    rows = []
    for label, metrics in metrics_list:
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


def _cell(value: Any, fmt: str = "") -> str:
    if value is None:
        return "-"
    if fmt and isinstance(value, (int, float)) and not isinstance(value, bool):
        return format(value, fmt)
    return str(value).replace("|", "\\|").replace("\n", " ")


def _percent(value: Any) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def compare_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """The rows of :func:`compare_runs` as a Markdown table.

    Swept values in a row's ``params`` other than alpha and temperature get a column each.
    """
    extra = list(dict.fromkeys(k for r in rows for k in (r.get("params") or {}) if k not in ("alpha", "temperature")))
    header = ["run", "method", "alpha", "temperature", *extra, "teacher", "scratch", "distilled",
              "gain (points)", "recovered", "student parameters", "distilled latency (ms)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        params = r.get("params") or {}
        alpha = params.get("alpha", r.get("alpha"))
        temperature = params.get("temperature", r.get("temperature"))
        cells = [
            _cell(r.get("run")), _cell(r.get("method")), _cell(alpha, "g"), _cell(temperature, "g"),
            *(_cell(params.get(k), "g") for k in extra),
            _percent(r.get("teacher_accuracy")), _percent(r.get("scratch_accuracy")),
            _percent(r.get("distilled_accuracy")),
            _cell(r.get("gain_points"), "+.2f"),
            "-" if r.get("recovered") is None else f"{100 * r['recovered']:.1f}%",
            _cell(r.get("student_parameters"), ",d") if isinstance(r.get("student_parameters"), int)
            else _cell(r.get("student_parameters"), ",.0f"),
            _cell(r.get("distilled_latency_ms"), ".3f"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


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
    """Test accuracy of the distilled student against one swept value, written as PNG.

    The scratch student is a reference: one dashed line when all runs share it, else a
    dashed curve; the teacher likewise (dotted). Several runs at the same value (seeds)
    show as points, the line joining their means.

    Args:
        rows: rows of :func:`compare_runs`; the swept value is read from ``row["params"][key]``
            when present, else ``row[key]``.
        key: the swept setting (``"alpha"``, ``"temperature"``, ``"method"``, ...). The x axis
            is numeric when every value is a number, categorical (in first-seen order) otherwise.
        path: the ``.png`` file to write.
        title: the figure's title (default: "Distilled accuracy against <key>").

    Returns:
        The path written.

    Raises:
        ValueError: if no row has both a value for ``key`` and a distilled accuracy.
    """
    points = [(_swept(r, key), r) for r in rows]
    points = [(x, r) for x, r in points if x is not None and r.get("distilled_accuracy") is not None]
    if not points:
        have = sorted({k for r in rows for k in (*r.keys(), *(r.get("params") or {}).keys())})
        raise ValueError(f"no row has a value for {key!r} and a distilled accuracy; "
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
        """All points, and the mean per x, of one accuracy field (in %)."""
        xs, ys, by_x = [], [], {}
        for x, r in points:
            if r.get(field) is not None:
                xs.append(pos[x])
                ys.append(100 * r[field])
                by_x.setdefault(x, []).append(100 * r[field])
        mx = [pos[x] for x in order if x in by_x]
        my = [sum(by_x[x]) / len(by_x[x]) for x in order if x in by_x]
        return xs, ys, mx, my

    plt = pyplot()
    import matplotlib.ticker

    # 2. draw: distilled students, then scratch and teacher as references
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    xs, ys, mx, my = series("distilled_accuracy")
    join = "-" if numeric else "none"  # a line between categories would suggest an order
    ax.plot(mx, my, marker="o", linestyle=join, color="C0", label="distilled")
    if len(xs) > len(mx):
        ax.scatter(xs, ys, color="C0", alpha=0.4, s=14)
    for field, label, colour, style in (("scratch_accuracy", "scratch", "C1", "--"),
                                        ("teacher_accuracy", "teacher", "gray", ":")):
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
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title or f"Distilled accuracy against {key}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return save_png(fig, path)
