"""Figures of a run's report: training curves per stage and the confusion matrix.

Matplotlib is imported only when a figure is drawn, with the headless ``Agg`` backend
(:func:`pyplot`); every PNG is written atomically (:func:`save_png`). The other figures
of the reports (:mod:`~kdistill.report.plots`, :mod:`~kdistill.report.compare`,
:mod:`~kdistill.report.regimes`) draw with the same two helpers.
"""

from __future__ import annotations

import io
import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..atomic import atomic_write
from .content import stage_label

#: counts are written in the cells of confusion matrices with at most this many classes
ANNOTATE_MAX_CLASSES = 20


def pyplot() -> Any:
    """``matplotlib.pyplot`` with the headless ``Agg`` backend (unless one is already chosen)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def save_png(fig: Any, path: str | os.PathLike) -> Path:
    """Write ``fig`` as PNG to ``path`` atomically and close it.

    Returns:
        The path written.
    """
    plt = pyplot()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return atomic_write(path, lambda f: f.write(buf.getvalue()))


def _floats(values: Sequence[Any]) -> list[float]:
    """JSON values -> floats, ``null`` (and anything not a number) -> NaN."""
    out = []
    for v in values:
        try:
            out.append(float(v))
        except (TypeError, ValueError):
            out.append(math.nan)
    return out


def _epochs(record: Mapping[str, Any], n: int) -> list[int]:
    """1-based epoch numbers of ``n`` values (History stores 0-based epoch indices)."""
    epochs = list(record.get("epoch") or [])
    if len(epochs) == n and all(isinstance(e, int) for e in epochs):
        return [e + 1 for e in epochs]
    return list(range(1, n + 1))


def _is_loss(key: str) -> bool:
    return "loss" in key


def _base(key: str) -> str:
    return key[4:] if key.startswith("val_") else key


def _draw_terms(ax: Any, record: Mapping[str, Any], keys: list[str], *, percent: bool) -> bool:
    """Plot ``keys`` of one history on ``ax``: train solid, ``val_`` dashed in the same colour.

    Returns:
        Whether anything was drawn.
    """
    history = record.get("history") or {}
    bases = list(dict.fromkeys(_base(k) for k in keys))  # train/val pairs, first-seen order
    drawn = False
    all_epochs: set[int] = set()
    for i, base in enumerate(bases):
        colour = f"C{i % 10}"
        # train: solid line, round markers; test set: dashed, squares (told apart at one epoch too)
        for key, style, marker, suffix in ((base, "-", "o", "train"), (f"val_{base}", "--", "s", "test")):
            if key not in keys:
                continue
            values = _floats(history[key])
            if not values:
                continue
            if percent:
                values = [100 * v for v in values]
            epochs = _epochs(record, len(values))
            ax.plot(epochs, values, linestyle=style, marker=marker, markersize=4 if len(values) > 1 else 6,
                    color=colour, label=f"{base} ({suffix})")
            all_epochs.update(epochs)
            drawn = True
    if all_epochs:
        # integer epochs on the axis; one epoch is centred rather than given a fractional scale
        if len(all_epochs) <= 12:
            ax.set_xticks(sorted(all_epochs))
        else:
            ax.xaxis.get_major_locator().set_params(integer=True)
        if len(all_epochs) == 1:
            (e,) = all_epochs
            ax.set_xlim(e - 0.5, e + 0.5)
    return drawn


def plot_stage_curves(
    histories: Mapping[str, Mapping[str, Any]],
    path: str | os.PathLike,
    *,
    title: str | None = None,
) -> Path:
    """One figure of every stage's training: a column per stage, loss terms above, accuracy below.

    Training values are solid lines, test-set values (``val_`` keys) dashed in the same
    colour. One-epoch histories show as markers; a stage without loss terms or accuracy
    says so in its panel instead of failing.

    Args:
        histories: ``{stage: {"epoch": [0, 1, ...], "history": {"loss": [...],
            "val_loss": [...], "accuracy": [...], ...}}}`` (``History.to_dict()`` per stage).
        path: the ``.png`` file to write.
        title: the figure's title (default: none).

    Returns:
        The path written.
    """
    plt = pyplot()
    stages = list(histories)
    cols = max(1, len(stages))
    fig, axes = plt.subplots(2, cols, figsize=(4.2 * cols, 6.4), dpi=110, squeeze=False)
    if not stages:
        for ax in axes[:, 0]:
            ax.text(0.5, 0.5, "no training history", ha="center", va="center", transform=ax.transAxes)
            ax.set_axis_off()
    for col, stage in enumerate(stages):
        record = histories[stage] or {}
        keys = [k for k, v in (record.get("history") or {}).items() if isinstance(v, (list, tuple))]
        loss_keys = [k for k in keys if _is_loss(k)]
        metric_keys = [k for k in keys if not _is_loss(k)]
        for row, (ax, group, ylabel, percent) in enumerate((
            (axes[0, col], loss_keys, "loss", False),
            (axes[1, col], metric_keys, "accuracy (%)", True),
        )):
            if _draw_terms(ax, record, group, percent=percent):
                ax.legend(fontsize=7)
                ax.grid(alpha=0.3)
            else:
                ax.text(0.5, 0.5, f"no {ylabel.split()[0]} recorded", ha="center", va="center",
                        transform=ax.transAxes, color="gray")
                ax.set_xticks([])
                ax.set_yticks([])
            ax.set_xlabel("epoch")
            ax.set_ylabel(ylabel)
            if row == 0:
                ax.set_title(stage_label(stage))
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return save_png(fig, path)


def plot_confusion_matrix(
    matrix: Sequence[Sequence[float]],
    class_names: Sequence[str] | None,
    path: str | os.PathLike,
    *,
    title: str = "Confusion matrix",
) -> Path:
    """The confusion matrix as a heat map, each row normalised to sum to 1.

    Colours show the fraction of each true class predicted as each class; the raw counts
    (other than 0) are written in the cells when there are at most ``ANNOTATE_MAX_CLASSES``
    classes.

    Args:
        matrix: ``(C, C)`` counts, rows = true class, columns = predicted class.
        class_names: ``C`` names, or ``None`` for the class indices.
        path: the ``.png`` file to write.
        title: the figure's title.

    Returns:
        The path written.

    Raises:
        ValueError: if the matrix is empty or not square, or ``class_names`` has another length.
    """
    counts = [_floats(row) for row in matrix]
    n = len(counts)
    if n == 0 or any(len(row) != n for row in counts):
        shape = f"{n} rows of lengths {sorted({len(r) for r in counts})}" if n else "empty"
        raise ValueError(f"confusion matrix must be square (C, C) with C >= 1, got {shape}")
    if class_names is None:
        names = [str(i) for i in range(n)]
    else:
        names = [str(c) for c in class_names]
        if len(names) != n:
            raise ValueError(
                f"class_names has {len(names)} names but the confusion matrix has {n} classes; "
                "pass one name per row, or None for the class indices"
            )
    # 1. normalise each row by its total (a class absent from the test set stays at 0)
    totals = [sum(v for v in row if not math.isnan(v)) for row in counts]
    fractions = [[(v / t if t > 0 else 0.0) for v in row] for row, t in zip(counts, totals)]

    # 2. draw: size grows with the class count, long names are rotated
    plt = pyplot()
    side = min(max(4.5, 0.55 * n + 2.5), 16.0)
    fig, ax = plt.subplots(figsize=(side + 1.0, side), dpi=110)
    image = ax.imshow(fractions, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    ax.set_xticks(range(n))
    ax.set_yticks(range(n))
    long_names = max(len(s) for s in names) > 3
    ax.set_xticklabels(names, rotation=45 if long_names else 0, ha="right" if long_names else "center",
                       fontsize=8)
    ax.set_yticklabels(names, fontsize=8)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title)

    # 3. counts in the cells, white on dark cells
    if n <= ANNOTATE_MAX_CLASSES:
        size = 8 if n <= 12 else 6
        for i, row in enumerate(counts):
            for j, v in enumerate(row):
                if math.isnan(v) or v == 0:
                    continue  # empty cells stay empty: the mistakes stand out
                text = f"{v:.0f}" if float(v).is_integer() else f"{v:.2g}"
                ax.text(j, i, text, ha="center", va="center", fontsize=size,
                        color="white" if fractions[i][j] > 0.5 else "black")
    fig.tight_layout()
    return save_png(fig, path)
