"""Model builders by name: plain functions returning ``nn.Module``.

``build_model(name, num_classes=..., in_channels=..., input_size=..., **kwargs)``.
"""

from __future__ import annotations

import difflib
from typing import Callable

from torch import nn

from .cifar import cifar_resnet, resnet8x4, resnet20, resnet32x4, resnet56, wide_resnet, wrn_16_2, wrn_40_1, wrn_40_2
from .causal_lm import causal_lm
from .classic import classic_cnn, classic_student, classic_teacher
from .mlp import mlp
from .mobilenetv2 import mobilenetv2
from .shufflenetv2 import shufflenetv2
from .vgg import cifar_vgg, vgg8, vgg13

MODELS: dict[str, Callable[..., nn.Module]] = {
    "classic_teacher": classic_teacher,
    "classic_student": classic_student,
    "classic_cnn": classic_cnn,
    "mlp": mlp,
    # the CIFAR zoo of the CRD benchmark (RepDistiller's architectures); each model has
    # model.feature_layers (stage outputs) and model.penultimate_layer (pooled feature)
    "resnet20": resnet20,
    "resnet56": resnet56,
    "resnet8x4": resnet8x4,
    "resnet32x4": resnet32x4,
    "wrn_16_2": wrn_16_2,
    "wrn_40_1": wrn_40_1,
    "wrn_40_2": wrn_40_2,
    "vgg8": vgg8,
    "vgg13": vgg13,
    "mobilenetv2": mobilenetv2,
    "shufflenetv2": shufflenetv2,
}

#: Language-model builders by name, for language-model runs (``data.text``): a Hugging
#: Face causal LM (transformers, the ``text`` extra) built from a configuration or loaded
#: from a local directory.
LANGUAGE_MODELS: dict[str, Callable[..., nn.Module]] = {
    "causal_lm": causal_lm,
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


__all__ = [
    "LANGUAGE_MODELS",
    "MODELS",
    "build_model",
    "causal_lm",
    "cifar_resnet",
    "cifar_vgg",
    "classic_cnn",
    "classic_student",
    "classic_teacher",
    "mlp",
    "mobilenetv2",
    "resnet8x4",
    "resnet20",
    "resnet32x4",
    "resnet56",
    "shufflenetv2",
    "vgg8",
    "vgg13",
    "wide_resnet",
    "wrn_16_2",
    "wrn_40_1",
    "wrn_40_2",
]
