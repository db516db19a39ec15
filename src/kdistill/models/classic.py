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


def classic_student(**kwargs) -> nn.Sequential:
    """The Keras example's student: 16 and 32 filters (21K parameters at 28x28)."""
    return classic_cnn((16, 32), **kwargs)
