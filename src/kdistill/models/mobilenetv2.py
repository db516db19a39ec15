"""MobileNetV2 for CIFAR, the CRD benchmark's "MobileNetV2" student (Tian et al., ICLR 2020).

Follows RepDistiller's ``models/mobilenetv2.py`` (``mobile_half``: expansion 6, width
multiplier 0.5), the variant from "Knowledge Distillation via Route Constrained
Optimization" (Jin et al. 2019). It differs from ImageNet MobileNetV2 (Sandler et al.
2018) in three ways that matter for parameter counts and shapes:

- every inverted residual has its 1x1 expansion convolution, even when the expansion
  ratio is 1 (the first block);
- channels are ``int(c * width_mult)`` without rounding to multiples of 8;
- the last 1x1 convolution keeps 1280 channels for width multipliers <= 1.

The stem has stride 2, so a 32x32 input is 16x16 after it and 2x2 before pooling.
RepDistiller's pooling ``AvgPool2d(2, ceil_mode=True)`` is global on 32x32 inputs; here
pooling is adaptive and global for any size.

Model layout (``nn.Sequential`` of named parts)::

    stem -> blocks.0 ... blocks.6 -> head -> pool -> fc

Tap paths: stage outputs ``blocks.1``, ``blocks.2``, ``blocks.4``, ``blocks.6`` (the
linear bottlenecks RepDistiller returns as its features; at width 0.5: 12, 16, 48 and 160
channels at 1/2, 1/4, 1/8 and 1/16 of the input side); ``stem``; ``head`` is the 1x1
convolution to 1280 channels with BN and ReLU; penultimate feature ``pool``
(``(B, 1280)``); logits ``fc``. See :mod:`kdistill.models.cifar` for the attributes every
model carries.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from .cifar import _check_sizes, _finish, _init_weights, _pool

__all__ = ["InvertedResidual", "mobilenetv2"]

#: (expansion ratio, channels at width 1, blocks, first stride) of each of the seven
#: groups; ``None`` stands for the model's ``expansion`` (t in the paper's table).
_SETTINGS = (
    (1, 16, 1, 1),
    (None, 24, 2, 1),
    (None, 32, 3, 2),
    (None, 64, 4, 2),
    (None, 96, 3, 1),
    (None, 160, 3, 2),
    (None, 320, 1, 1),
)


class InvertedResidual(nn.Module):
    """1x1 expansion -> 3x3 depthwise -> 1x1 linear projection (Sandler et al. 2018), each
    with BN, ReLU after the first two; a skip connection when the shape is unchanged."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, expansion: int):
        super().__init__()
        hidden = in_channels * expansion
        self.use_residual = stride == 1 and in_channels == out_channels
        self.conv = nn.Sequential(
            nn.Conv2d(in_channels, hidden, 1, bias=False),  # pointwise expansion
            nn.BatchNorm2d(hidden),
            nn.ReLU(),
            nn.Conv2d(hidden, hidden, 3, stride=stride, padding=1, groups=hidden, bias=False),  # depthwise
            nn.BatchNorm2d(hidden),
            nn.ReLU(),
            nn.Conv2d(hidden, out_channels, 1, bias=False),  # linear projection
            nn.BatchNorm2d(out_channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        return x + out if self.use_residual else out


def mobilenetv2(
    *,
    num_classes: int = 10,
    in_channels: int = 1,
    input_size: int = 28,
    width_mult: float = 0.5,
    expansion: int = 6,
) -> nn.Sequential:
    """CRD's CIFAR MobileNetV2 (default: its ``mobile_half`` student, 0.81M parameters at
    100 classes).

    Tap paths: ``blocks.1``, ``blocks.2``, ``blocks.4``, ``blocks.6`` (stages, ``(B, C, H,
    W)``), ``pool`` (penultimate, ``(B, 1280)``); see the module docstring.

    Args:
        num_classes: outputs of ``fc``.
        in_channels: image channels (1 for grayscale, 3 for RGB).
        input_size: image height and width (recorded in ``model.input_shape``).
        width_mult: channel multiplier (CRD's student: 0.5; ``mobile_full``: 1.0).
        expansion: expansion ratio of the inverted residuals after the first (6).

    Returns:
        An ``nn.Sequential`` mapping ``(B, in_channels, H, W)`` to ``(B, num_classes)``.

    Raises:
        ValueError: if ``width_mult`` is not > 0 or ``expansion`` is not an integer >= 1,
            or a width would round to zero channels.
    """
    _check_sizes(num_classes, in_channels, input_size)
    if not width_mult > 0:
        raise ValueError(f"width_mult must be > 0, got {width_mult!r}")
    if isinstance(expansion, bool) or not isinstance(expansion, int) or expansion < 1:
        raise ValueError(f"expansion must be an integer >= 1, got {expansion!r}")
    if int(16 * width_mult) < 1:
        raise ValueError(f"width_mult={width_mult} leaves the first blocks with no channels; use >= 0.0625")

    width = int(32 * width_mult)
    stem = nn.Sequential(
        nn.Conv2d(in_channels, width, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()
    )
    groups = []
    for t, c, n, s in _SETTINGS:
        out = int(c * width_mult)
        blocks = []
        for i in range(n):
            blocks.append(InvertedResidual(width, out, s if i == 0 else 1, expansion if t is None else t))
            width = out
        groups.append(nn.Sequential(*blocks))
    last = int(1280 * width_mult) if width_mult > 1.0 else 1280

    model = nn.Sequential(
        OrderedDict(
            stem=stem,  # (B, 32w, H/2, W/2)
            blocks=nn.Sequential(*groups),  # (B, 320w, H/16, W/16)
            head=nn.Sequential(nn.Conv2d(width, last, 1, bias=False), nn.BatchNorm2d(last), nn.ReLU()),
            pool=_pool(),  # (B, last)
            fc=nn.Linear(last, num_classes),
        )
    )
    _init_weights(model, linear_std=0.01)
    return _finish(
        model,
        in_channels=in_channels,
        input_size=input_size,
        feature_layers=("blocks.1", "blocks.2", "blocks.4", "blocks.6"),
    )
