"""The interface every distillation loss implements."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from ..outputs import Batch, Outputs


class DistillationLoss(nn.Module):
    """Base class of distillation losses: ``forward(student, teacher, batch) -> Tensor``.

    Subclasses declare, as class attributes, what the engine needs to know about them:

    * ``taps``: the layers they read, ``{"student": path, "teacher": path}`` (empty for
      losses on logits). The Distiller installs the hooks; it never inspects a loss.
    * ``nonnegative``: whether the loss is a divergence that can never be negative, so a
      negative value means a bug (raw logits where probabilities were expected) and the
      Distiller stops with :class:`~kdistill.errors.InvalidDivergenceError`.
    """

    taps: ClassVar[dict[str, str]] = {}
    nonnegative: ClassVar[bool] = True

    @property
    def name(self) -> str:
        """The name the loss is logged under."""
        return type(self).__name__

    def forward(self, student: Outputs, teacher: Outputs, batch: Batch) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def named_terms(self, student: Outputs, teacher: Outputs, batch: Batch) -> dict[str, torch.Tensor]:
        """The loss as named terms that sum to it (one term unless overridden)."""
        return {self.name: self(student, teacher, batch)}


class WeightedSum(DistillationLoss):
    """A weighted sum of distillation losses, each logged under its own name.

    ``loss = sum_i w_i * loss_i(student, teacher, batch)``; :meth:`named_terms` returns
    the weighted terms (``{"KDLoss": ..., "MyLoss": ...}``), which the Distiller logs.

    Args:
        losses: ``{name: (loss, weight)}``; weights ``>= 0``.
    """

    def __init__(self, losses: dict[str, tuple[DistillationLoss, float]]):
        super().__init__()
        if not losses:
            raise ValueError("WeightedSum needs at least one loss")
        for name, (loss, weight) in losses.items():
            if not isinstance(loss, DistillationLoss):
                raise TypeError(f"loss '{name}' is a {type(loss).__name__}, not a DistillationLoss")
            if not weight >= 0:
                raise ValueError(f"the weight of loss '{name}' must be >= 0, got {weight}")
        self.parts = nn.ModuleDict({name: loss for name, (loss, _) in losses.items()})
        self.weights = {name: float(w) for name, (_, w) in losses.items()}

    @property
    def nonnegative(self) -> bool:  # type: ignore[override]
        return all(loss.nonnegative for loss in self.parts.values())

    @property
    def taps(self) -> dict[str, str]:  # type: ignore[override]
        return {}

    def named_terms(self, student: Outputs, teacher: Outputs, batch: Batch) -> dict[str, torch.Tensor]:
        return {name: self.weights[name] * loss(student, teacher, batch) for name, loss in self.parts.items()}

    def forward(self, student: Outputs, teacher: Outputs, batch: Batch) -> torch.Tensor:
        return sum(self.named_terms(student, teacher, batch).values())

    def extra_repr(self) -> str:
        return ", ".join(f"{k}: weight {w}" for k, w in self.weights.items())
