"""The teacher and student CNNs of the classic Keras distillation example.

Keras's ``Distiller`` example ("Knowledge Distillation", keras.io/examples/vision/
knowledge_distillation) uses, for 28x28 grayscale digits::

    teacher: Conv2D(256, 3, strides=2, "same") -> LeakyReLU(0.2)
             -> MaxPooling2D(2, strides=1, "same") -> Conv2D(512, 3, strides=2, "same")
             -> Flatten -> Dense(num_classes)
    student: the same with 16 and 32 filters

Keras's ``"same"`` max-pooling with stride 1 pads one row/column at the bottom/right and
ignores the padding; here that is a ``-inf`` pad before ``MaxPool2d(2, 1)``.
"""

from __future__ import annotations

import math
import numbers

from torch import nn


def _same_size(size: int, stride: int = 2) -> int:
    # output of a 3x3, padding-1 convolution: ceil(size / stride)
    return -(-size // stride)


def classic_cnn(
    filters: tuple[int, int] = (256, 512),
    *,
    num_classes: int = 10,
    in_channels: int = 1,
    input_size: int = 28,
    negative_slope: float = 0.2,
) -> nn.Sequential:
    """Conv -> LeakyReLU -> MaxPool(same) -> Conv -> Flatten -> Linear, as in the Keras example.

    Args:
        filters: channels of the two convolutions.
        num_classes: outputs of the last layer.
        in_channels: image channels (1 for grayscale, 3 for RGB).
        input_size: image height and width.
        negative_slope: LeakyReLU slope (Keras example: 0.2).

    Returns:
        An ``nn.Sequential`` mapping ``(B, in_channels, input_size, input_size)`` to
        ``(B, num_classes)`` logits.
    """
    a, b = filters
    side = _same_size(_same_size(input_size))
    model = nn.Sequential(
        nn.Conv2d(in_channels, a, 3, stride=2, padding=1),
        nn.LeakyReLU(negative_slope),
        nn.ConstantPad2d((0, 1, 0, 1), float("-inf")),  # Keras "same" pooling, stride 1
        nn.MaxPool2d(2, stride=1),
        nn.Conv2d(a, b, 3, stride=2, padding=1),
        nn.Flatten(),  # (B, b, side, side) -> (B, b * side * side)
        nn.Linear(b * side * side, num_classes),
    )
    model.input_shape = (in_channels, input_size, input_size)
    return model


def classic_teacher(**kwargs) -> nn.Sequential:
    """The Keras example's teacher: 256 and 512 filters (1.4M parameters at 28x28)."""
    return classic_cnn((256, 512), **kwargs)


def classic_student(*, width: float = 1.0, **kwargs) -> nn.Sequential:
    """The Keras example's student: 16 and 32 filters (21K parameters at 28x28).

    ``width`` scales both convolutions, for studies of the teacher-student capacity gap:
    the filters are ``(round(16 * width), round(32 * width))``. Width 1 is the Keras
    example's student; width 16 gives ``(256, 512)``, the teacher's architecture (1.4M
    parameters at 28x28). Parameters grow about as ``width**2`` in the second
    convolution and as ``width`` in the last layer, so widths 1, 2, 4, 8, 16 give about
    20K, 50K, 137K, 422K and 1.4M parameters for 10 classes at 28x28.

    Args:
        width: multiplier of the student's filter counts, ``> 0``; small enough values
            to round a filter count to 0 are refused too.
        **kwargs: as for :func:`classic_cnn` (``num_classes``, ``in_channels``,
            ``input_size``, ``negative_slope``).

    Returns:
        An ``nn.Sequential`` mapping ``(B, in_channels, input_size, input_size)`` to
        ``(B, num_classes)`` logits.

    Raises:
        ValueError: if ``width`` is not finite and ``> 0``, or rounds a filter count to 0.
        TypeError: if ``width`` is not a real number.
    """
    if isinstance(width, bool) or not isinstance(width, numbers.Real):
        raise TypeError(f"width must be a number (e.g. 2 or 0.5), got {type(width).__name__} {width!r}")
    w = float(width)
    if not 0 < w < math.inf:
        raise ValueError(
            f"width must be a finite number > 0 (it multiplies the student's 16 and 32 filters; "
            f"1 is the Keras example's student, 16 the teacher's architecture), got {width!r}"
        )
    filters = (round(16 * w), round(32 * w))
    if min(filters) < 1:
        raise ValueError(
            f"width={width!r} gives filters {filters}: every convolution needs at least one "
            f"filter; use width > 1/32 (16 * width must round to at least 1)"
        )
    return classic_cnn(filters, **kwargs)
