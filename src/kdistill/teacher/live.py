"""A teacher that runs its network on every batch (online distillation)."""

from __future__ import annotations

import torch
from torch import nn

from ..outputs import Batch, Outputs
from ..taps import CheckedForward, FeatureTaps


class LiveTeacher:
    """Wraps a trained network as a frozen teacher.

    On construction the network's parameters get ``requires_grad=False`` and it is put in
    eval mode (dropout off, batch-norm statistics fixed); every forward runs under
    ``torch.inference_mode()``. Its outputs are cloned out of inference mode so losses can
    save them for the student's backward pass. The teacher is never handed to an
    optimizer: after ``fit`` its weights are bit-identical to what they were.

    Args:
        module: the trained teacher network.
        device: where it runs (the Distiller passes its own).
    """

    def __init__(self, module: nn.Module, device: torch.device | str | None = None):
        if not isinstance(module, nn.Module):
            raise TypeError(f"the teacher must be a torch.nn.Module, got {type(module).__name__}")
        self.module = module
        if device is not None:
            module.to(device)
        module.requires_grad_(False)
        module.eval()
        self._forward = CheckedForward("teacher")
        self._taps: FeatureTaps | None = None

    def set_taps(self, paths) -> None:
        """Capture these layers' outputs (``Outputs.features``) on every call; ``[]`` stops.

        Raises:
            ValueError: a path the teacher does not have (closest names listed).
        """
        if self._taps is not None:
            self._taps.remove()
            self._taps = None
        paths = sorted(set(paths))
        if paths:
            self._taps = FeatureTaps(self.module, paths, role="teacher").install()

    def parameters(self):
        """The teacher's parameters (all frozen)."""
        return self.module.parameters()

    def __call__(self, batch: Batch) -> Outputs:
        # A caller's model.train() on a parent module would flip this back: re-assert.
        if self.module.training:
            self.module.eval()
        with torch.inference_mode():
            logits = self._forward(self.module, batch.inputs)
        features = {} if self._taps is None else {k: v.clone() for k, v in self._taps.pop().items()}
        return Outputs(logits=logits.clone(), features=features)

    def __repr__(self) -> str:
        return f"LiveTeacher({type(self.module).__name__})"
