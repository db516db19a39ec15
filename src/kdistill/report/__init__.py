"""Reports of runs: comparison tables (Markdown), plots (PNG) and the run report (HTML).

Modules: :mod:`~kdistill.report.numbers` (gain and accuracy recovered),
:mod:`~kdistill.report.content` (what a run's report says), :mod:`~kdistill.report.markdown`
and :mod:`~kdistill.report.html` (the two formats; ``html`` also writes a run's whole
report), :mod:`~kdistill.report.figures` and :mod:`~kdistill.report.plots` (PNG figures),
:mod:`~kdistill.report.compare` (several runs side by side), :mod:`~kdistill.report.regimes`
(the two-regime report of ``kdistill classic``).
"""

from .compare import compare_runs, compare_table, plot_sweep
from .content import human_bytes
from .figures import plot_confusion_matrix, plot_stage_curves
from .html import render_html, write_report
from .markdown import comparison_table, render_markdown
from .numbers import headline_numbers
from .plots import plot_curves

__all__ = [
    "compare_runs",
    "compare_table",
    "comparison_table",
    "headline_numbers",
    "human_bytes",
    "plot_confusion_matrix",
    "plot_curves",
    "plot_stage_curves",
    "plot_sweep",
    "render_html",
    "render_markdown",
    "write_report",
]
