"""The headline numbers of a run: the distillation gain and the accuracy recovered.

Plain arithmetic on the measured test accuracies; the runner records the results in
``metrics.json`` (``distillation_gain_points``, ``accuracy_recovered``), which the
reports read.
"""

from __future__ import annotations

from typing import Any, Mapping


def headline_numbers(models: Mapping[str, Mapping[str, Any]]) -> tuple[float | None, float | None]:
    """``(gain in points, accuracy recovered)`` from the models' test accuracies.

    Accuracy recovered = (distilled - scratch) / (teacher - scratch); it is undefined
    (``None``) without a scratch student or when the teacher is not more accurate than it
    (there is no gap to recover).

    Args:
        models: ``{stage: {"test_accuracy": float, ...}}`` with ``teacher`` and ``distil``
            (and ``scratch`` when the run trained one), as in ``metrics.json``.

    Returns:
        The gain in percentage points (``None`` without a scratch student) and the
        fraction of the teacher-scratch gap recovered.
    """
    acc = {k: v["test_accuracy"] for k, v in models.items()}
    if "scratch" not in acc or "distil" not in acc:
        return None, None
    gain = 100 * (acc["distil"] - acc["scratch"])
    gap = acc["teacher"] - acc["scratch"]
    return gain, ((acc["distil"] - acc["scratch"]) / gap if gap > 0 else None)
