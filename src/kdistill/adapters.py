"""Adapters (connectors): small trainable layers that map a student feature onto the shape
of the teacher feature it is compared with (FitNets' "regressor").

Shapes are inferred from one batch (the Distiller's dry run calls a loss's ``setup``):

* vectors ``(B, Ds) -> (B, Dt)``: ``nn.Linear`` (identity when ``Ds == Dt``);
* sequences ``(B, T, Ds) -> (B, T, Dt)``: ``nn.Linear`` on the last axis;
* maps ``(B, Cs, Hs, Ws) -> (B, Ct, Ht, Wt)``: 1x1 convolution + batch norm (Romero et
  al.'s regressor in the form CRD's and mdistiller's connectors use), then bilinear
  interpolation to ``(Ht, Wt)`` when the spatial sizes differ.

Adapters are trained with the student, saved with the loss in training checkpoints, and
never part of the exported student.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class MapAdapter(nn.Module):
    """1x1 conv + BN from ``Cs`` to ``Ct`` channels, resized to ``size`` if given."""

    def __init__(self, in_channels: int, out_channels: int, size: tuple[int, int] | None = None):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        self.size = size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.size is not None and tuple(x.shape[-2:]) != self.size:
            # (B, Cs, Hs, Ws) -> (B, Cs, Ht, Wt): resize first, so the conv runs at the teacher's size
            x = F.interpolate(x, size=self.size, mode="bilinear", align_corners=False)
        return self.bn(self.conv(x))


def make_adapter(student_shape: Sequence[int], teacher_shape: Sequence[int]) -> nn.Module:
    """An adapter from a student feature's shape to a teacher feature's (batch axis included).

    Args:
        student_shape: e.g. ``(B, 64, 8, 8)`` or ``(B, 256)``.
        teacher_shape: e.g. ``(B, 256, 8, 8)`` or ``(B, 512)``.

    Returns:
        An ``nn.Module`` mapping student features to the teacher's shape
        (``nn.Identity`` when they already match).

    Raises:
        ValueError: shapes of different kinds (a map against a vector) or ranks kdistill
            has no adapter for, naming both shapes.
    """
    s, t = tuple(student_shape), tuple(teacher_shape)
    if s[1:] == t[1:]:
        return nn.Identity()
    if len(s) == len(t) == 2 or len(s) == len(t) == 3:
        return nn.Linear(s[-1], t[-1])
    if len(s) == len(t) == 4:
        return MapAdapter(s[1], t[1], None if s[2:] == t[2:] else (t[2], t[3]))
    raise ValueError(
        f"no adapter from a student feature of shape {s} to a teacher feature of shape {t}: "
        "kdistill maps vectors (B, D) to vectors, sequences (B, T, D) to sequences and feature maps "
        "(B, C, H, W) to feature maps; tap layers of the same kind in both models "
        "(`kdistill layers MODEL` lists them with their shapes)"
    )
