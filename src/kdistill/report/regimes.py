"""The report of a two-regime run (``kdistill classic``): few labels next to all labels.

``regimes.json`` (:func:`kdistill.regimes.summarize`) -> ``report.md``, a self-contained
``report.html`` and ``figures/regimes.png``. Every number comes from the runs; the
sentences that read them change with their sign (a loss is called a loss).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

from ..atomic import atomic_write_text
from .content import measured_on
from .figures import pyplot, save_png
from .html import data_uri, render_template

ORDER = ("few_labels", "all_labels")


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}%"


def _points(x: float | None) -> str:
    return "n/a" if x is None else f"{x:+.2f}"


def _regimes(summary: Mapping[str, Any]) -> list[tuple[str, Mapping[str, Any]]]:
    regs = summary.get("regimes") or {}
    return [(k, regs[k]) for k in ORDER if k in regs] + [(k, v) for k, v in regs.items() if k not in ORDER]


def headline(summary: Mapping[str, Any]) -> list[str]:
    """The sentences the report leads with, one per regime, read off the numbers."""
    out = []
    student = summary.get("student", "the student")
    for key, r in _regimes(summary):
        acc, gain, rec = r["accuracy"], r.get("gain_points"), r.get("accuracy_recovered")
        if "distil" not in acc or "scratch" not in acc:
            continue
        setting = (f"{r['labelled']:,} labels + {r['unlabelled']:,} unlabelled images" if r.get("unlabelled")
                   else f"all {r['labelled']:,} labels")
        verdict = ("beats" if gain > 0 else "ties with" if gain == 0 else "falls behind")
        text = (f"With {setting}, the distilled {student} reaches {_pct(acc['distil'])}: it {verdict} the same "
                f"student trained from scratch ({_pct(acc['scratch'])}) by {abs(gain):.2f} points")
        if rec is not None and gain > 0:
            text += f", recovering {100 * rec:.0f}% of the gap to the teacher ({_pct(acc['teacher'])})"
        text += "."
        teacher_ahead = acc.get("teacher", 0) - acc["scratch"]
        if gain <= 0 and teacher_ahead < 0.01:
            text += (f" The teacher ({_pct(acc.get('teacher'))}) is {'no' if teacher_ahead <= 0 else 'hardly'} more "
                     "accurate than the student trained from scratch here, so it has little to teach: train it "
                     "longer (--teacher-epochs) or bring a stronger one (--teacher-checkpoint).")
        elif gain <= 0:
            text += (f" The teacher is {100 * teacher_ahead:.2f} points ahead of the student from scratch, yet "
                     "distillation did not pay in this budget. On Fashion-MNIST what lost least with every label was "
                     "weighting the labels more (alpha 0.5) at T = 1; the teacher's lead over the student mattered "
                     "more than the student's size (docs/capacity_gap.md).")
        out.append(text)
    return out


def table_rows(summary: Mapping[str, Any]) -> list[list[str]]:
    """One row per regime: labelled, unlabelled, teacher, scratch, distilled, gain, gap recovered, agreement."""
    rows = []
    for _, r in _regimes(summary):
        acc = r["accuracy"]
        rows.append([r["title"], f"{r['labelled']:,}", f"{r['unlabelled']:,}", _pct(acc.get("teacher")),
                     _pct(acc.get("scratch")), _pct(acc.get("distil")), _points(r.get("gain_points")),
                     "n/a" if r.get("accuracy_recovered") is None else f"{100 * r['accuracy_recovered']:.0f}%",
                     _pct((r.get("agreement") or {}).get("distil"))])
    return rows


HEADER = ["regime", "labelled", "unlabelled", "teacher", "scratch", "distilled", "distilled - scratch (points)",
          "gap recovered", "distilled agrees with teacher"]
TIME_HEADER = ["regime", "wall seconds per stage (this invocation)", "run"]


def time_rows(summary: Mapping[str, Any]) -> list[list[str]]:
    """Wall seconds of each stage, per regime (a reused stage took no time in this run)."""
    rows = []
    for _, r in _regimes(summary):
        secs, reused = r.get("seconds") or {}, r.get("reused") or {}
        parts = ", ".join(f"{k} reused" if reused.get(k) and v < 1 else f"{k} {v:.0f} s" for k, v in secs.items())
        total = r.get("run_seconds")
        rows.append([r["title"], parts or "n/a", "n/a" if total is None else f"{total:.0f} s"])
    return rows


def machine(summary: Mapping[str, Any]) -> str:
    """"Measured on x86_64 (2 CPUs), ..." from the summary's machine and date."""
    return measured_on(summary["machine"]) + (f", {summary['date']}" if summary.get("date") else "") + "."


def plot_regimes(summary: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Grouped bars: teacher, scratch and distilled accuracy per regime, the gain written above."""
    plt = pyplot()
    regs = _regimes(summary)
    fig, ax = plt.subplots(figsize=(7.5, 4.2), dpi=110)
    kinds = [("teacher", "#8a94a6"), ("scratch", "#e0a458"), ("distil", "#2f7ed8")]
    width = 0.26
    lows = []
    for i, (_, r) in enumerate(regs):
        for j, (k, colour) in enumerate(kinds):
            v = r["accuracy"].get(k)
            if v is None:
                continue
            lows.append(100 * v)
            x = i + (j - 1) * width
            ax.bar(x, 100 * v, width, color=colour, label={"distil": "distilled"}.get(k, k) if i == 0 else None)
            ax.text(x, 100 * v + 0.15, f"{100 * v:.1f}", ha="center", va="bottom", fontsize=8)
        if r.get("gain_points") is not None:
            top = 100 * max(r["accuracy"].values())
            ax.text(i, top + 1.3, f"distilled - scratch: {r['gain_points']:+.2f} points", ha="center", fontsize=9,
                    color="#137333" if r["gain_points"] > 0 else "#b3261e", fontweight="bold")
    ax.set_xticks(range(len(regs)))
    ax.set_xticklabels([f"{r['title']}\n({r['labelled']:,} labelled"
                        + (f" + {r['unlabelled']:,} unlabelled)" if r.get("unlabelled") else ")") for _, r in regs])
    lo = min(lows) if lows else 0
    ax.set_ylim(max(0, lo - 6), min(100, max(lows or [100]) + 3.5))
    ax.set_ylabel("test accuracy (%)")
    ds = (summary.get("dataset") or {}).get("name", "")
    ax.set_title(f"{summary.get('student', 'student')} distilled from {summary.get('teacher', 'teacher')} ({ds})",
                 fontsize=10)
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return save_png(fig, path)


def render_markdown(summary: Mapping[str, Any], figure: Path | None, base: Path) -> str:
    """The regimes report as Markdown: the content of :func:`render_html`, the figure as a link.

    Args:
        summary: ``regimes.json`` (:func:`kdistill.regimes.summarize`).
        figure: the PNG of :func:`plot_regimes`; ``None`` for none.
        base: the folder the Markdown file is written to (links are relative to it).
    """
    d = summary["distil"]
    lines = [f"# Distillation with few labels and with all labels ({summary['dataset']['name']})", ""]
    lines += [f"Teacher `{summary['teacher']}` (trained on all labels), student `{summary['student']}`; "
              f"distillation: alpha {d['alpha']}, temperature {d['temperature']}, {d['epochs']} epochs.", ""]
    lines += headline(summary) + [""]
    lines += ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(summary)]
    lines += [""]
    if figure is not None:
        lines += [f"![test accuracy per regime]({os.path.relpath(figure, base)})", ""]
    lines += ["## Time", "", "| " + " | ".join(TIME_HEADER) + " |", "|---|---|---|"]
    lines += ["| " + " | ".join(row) + " |" for row in time_rows(summary)]
    lines += ["", f"Whole command: {summary['wall_seconds']:.0f} s wall. {machine(summary)}", ""]
    lines += ["## Each regime's own report", ""]
    lines += [f"- {r['title']}: [{k}/report.md]({k}/report.md)" for k, r in _regimes(summary)]
    return "\n".join(lines) + "\n"


def render_html(summary: Mapping[str, Any], figure: Path | None) -> str:
    """The self-contained HTML page of the regimes report (every value escaped).

    Args:
        summary: ``regimes.json`` (:func:`kdistill.regimes.summarize`).
        figure: the PNG of :func:`plot_regimes`, embedded; ``None`` for none.
    """
    return render_template(
        "regimes.html",
        dataset=summary["dataset"]["name"],
        teacher=summary["teacher"],
        student=summary["student"],
        distil=summary["distil"],
        headline=headline(summary),
        header=HEADER,
        rows=table_rows(summary),
        figure=None if figure is None else data_uri(figure),
        time_header=TIME_HEADER,
        time_rows=time_rows(summary),
        wall_seconds=f"{summary['wall_seconds']:.0f}",
        machine=machine(summary),
        reports=[(key, r["title"]) for key, r in _regimes(summary)],
    )


def write_regimes_report(out_dir: str | os.PathLike, summary: Mapping[str, Any]) -> dict[str, Path]:
    """``figures/regimes.png``, ``report.md`` and ``report.html`` in ``out_dir``."""
    out_dir = Path(out_dir)
    figure = plot_regimes(summary, out_dir / "figures" / "regimes.png")
    md = atomic_write_text(out_dir / "report.md", render_markdown(summary, figure, out_dir))
    page = atomic_write_text(out_dir / "report.html", render_html(summary, figure))
    return {"figure": figure, "markdown": md, "html": page}
