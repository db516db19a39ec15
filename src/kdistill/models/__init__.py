"""Model builders by name: plain functions returning ``nn.Module``.

``build_model(name, num_classes=..., in_channels=..., input_size=..., **kwargs)``.
"""

from __future__ import annotations

import difflib
from typing import Callable

from torch import nn

from .classic import classic_cnn, classic_student, classic_teacher
from .mlp import mlp

MODELS: dict[str, Callable[..., nn.Module]] = {
    "classic_teacher": classic_teacher,
    "classic_student": classic_student,
    "classic_cnn": classic_cnn,
    "mlp": mlp,
}


def build_model(
    name: str,
    num_classes: int = 10,
    in_channels: int = 1,
    input_size: int = 28,
    **kwargs,
) -> nn.Module:
    """Build a model by name; see :data:`MODELS` for the names.

    The model records its name (``model.kdistill_name``), which checkpoints store so a
    checkpoint of another model is refused with a clear message.

    Raises:
        ValueError: for an unknown name (with the closest known ones).
    """
    if name not in MODELS:
        close = difflib.get_close_matches(name, MODELS, n=3)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        raise ValueError(f"unknown model {name!r}; known models: {sorted(MODELS)}.{hint}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    model = MODELS[name](num_classes=num_classes, in_channels=in_channels, input_size=input_size, **kwargs)
    model.kdistill_name = name
    return model


__all__ = ["MODELS", "build_model", "classic_cnn", "classic_student", "classic_teacher", "mlp"]
