"""Distillation losses: one family per file, a pure function beside each module.

Built-in names resolve through this module's exports; your own loss is any
:class:`DistillationLoss` subclass.
"""

from .base import DistillationLoss, WeightedSum
from .logits import (
    KDLoss,
    KLDivergence,
    SoftTargetLoss,
    check_divergence,
    kd_loss,
    kl_divergence,
)

__all__ = [
    "DistillationLoss",
    "KDLoss",
    "KLDivergence",
    "SoftTargetLoss",
    "WeightedSum",
    "check_divergence",
    "kd_loss",
    "kl_divergence",
]
