"""ShuffleNetV2 for CIFAR, the CRD benchmark's "ShuffleNetV2" student (Tian et al., ICLR 2020).

Follows RepDistiller's ``models/ShuffleNetv2.py`` (``ShuffleV2``, net size 1), after
Ma et al. 2018 "ShuffleNet V2: Practical Guidelines for Efficient CNN Architecture
Design", adapted to 32x32 inputs: the stem is a 1x1 convolution to 24 channels with no
stride and no max pooling, so the three stages run at 1/2, 1/4 and 1/8 of the input side.
Pooling is adaptive (RepDistiller's ``avg_pool2d(4)`` is global on 32x32 inputs).

Model layout (``nn.Sequential`` of named parts)::

    stem -> layer1 -> layer2 -> layer3 -> head -> pool -> fc

Each stage is one :class:`DownBlock` (stride 2) followed by :class:`ShuffleBlock` s
(3, 7 and 3 of them). Tap paths: stage outputs ``layer1``, ``layer2``, ``layer3``
(``(B, C, H, W)``; at net size 1: 116, 232 and 464 channels); ``stem``; ``head`` is the
1x1 convolution to 1024 channels with BN and ReLU; penultimate feature ``pool``
(``(B, 1024)``); logits ``fc``. See :mod:`kdistill.models.cifar` for the attributes every
model carries.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from .cifar import _check_sizes, _finish, _pool

__all__ = ["DownBlock", "SHUFFLENETV2_CONFIGS", "ShuffleBlock", "channel_shuffle", "shufflenetv2"]

#: Net size -> (channels of the three stages and the head, blocks per stage after the
#: down-sampling block), as in RepDistiller.
SHUFFLENETV2_CONFIGS: dict[float, tuple[tuple[int, int, int, int], tuple[int, int, int]]] = {
    0.5: ((48, 96, 192, 1024), (3, 7, 3)),
    1: ((116, 232, 464, 1024), (3, 7, 3)),
    1.5: ((176, 352, 704, 1024), (3, 7, 3)),
    2: ((224, 488, 976, 2048), (3, 7, 3)),
}


def channel_shuffle(x: torch.Tensor, groups: int = 2) -> torch.Tensor:
    """Interleave the channels of ``groups`` groups (Zhang et al. 2018, ShuffleNet)."""
    b, c, h, w = x.shape
    # (B, C, H, W) -> (B, g, C/g, H, W) -> (B, C/g, g, H, W) -> (B, C, H, W)
    return x.view(b, groups, c // groups, h, w).transpose(1, 2).reshape(b, c, h, w)


def _conv_bn(in_channels: int, out_channels: int, kernel: int = 1, stride: int = 1, *, depthwise: bool = False,
             relu: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv2d(in_channels, out_channels, kernel, stride=stride, padding=kernel // 2,
                  groups=in_channels if depthwise else 1, bias=False),
        nn.BatchNorm2d(out_channels),
    ]
    if relu:
        layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class ShuffleBlock(nn.Module):
    """Basic unit: split the channels in half, transform one half (1x1 -> 3x3 depthwise ->
    1x1), concatenate with the untouched half, shuffle."""

    def __init__(self, channels: int):
        super().__init__()
        half = channels // 2
        self.branch = nn.Sequential(
            _conv_bn(half, half, 1),
            _conv_bn(half, half, 3, depthwise=True, relu=False),
            _conv_bn(half, half, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        half = x.shape[1] // 2
        keep, change = x[:, :half], x[:, half:]
        return channel_shuffle(torch.cat([keep, self.branch(change)], dim=1))


class DownBlock(nn.Module):
    """Down-sampling unit: two stride-2 branches of ``out_channels / 2`` channels each,
    concatenated and shuffled."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        mid = out_channels // 2
        self.left = nn.Sequential(
            _conv_bn(in_channels, in_channels, 3, 2, depthwise=True, relu=False),
            _conv_bn(in_channels, mid, 1),
        )
        self.right = nn.Sequential(
            _conv_bn(in_channels, mid, 1),
            _conv_bn(mid, mid, 3, 2, depthwise=True, relu=False),
            _conv_bn(mid, mid, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return channel_shuffle(torch.cat([self.left(x), self.right(x)], dim=1))


def shufflenetv2(
    *,
    num_classes: int = 10,
    in_channels: int = 1,
    input_size: int = 28,
    net_size: float = 1,
) -> nn.Sequential:
    """CRD's CIFAR ShuffleNetV2 (default net size 1: 1.36M parameters at 100 classes).

    Tap paths: ``layer1``, ``layer2``, ``layer3`` (stages, ``(B, C, H, W)``), ``pool``
    (penultimate, ``(B, 1024)``); see the module docstring.

    Args:
        num_classes: outputs of ``fc``.
        in_channels: image channels (1 for grayscale, 3 for RGB).
        input_size: image height and width (recorded in ``model.input_shape``).
        net_size: one of :data:`SHUFFLENETV2_CONFIGS` (0.5, 1, 1.5, 2).

    Returns:
        An ``nn.Sequential`` mapping ``(B, in_channels, H, W)`` to ``(B, num_classes)``.

    Raises:
        ValueError: for a ``net_size`` that is not in :data:`SHUFFLENETV2_CONFIGS`.
    """
    _check_sizes(num_classes, in_channels, input_size)
    if net_size not in SHUFFLENETV2_CONFIGS:
        raise ValueError(f"net_size must be one of {sorted(SHUFFLENETV2_CONFIGS)}, got {net_size!r}")
    (c1, c2, c3, c_head), (n1, n2, n3) = SHUFFLENETV2_CONFIGS[net_size]

    def stage(in_ch: int, out_ch: int, n: int) -> nn.Sequential:
        return nn.Sequential(DownBlock(in_ch, out_ch), *(ShuffleBlock(out_ch) for _ in range(n)))

    model = nn.Sequential(
        OrderedDict(
            stem=_conv_bn(in_channels, 24, 1),  # (B, 24, H, W)
            layer1=stage(24, c1, n1),  # (B, c1, H/2, W/2)
            layer2=stage(c1, c2, n2),  # (B, c2, H/4, W/4)
            layer3=stage(c2, c3, n3),  # (B, c3, H/8, W/8)
            head=_conv_bn(c3, c_head, 1),  # (B, c_head, H/8, W/8)
            pool=_pool(),  # (B, c_head)
            fc=nn.Linear(c_head, num_classes),
        )
    )
    # RepDistiller keeps PyTorch's default initialisation for this model.
    return _finish(
        model, in_channels=in_channels, input_size=input_size, feature_layers=("layer1", "layer2", "layer3")
    )
