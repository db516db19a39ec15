"""VGG with BatchNorm for CIFAR, as in the CRD benchmark (Tian et al., ICLR 2020).

Follows RepDistiller's ``models/vgg.py`` (``vgg8`` and ``vgg13`` there are its ``vgg8_bn``
and ``vgg13_bn``): five blocks of 3x3 convolutions (with bias) + BN + ReLU, 2x2 max
pooling after the first three, global average pooling, and a single linear classifier
(the large fully connected layers of ImageNet VGG are removed). RepDistiller pools once
more before ``block4`` for 64x64 inputs only; here pooling is adaptive instead, which is
the same on 32x32 inputs and has no parameters either way.

Model layout (``nn.Sequential`` of named parts)::

    block0 -> pool0 -> block1 -> pool1 -> block2 -> pool2 -> block3 -> block4 -> pool -> fc

Tap paths: stage outputs ``block1``, ``block2``, ``block3``, ``block4`` (post-ReLU,
``(B, C, H, W)`` with C = 128, 256, 512, 512; RepDistiller's ``feat[1:5]``); ``block0``
is the 64-channel first block; penultimate feature ``pool`` (``(B, 512)``); logits
``fc``. See :mod:`kdistill.models.cifar` for the attributes every model carries.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

from torch import nn

from .cifar import _check_sizes, _finish, _init_weights, _pool

__all__ = ["VGG_CONFIGS", "cifar_vgg", "vgg8", "vgg13"]

#: Convolution widths of the five blocks, by RepDistiller's configuration letter.
VGG_CONFIGS: dict[str, tuple[tuple[int, ...], ...]] = {
    "S": ((64,), (128,), (256,), (512,), (512,)),  # vgg8
    "A": ((64,), (128,), (256, 256), (512, 512), (512, 512)),  # vgg11
    "B": ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),  # vgg13
    "D": ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512)),  # vgg16
}


def _block(in_channels: int, widths: Sequence[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for w in widths:
        layers += [nn.Conv2d(in_channels, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU()]
        in_channels = w
    return nn.Sequential(*layers)


def cifar_vgg(
    config: Sequence[Sequence[int]],
    *,
    num_classes: int = 10,
    in_channels: int = 1,
    input_size: int = 28,
) -> nn.Sequential:
    """A CIFAR VGG with BatchNorm from five blocks' convolution widths.

    Args:
        config: five sequences of convolution widths, e.g. ``VGG_CONFIGS["B"]``.
        num_classes: outputs of ``fc``.
        in_channels: image channels (1 for grayscale, 3 for RGB).
        input_size: image height and width (recorded in ``model.input_shape``).

    Returns:
        An ``nn.Sequential`` mapping ``(B, in_channels, H, W)`` to ``(B, num_classes)``.

    Raises:
        ValueError: if ``config`` does not have five non-empty blocks of positive widths.
    """
    _check_sizes(num_classes, in_channels, input_size)
    config = tuple(tuple(b) for b in config)
    if len(config) != 5 or not all(b and all(isinstance(w, int) and w >= 1 for w in b) for b in config):
        raise ValueError(
            f"config must hold 5 non-empty sequences of positive widths (one per block), got {config!r}"
        )
    outs = [b[-1] for b in config]
    model = nn.Sequential(
        OrderedDict(
            block0=_block(in_channels, config[0]),  # (B, c0, H, W)
            pool0=nn.MaxPool2d(2, 2),
            block1=_block(outs[0], config[1]),  # (B, c1, H/2, W/2)
            pool1=nn.MaxPool2d(2, 2),
            block2=_block(outs[1], config[2]),  # (B, c2, H/4, W/4)
            pool2=nn.MaxPool2d(2, 2),
            block3=_block(outs[2], config[3]),  # (B, c3, H/8, W/8)
            block4=_block(outs[3], config[4]),  # (B, c4, H/8, W/8)
            pool=_pool(),  # (B, c4)
            fc=nn.Linear(outs[4], num_classes),
        )
    )
    _init_weights(model, linear_std=0.01)
    return _finish(
        model,
        in_channels=in_channels,
        input_size=input_size,
        feature_layers=("block1", "block2", "block3", "block4"),
    )


def vgg8(*, num_classes: int = 10, in_channels: int = 1, input_size: int = 28) -> nn.Sequential:
    """VGG-8 with BN (RepDistiller's ``vgg8_bn``; 3.96M parameters at 100 classes).
    Taps: ``block1``-``block4`` (stages), ``pool`` (penultimate, 512-d)."""
    return cifar_vgg(VGG_CONFIGS["S"], num_classes=num_classes, in_channels=in_channels, input_size=input_size)


def vgg13(*, num_classes: int = 10, in_channels: int = 1, input_size: int = 28) -> nn.Sequential:
    """VGG-13 with BN (RepDistiller's ``vgg13_bn``; 9.46M parameters at 100 classes).
    Taps: ``block1``-``block4`` (stages), ``pool`` (penultimate, 512-d)."""
    return cifar_vgg(VGG_CONFIGS["B"], num_classes=num_classes, in_channels=in_channels, input_size=input_size)
