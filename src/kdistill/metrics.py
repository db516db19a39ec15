"""Metrics by name or as callables: ``metric(logits, targets) -> scalar tensor``.

A metric is averaged over an epoch weighted by the number of *labelled* samples in each
batch; samples with target ``-1`` are left out, so unlabelled data never counts as wrong.
"""

from __future__ import annotations

import difflib
from typing import Callable, Iterable, Union

import torch

Metric = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def accuracy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Fraction of samples whose highest-scoring class is the target."""
    return (logits.argmax(dim=-1) == targets).float().mean()


def top_k_accuracy(k: int) -> Metric:
    """A metric: fraction of samples whose target is among the ``k`` highest scores."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")

    def top_k(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        kk = min(k, logits.shape[-1])
        hits = (logits.topk(kk, dim=-1).indices == targets.unsqueeze(-1)).any(dim=-1)
        return hits.float().mean()

    top_k.__name__ = f"top{k}"
    return top_k


BUILTIN_METRICS: dict[str, Callable[[], Metric]] = {
    "accuracy": lambda: accuracy,
    "acc": lambda: accuracy,
    "sparse_categorical_accuracy": lambda: accuracy,
    "top5": lambda: top_k_accuracy(5),
    "top_5_accuracy": lambda: top_k_accuracy(5),
    "top1": lambda: accuracy,
}


def resolve_metrics(metrics: Iterable[Union[str, Metric]] | None) -> dict[str, Metric]:
    """Map metric names and callables to ``{log name: callable}``.

    Raises:
        ValueError: for an unknown name (the message lists the known ones).
        TypeError: for something that is neither a name nor a callable.
    """
    out: dict[str, Metric] = {}
    for m in metrics or []:
        if isinstance(m, str):
            key = m.lower()
            if key not in BUILTIN_METRICS:
                close = difflib.get_close_matches(key, BUILTIN_METRICS, n=1)
                hint = f" Did you mean {close[0]!r}?" if close else ""
                raise ValueError(
                    f"unknown metric {m!r}: expected one of {sorted(BUILTIN_METRICS)} "
                    f"or a callable (logits, targets) -> tensor.{hint}"
                )
            name = "accuracy" if key in ("acc", "sparse_categorical_accuracy", "top1") else key
            name = "top5" if key == "top_5_accuracy" else name
            out[name] = BUILTIN_METRICS[key]()
        elif callable(m):
            out[getattr(m, "__name__", type(m).__name__)] = m
        else:
            raise TypeError(f"a metric must be a name or a callable, got {type(m).__name__}")
    return out
