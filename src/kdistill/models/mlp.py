"""Multi-layer perceptrons."""

from __future__ import annotations

import math

from torch import nn


def mlp(
    hidden: tuple[int, ...] | list[int] = (256, 128),
    *,
    num_classes: int = 10,
    in_channels: int = 1,
    input_size: int | None = 28,
    in_features: int | None = None,
    dropout: float = 0.0,
) -> nn.Sequential:
    """Flatten -> [Linear -> ReLU -> Dropout] * len(hidden) -> Linear.

    Args:
        hidden: widths of the hidden layers.
        num_classes: outputs of the last layer.
        in_channels, input_size: image inputs ``(B, in_channels, input_size, input_size)``;
            ignored when ``in_features`` is given.
        in_features: size of flat ``(B, in_features)`` inputs.
        dropout: dropout probability after each hidden layer.
    """
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    if in_features is None:
        if input_size is None:
            raise ValueError("give in_features for vector inputs, or in_channels and input_size for images")
        in_features = in_channels * input_size * input_size
        input_shape = (in_channels, input_size, input_size)
    else:
        input_shape = (in_features,)
    layers: list[nn.Module] = [nn.Flatten()]
    width = in_features
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        if dropout:
            layers.append(nn.Dropout(dropout))
        width = h
    layers.append(nn.Linear(width, num_classes))
    model = nn.Sequential(*layers)
    model.input_shape = input_shape
    assert math.prod(input_shape) == in_features
    return model
