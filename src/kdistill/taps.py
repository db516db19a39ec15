"""How the engine calls a model: checked forward passes.

A model that rejects its inputs raises deep inside PyTorch ("mat1 and mat2 shapes cannot
be multiplied"); :class:`CheckedForward` turns that into an error that names the model's
role, the shape given and the shape expected. Only the first batch of each new input
shape and dtype pays for the check. (Forward hooks on named layers join this module with
the feature-distillation methods.)
"""

from __future__ import annotations

import torch
from torch import nn

from .errors import ModelInputError


def describe_expected_input(model: nn.Module) -> str:
    """What a model expects as input, as far as its ``input_shape`` or first layer tells."""
    shape = getattr(model, "input_shape", None)
    if shape is not None:
        return f"(batch, {', '.join(str(s) for s in shape)})"
    for m in model.modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            return f"(batch, {m.in_channels}, ...) with {m.in_channels} input channels"
        if isinstance(m, nn.Linear):
            return f"(batch, {m.in_features})"
    return "the shape its first layer takes"


class CheckedForward:
    """Calls models, explaining the first rejection of each new input shape and dtype.

    Args:
        role: how the model is named in errors (``"model"``, ``"student"``, ``"teacher"``).
    """

    def __init__(self, role: str = "model"):
        self.role = role
        self.accepted: set[tuple[tuple[int, ...], torch.dtype]] = set()

    def __call__(self, model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
        kind = (tuple(inputs.shape[1:]), inputs.dtype)
        if kind in self.accepted:
            return model(inputs)
        try:
            out = model(inputs)
        except (RuntimeError, ValueError, IndexError) as e:
            float_model = any(p.is_floating_point() for p in model.parameters())
            fix = (
                "Convert the inputs to float first, e.g. x.astype('float32') / 255 for 8-bit images."
                if float_model and not inputs.is_floating_point()
                else "Reshape the data or build the model for it."
            )
            raise ModelInputError(
                f"the {self.role} ({type(model).__name__}) rejected inputs of shape {tuple(inputs.shape)} "
                f"(dtype {inputs.dtype}); it expects {describe_expected_input(model)}. "
                f"{fix} ({type(e).__name__}: {str(e).splitlines()[0]})"
            ) from e
        if not isinstance(out, torch.Tensor) or out.dim() < 2:
            raise ModelInputError(
                f"the {self.role} ({type(model).__name__}) returned {type(out).__name__}"
                f"{'' if not isinstance(out, torch.Tensor) else ' of shape ' + str(tuple(out.shape))}; "
                "kdistill expects (B, C) logits (or (B, T, V) for sequences)"
            )
        self.accepted.add(kind)
        return out
