"""Plots for reports (matplotlib, imported only when a plot is drawn, headless backend)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Sequence

from .figures import pyplot, save_png


def plot_curves(
    curves: Mapping[str, Sequence[float]],
    path: str | os.PathLike,
    *,
    title: str = "Test accuracy per epoch",
    ylabel: str = "test accuracy",
    references: Mapping[str, float] | None = None,
) -> Path:
    """Line plot of one metric per epoch for several models, written atomically as PNG.

    Args:
        curves: ``{model name: [value at epoch 1, value at epoch 2, ...]}``.
        path: the ``.png`` file to write.
        references: ``{label: value}`` drawn as dashed horizontal lines (e.g. the
            teacher's final accuracy, when it trained for fewer epochs than the students).
    """
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    for name, values in curves.items():
        epochs = list(range(1, len(values) + 1))
        ax.plot(epochs, [100 * v for v in values], marker="o", label=name)
    for label, value in (references or {}).items():
        ax.axhline(100 * value, linestyle="--", linewidth=1, color="gray", label=label)
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"{ylabel} (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    longest = max((len(v) for v in curves.values()), default=1)
    ax.set_xticks(range(1, longest + 1))
    fig.tight_layout()
    return save_png(fig, path)
