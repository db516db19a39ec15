"""Reports of runs: comparison tables (Markdown), plots (PNG) and the run report (HTML)."""

from .compare import compare_runs, compare_table, plot_sweep
from .figures import plot_confusion_matrix, plot_stage_curves
from .html import render_html, render_markdown, write_report
from .markdown import comparison_table, human_bytes
from .plots import plot_curves

__all__ = [
    "compare_runs",
    "compare_table",
    "comparison_table",
    "human_bytes",
    "plot_confusion_matrix",
    "plot_curves",
    "plot_stage_curves",
    "plot_sweep",
    "render_html",
    "render_markdown",
    "write_report",
]
