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
