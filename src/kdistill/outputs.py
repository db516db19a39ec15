"""The two records that flow through the engine: a :class:`Batch` in, :class:`Outputs` out.

Both are small dataclasses of tensors, so losses, teachers and callbacks agree on names
instead of on tuple positions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import torch

#: Target value of a sample that has no label: it contributes the distillation loss only.
UNLABELLED = -1


@dataclass
class Mix:
    """Second targets of a mixed batch (mixup, cutmix): sample ``i`` is ``lam`` of itself
    and ``1 - lam`` of another sample whose label is ``targets[i]``."""

    targets: torch.Tensor
    lam: float


@dataclass
class Batch:
    """One mini-batch.

    Attributes:
        inputs: model inputs, e.g. ``(B, C, H, W)`` images or ``(B, D)`` vectors.
        targets: ``(B,)`` integer class labels; :data:`UNLABELLED` (``-1``) marks a sample
            without a label, or ``None`` when the data has no labels at all (``predict``).
        index: ``(B,)`` position of each sample in its dataset, so per-sample state (an
            offline teacher cache, a contrastive memory bank) can be looked up; ``None``
            when the source cannot tell.
        mix: for a batch mixed by mixup/cutmix, the other samples' labels and the mixing
            weight (the hard-label loss is ``lam * CE(y) + (1 - lam) * CE(y_mix)``).
        view: for a batch augmented as one of a teacher cache's stored views
            (:meth:`~kdistill.teacher.TeacherCache.prepare`), which view; the cache
            serves the teacher's outputs for that view. ``None`` otherwise.
    """

    inputs: torch.Tensor
    targets: torch.Tensor | None = None
    index: torch.Tensor | None = None
    mix: Mix | None = None
    view: int | None = None

    def __len__(self) -> int:
        return int(self.inputs.shape[0])

    def to(self, device: torch.device | str) -> "Batch":
        """Return the batch on ``device`` (non-blocking where that is safe)."""
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        mix = None if self.mix is None else Mix(move(self.mix.targets), self.mix.lam)
        return Batch(move(self.inputs), move(self.targets), move(self.index), mix, self.view)

    @cached_property
    def labelled(self) -> torch.Tensor | None:
        """``(B,)`` boolean mask of the samples that carry a label, or ``None`` if all do.

        Computed once per batch (it costs a device synchronisation)."""
        if self.targets is None:
            return None
        mask = self.targets != UNLABELLED
        return None if bool(mask.all()) else mask


@dataclass
class Outputs:
    """What a model (student or teacher) produced for a batch.

    Attributes:
        logits: ``(B, C)`` for classifiers, ``(B, T, V)`` for sequence models; losses
            reduce over the last axis.
        features: intermediate outputs captured by taps, by module path.
    """

    logits: torch.Tensor
    features: dict[str, torch.Tensor] = field(default_factory=dict)
