"""The two records that flow through the engine: a :class:`Batch` in, :class:`Outputs` out.

Both are small dataclasses of tensors, so losses, teachers and callbacks agree on names
instead of on tuple positions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

#: Target value of a sample that has no label: it contributes the distillation loss only.
UNLABELLED = -1

_UNKNOWN: Any = object()  # Batch.labelled not computed yet


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
    _labelled: Any = field(default=_UNKNOWN, init=False, repr=False, compare=False)

    def __len__(self) -> int:
        return int(self.inputs.shape[0])

    def to(self, device: torch.device | str) -> "Batch":
        """Return the batch on ``device`` (non-blocking where that is safe): the batch
        itself when every tensor is there already (no copies, and what was computed
        about it, such as :attr:`labelled`, is kept)."""
        if not isinstance(device, torch.device):
            device = torch.device(device)
        if (self.inputs.device == device and (self.targets is None or self.targets.device == device)
                and (self.index is None or self.index.device == device)
                and (self.mix is None or self.mix.targets.device == device)):
            return self
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        mix = None if self.mix is None else Mix(move(self.mix.targets), self.mix.lam)
        moved = Batch(move(self.inputs), move(self.targets), move(self.index), mix, self.view)
        if self._labelled is not _UNKNOWN:  # known already: no second look at the targets
            moved._labelled = move(self._labelled)
        return moved

    @property
    def labelled(self) -> torch.Tensor | None:
        """``(B,)`` boolean mask of the samples that carry a label, or ``None`` if all do.

        Computed once per batch (it costs a device synchronisation). A loader that knows
        every sample of its data is labelled sets it to ``None`` itself
        (``batch.labelled = None``), which saves a reduction and a synchronisation per
        batch."""
        mask = self._labelled
        if mask is _UNKNOWN:
            mask = self._labelled = self._find_labelled()
        return mask

    @labelled.setter
    def labelled(self, mask: torch.Tensor | None) -> None:
        self._labelled = mask

    @property
    def labelled_known(self) -> bool:
        """Whether :attr:`labelled` is known already (computed, or set by the loader)."""
        return self._labelled is not _UNKNOWN

    def _find_labelled(self) -> torch.Tensor | None:
        targets = self.targets
        if targets is None:
            return None
        # labels are classes >= 0 (or an ignore index < 0, e.g. -100 for tokens): one reduction
        # and one read tell the usual case, every sample labelled
        if targets.numel() == 0 or int(targets.min()) >= 0:
            return None
        mask = targets != UNLABELLED
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
