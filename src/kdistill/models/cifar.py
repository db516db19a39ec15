"""CIFAR ResNets and Wide ResNets, as in the CRD benchmark (Tian et al., ICLR 2020).

The architectures, widths and parameter counts follow RepDistiller's ``models/resnet.py``
and ``models/wrn.py`` (github.com/HobbitLong/RepDistiller), the code behind "Contrastive
Representation Distillation", whose teacher/student pairs (resnet32x4 -> resnet8x4,
wrn_40_2 -> wrn_16_2, resnet56 -> resnet20, ...) most distillation papers report on.

Two deliberate differences, neither of which changes a parameter:

- the first convolution takes ``in_channels`` (1 for grayscale, 3 for RGB);
- global pooling is adaptive (``AdaptiveAvgPool2d(1)``), so any input size works; on
  32x32 inputs it equals RepDistiller's ``AvgPool2d(8)``. Inputs of at least 16x16 keep
  the last stage larger than 1x1.

Every model is an ``nn.Sequential`` of named parts, so feature taps have short stable
paths (``dict(model.named_modules())``). Each model carries:

- ``model.input_shape``: ``(in_channels, input_size, input_size)``;
- ``model.feature_layers``: the paths of the stage outputs, shallow to deep, each
  ``(B, C, H, W)`` (RepDistiller's ``feat[1:-1]``);
- ``model.penultimate_layer``: the path whose output is the pooled ``(B, D)`` feature
  that the classifier reads (RepDistiller's ``feat[-1]``).

No ReLU here is in-place, so a tapped feature is never overwritten by a later layer.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import torch
from torch import nn

__all__ = [
    "cifar_resnet",
    "resnet8x4",
    "resnet20",
    "resnet32x4",
    "resnet56",
    "wide_resnet",
    "wrn_16_2",
    "wrn_40_1",
    "wrn_40_2",
]


# --------------------------------------------------------------------------- shared


def _check_sizes(num_classes: int, in_channels: int, input_size: int) -> None:
    for name, value in (("num_classes", num_classes), ("in_channels", in_channels), ("input_size", input_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def _pool() -> nn.Sequential:
    # (B, C, H, W) -> (B, C, 1, 1) -> (B, C)
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())


def _init_weights(model: nn.Module, *, linear_std: float | None = None) -> None:
    """RepDistiller's initialisation: He-normal convolutions (fan_out), BatchNorm 1 and 0;
    linear layers normal(0, ``linear_std``) with zero bias, or PyTorch's default if None."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear) and linear_std is not None:
            nn.init.normal_(m.weight, 0.0, linear_std)
            nn.init.zeros_(m.bias)


def _finish(
    model: nn.Sequential,
    *,
    in_channels: int,
    input_size: int,
    feature_layers: Sequence[str],
    penultimate_layer: str = "pool",
) -> nn.Sequential:
    """Record the input shape and the tap paths on ``model`` (checked to exist)."""
    names = dict(model.named_modules())
    for path in (*feature_layers, penultimate_layer):
        assert path in names, f"tap path {path!r} missing from the model"
    model.input_shape = (in_channels, input_size, input_size)
    model.feature_layers = tuple(feature_layers)
    model.penultimate_layer = penultimate_layer
    return model


# --------------------------------------------------------------------------- ResNet


class BasicBlock(nn.Module):
    """Post-activation residual block: ``relu(bn(conv(relu(bn(conv(x))))) + shortcut(x))``.

    The shortcut is a 1x1 convolution with BatchNorm when the stride or width changes
    (He et al. 2016 option B, as in RepDistiller), the identity otherwise.
    """

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


def cifar_resnet(
    depth: int,
    widths: Sequence[int],
    *,
    num_classes: int = 10,
    in_channels: int = 1,
    input_size: int = 28,
) -> nn.Sequential:
    """A CIFAR ResNet of basic blocks in three stages (He et al. 2016, section 4.2).

    ``stem`` (3x3 conv, ``widths[0]`` channels, BN, ReLU) -> ``layer1`` (stride 1,
    ``widths[1]``) -> ``layer2`` (stride 2, ``widths[2]``) -> ``layer3`` (stride 2,
    ``widths[3]``) -> ``pool`` -> ``fc``; each stage has ``(depth - 2) / 6`` blocks.

    Tap paths: stage outputs ``layer1``, ``layer2``, ``layer3`` (post-ReLU,
    ``(B, widths[i], H, W)`` at 1, 1/2 and 1/4 of the input side); stem output ``stem``;
    penultimate feature ``pool`` (``(B, widths[3])``); logits ``fc``. Blocks are
    ``layerK.<i>``.

    Args:
        depth: total weighted layers, ``6n + 2`` (8, 20, 32, 56, ...).
        widths: channels of the stem and of the three stages.
        num_classes: outputs of ``fc``.
        in_channels: image channels (1 for grayscale, 3 for RGB).
        input_size: image height and width (recorded in ``model.input_shape``; any
            size works, 32 is the design size).

    Returns:
        An ``nn.Sequential`` mapping ``(B, in_channels, H, W)`` to ``(B, num_classes)``.

    Raises:
        ValueError: if ``depth`` is not ``6n + 2`` with ``n >= 1``, ``widths`` does not
            hold four positive integers, or a size is not a positive integer.
    """
    _check_sizes(num_classes, in_channels, input_size)
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
        raise ValueError(f"depth must be 6n + 2 with n >= 1 (8, 14, 20, 32, 56, 110, ...), got {depth!r}")
    widths = tuple(widths)
    if len(widths) != 4 or not all(isinstance(w, int) and w >= 1 for w in widths):
        raise ValueError(f"widths must be 4 positive integers (stem and three stages), got {widths!r}")
    n = (depth - 2) // 6

    def stage(in_planes: int, planes: int, stride: int) -> nn.Sequential:
        blocks = [BasicBlock(in_planes, planes, stride)]
        blocks += [BasicBlock(planes, planes) for _ in range(n - 1)]
        return nn.Sequential(*blocks)

    w0, w1, w2, w3 = widths
    model = nn.Sequential(
        OrderedDict(
            stem=nn.Sequential(
                nn.Conv2d(in_channels, w0, 3, padding=1, bias=False), nn.BatchNorm2d(w0), nn.ReLU()
            ),
            layer1=stage(w0, w1, 1),  # (B, w1, H, W)
            layer2=stage(w1, w2, 2),  # (B, w2, H/2, W/2)
            layer3=stage(w2, w3, 2),  # (B, w3, H/4, W/4)
            pool=_pool(),  # (B, w3)
            fc=nn.Linear(w3, num_classes),
        )
    )
    _init_weights(model)
    return _finish(
        model, in_channels=in_channels, input_size=input_size, feature_layers=("layer1", "layer2", "layer3")
    )


def resnet20(*, num_classes: int = 10, in_channels: int = 1, input_size: int = 28) -> nn.Sequential:
    """CIFAR ResNet-20: 3 blocks per stage, widths 16/16/32/64 (0.28M parameters at 100
    classes). Taps: ``layer1``-``layer3`` (stages), ``pool`` (penultimate, 64-d)."""
    return cifar_resnet(20, (16, 16, 32, 64), num_classes=num_classes, in_channels=in_channels, input_size=input_size)


def resnet56(*, num_classes: int = 10, in_channels: int = 1, input_size: int = 28) -> nn.Sequential:
    """CIFAR ResNet-56: 9 blocks per stage, widths 16/16/32/64 (0.86M parameters at 100
    classes). Taps: ``layer1``-``layer3`` (stages), ``pool`` (penultimate, 64-d)."""
    return cifar_resnet(56, (16, 16, 32, 64), num_classes=num_classes, in_channels=in_channels, input_size=input_size)


def resnet8x4(*, num_classes: int = 10, in_channels: int = 1, input_size: int = 28) -> nn.Sequential:
    """CRD's ResNet-8x4: 1 block per stage, 4x widths 32/64/128/256 (1.23M parameters at
    100 classes). Taps: ``layer1``-``layer3`` (stages), ``pool`` (penultimate, 256-d)."""
    return cifar_resnet(8, (32, 64, 128, 256), num_classes=num_classes, in_channels=in_channels, input_size=input_size)


def resnet32x4(*, num_classes: int = 10, in_channels: int = 1, input_size: int = 28) -> nn.Sequential:
    """CRD's ResNet-32x4: 5 blocks per stage, 4x widths 32/64/128/256 (7.43M parameters at
    100 classes). Taps: ``layer1``-``layer3`` (stages), ``pool`` (penultimate, 256-d)."""
    return cifar_resnet(32, (32, 64, 128, 256), num_classes=num_classes, in_channels=in_channels, input_size=input_size)


# --------------------------------------------------------------------------- Wide ResNet


class WideBasicBlock(nn.Module):
    """Pre-activation block of a Wide ResNet (Zagoruyko & Komodakis 2016):
    ``conv(dropout(relu(bn(conv(relu(bn(x))))))) + shortcut``.

    When the width or stride changes the shortcut is a 1x1 convolution of the *activated*
    input ``relu(bn(x))``; otherwise it is ``x`` itself.
    """

    def __init__(self, in_planes: int, planes: int, stride: int = 1, dropout: float = 0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.relu = nn.ReLU()
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.equal_in_out = in_planes == planes and stride == 1
        self.shortcut = None if self.equal_in_out else nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = self.relu(self.bn1(x))
        out = self.relu(self.bn2(self.conv1(act)))
        out = self.conv2(self.dropout(out))
        return out + (x if self.shortcut is None else self.shortcut(act))


def wide_resnet(
    depth: int,
    widen_factor: int,
    *,
    num_classes: int = 10,
    in_channels: int = 1,
    input_size: int = 28,
    dropout: float = 0.0,
) -> nn.Sequential:
    """A Wide ResNet WRN-depth-k for CIFAR (Zagoruyko & Komodakis 2016).

    ``stem`` (3x3 conv to 16 channels) -> ``block1`` (stride 1, 16k) -> ``block2``
    (stride 2, 32k) -> ``block3`` (stride 2, 64k) -> ``head`` (BN, ReLU) -> ``pool`` ->
    ``fc``; each of the three groups has ``(depth - 4) / 6`` pre-activation blocks.

    Tap paths: stage outputs ``block1``, ``block2``, ``block3`` (``(B, C, H, W)``, before
    the next BN-ReLU, as RepDistiller's features); ``head`` is ``relu(bn(block3))``;
    penultimate feature ``pool`` (``(B, 64k)``); logits ``fc``.

    Args:
        depth: ``6n + 4`` (10, 16, 22, 28, 40, ...).
        widen_factor: ``k``, the width multiplier of the three groups.
        num_classes, in_channels, input_size: as for :func:`cifar_resnet`.
        dropout: dropout probability between a block's two convolutions (CRD: 0).

    Raises:
        ValueError: for a depth that is not ``6n + 4``, ``widen_factor < 1``, or
            ``dropout`` outside ``[0, 1)``.
    """
    _check_sizes(num_classes, in_channels, input_size)
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 10 or (depth - 4) % 6:
        raise ValueError(f"depth must be 6n + 4 with n >= 1 (10, 16, 22, 28, 40, ...), got {depth!r}")
    if isinstance(widen_factor, bool) or not isinstance(widen_factor, int) or widen_factor < 1:
        raise ValueError(f"widen_factor must be an integer >= 1, got {widen_factor!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    n = (depth - 4) // 6
    c0, c1, c2, c3 = 16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor

    def group(in_planes: int, planes: int, stride: int) -> nn.Sequential:
        blocks = [WideBasicBlock(in_planes, planes, stride, dropout)]
        blocks += [WideBasicBlock(planes, planes, 1, dropout) for _ in range(n - 1)]
        return nn.Sequential(*blocks)

    model = nn.Sequential(
        OrderedDict(
            stem=nn.Conv2d(in_channels, c0, 3, padding=1, bias=False),
            block1=group(c0, c1, 1),  # (B, 16k, H, W)
            block2=group(c1, c2, 2),  # (B, 32k, H/2, W/2)
            block3=group(c2, c3, 2),  # (B, 64k, H/4, W/4)
            head=nn.Sequential(nn.BatchNorm2d(c3), nn.ReLU()),
            pool=_pool(),  # (B, 64k)
            fc=nn.Linear(c3, num_classes),
        )
    )
    _init_weights(model)
    for m in model.modules():  # RepDistiller zeroes the classifier's bias only
        if isinstance(m, nn.Linear):
            nn.init.zeros_(m.bias)
    return _finish(
        model, in_channels=in_channels, input_size=input_size, feature_layers=("block1", "block2", "block3")
    )


def wrn_16_2(*, num_classes: int = 10, in_channels: int = 1, input_size: int = 28) -> nn.Sequential:
    """WRN-16-2 (0.70M parameters at 100 classes). Taps: ``block1``-``block3`` (stages),
    ``pool`` (penultimate, 128-d)."""
    return wide_resnet(16, 2, num_classes=num_classes, in_channels=in_channels, input_size=input_size)


def wrn_40_1(*, num_classes: int = 10, in_channels: int = 1, input_size: int = 28) -> nn.Sequential:
    """WRN-40-1 (0.57M parameters at 100 classes). Taps: ``block1``-``block3`` (stages),
    ``pool`` (penultimate, 64-d)."""
    return wide_resnet(40, 1, num_classes=num_classes, in_channels=in_channels, input_size=input_size)


def wrn_40_2(*, num_classes: int = 10, in_channels: int = 1, input_size: int = 28) -> nn.Sequential:
    """WRN-40-2 (2.25M parameters at 100 classes). Taps: ``block1``-``block3`` (stages),
    ``pool`` (penultimate, 128-d)."""
    return wide_resnet(40, 2, num_classes=num_classes, in_channels=in_channels, input_size=input_size)
