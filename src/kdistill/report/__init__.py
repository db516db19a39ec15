"""Reports of runs: comparison tables (Markdown) and plots (PNG)."""

from .markdown import comparison_table, human_bytes
from .plots import plot_curves

__all__ = ["comparison_table", "human_bytes", "plot_curves"]
