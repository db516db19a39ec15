"""The interface every distillation loss implements."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from ..outputs import Batch, Outputs


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a loss computes ``x`` in.

    Half precision (and integer tensors) are upcast to float32; float32 and float64 keep
    their own dtype.

    Args:
        x: a logits or feature tensor.

    Returns:
        ``torch.float32`` or ``x``'s own floating-point dtype, whichever is wider.
    """
    return torch.promote_types(x.dtype, torch.float32) if x.is_floating_point() else torch.float32


#: Floating-point dtypes a loss computes in as they are (float32 and wider).
WIDE_DTYPES = (torch.float32, torch.float64)


def in_compute_dtype(x: torch.Tensor) -> torch.Tensor:
    """``x`` in :func:`compute_dtype`: ``x`` itself when it is float32 or float64 (no
    operation at all, which matters in a training step of a small model), else upcast.

    Args:
        x: a logits or feature tensor.

    Returns:
        ``x``, or a float32 copy of it.
    """
    return x if x.dtype in WIDE_DTYPES else x.to(compute_dtype(x))


def check_weight(name: str, value: float, meaning: str = "it scales the loss; 0 turns it off") -> float:
    """Check a weight (or another factor that must be a finite number ``>= 0``).

    Args:
        name: the argument's name, for the message (``"weight"``, ``"alpha"``, ``"eps"``).
        value: the value given.
        meaning: what the value does, ending the message (``"it weights DKD's TCKD term"``).

    Returns:
        ``value`` as a float.

    Raises:
        TypeError: ``value`` is not a number (a string, ``None``, ...).
        ValueError: ``value`` is negative, infinite or NaN.
    """
    try:
        if isinstance(value, (str, bytes)):
            raise TypeError
        v = float(value)
    except (TypeError, ValueError):
        raise TypeError(
            f"{name} must be a number, got {type(value).__name__} {value!r}; give e.g. {name}=1.0"
        ) from None
    if not 0.0 <= v < float("inf"):  # NaN fails both comparisons
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}: {meaning}")
    return v


def check_same_batch(method: str, student: torch.Tensor, teacher: torch.Tensor) -> None:
    """Raise a ``ValueError`` unless the two features hold the same number of samples.

    Args:
        method: the loss's name, for the message.
        student, teacher: ``(B, ...)`` tapped features.
    """
    if student.shape[0] != teacher.shape[0]:
        raise ValueError(
            f"{method} compares the same samples in both models, but the student's feature holds "
            f"{student.shape[0]} samples (shape {tuple(student.shape)}) and the teacher's {teacher.shape[0]} "
            f"(shape {tuple(teacher.shape)}); both must come from the same batch"
        )


class DistillationLoss(nn.Module):
    """Base class of distillation losses: ``forward(student, teacher, batch) -> Tensor``.

    What the engine needs to know about a loss, it declares; the Distiller never inspects
    a loss's internals:

    * ``taps``: the layers it reads, ``{"student": path, "teacher": path}`` (empty for
      losses on logits). A class attribute, or set per instance in ``__init__`` (feature
      losses take ``student_layer`` / ``teacher_layer``). The Distiller installs forward
      hooks on those module paths and hands the captured tensors in
      ``Outputs.features[path]``; :meth:`features` returns the pair.
    * ``nonnegative``: whether the loss is a divergence that can never be negative, so a
      negative value means a bug (raw logits where probabilities were expected) and the
      Distiller stops with :class:`~kdistill.errors.InvalidDivergenceError`.
    * :meth:`setup`: called once before training with the outputs (and features) of one
      batch, so a loss can build the parts whose shapes depend on the models (adapters,
      embedding heads). Parameters it creates are trained with the student: the Distiller
      adds them to the optimizer, saves them in checkpoints and never exports them.
    * :meth:`set_progress`: called before every training step with the epoch and global
      step, for losses with a warm-up or a schedule.
    * :attr:`exclusive`: while true, this loss is the only training signal (the
      hard-label loss and the other distillation terms are logged but not trained on):
      a staged method's first stage, e.g. FitNets' hint training.
    * :attr:`needs_pretraining`, :meth:`pretrain_loss`, :meth:`pretrain_optimizer`: a
      stage the loss runs on its own parts before distillation starts (factor transfer's
      paraphraser); the Distiller runs it once, after set-up (and after a resume, which
      finds it done).
    """

    taps: ClassVar[dict[str, str]] = {}
    nonnegative: ClassVar[bool] = True
    #: Other names the loss is known by in configs (``{name: fitnets}``).
    aliases: ClassVar[tuple[str, ...]] = ()

    def __init__(self) -> None:
        super().__init__()
        self.epoch = 0
        self.global_step = 0

    @property
    def name(self) -> str:
        """The name the loss is logged under."""
        return type(self).__name__

    def forward(self, student: Outputs, teacher: Outputs, batch: Batch) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def named_terms(self, student: Outputs, teacher: Outputs, batch: Batch) -> dict[str, torch.Tensor]:
        """The loss as named terms that sum to it (one term unless overridden)."""
        return {self.name: self(student, teacher, batch)}

    @property
    def exclusive(self) -> bool:
        """Whether this loss alone trains the student at this point (default: never)."""
        return False

    #: Epochs of the loss's own pre-training stage (0: none).
    pretrain_epochs: int = 0

    @property
    def needs_pretraining(self) -> bool:
        """Whether the Distiller must run :meth:`pretrain_loss` before distilling."""
        return False

    def pretrain_loss(self, teacher: Outputs, batch: Batch) -> torch.Tensor:  # pragma: no cover
        """The pre-training stage's loss on one batch (its gradient reaches the loss's parts)."""
        raise NotImplementedError

    def pretrain_optimizer(self) -> torch.optim.Optimizer:  # pragma: no cover
        """The optimizer of the pre-training stage."""
        raise NotImplementedError

    def finish_pretraining(self) -> None:
        """Mark the pre-training stage done (saved with the loss's state)."""

    def setup(self, student: Outputs, teacher: Outputs) -> None:
        """Build shape-dependent parts from one batch's outputs (default: nothing)."""

    def set_progress(self, epoch: int, global_step: int) -> None:
        """The trainer's position: 0-based epoch and optimizer steps taken so far."""
        # plain attributes, never parameters, buffers or modules: set them in the instance's
        # dict directly (nn.Module.__setattr__ would look them up in all three, every step)
        d = self.__dict__
        d["epoch"], d["global_step"] = epoch, global_step

    def features(self, student: Outputs, teacher: Outputs) -> tuple[torch.Tensor, torch.Tensor]:
        """The student's and the teacher's tapped tensors this loss reads.

        Raises:
            KeyError: a tapped layer's output is missing (the loss was called outside a
                Distiller, or its taps were not installed), naming what is there.
        """
        out = []
        for role, outputs in (("student", student), ("teacher", teacher)):
            path = self.taps.get(role)
            if path is None:
                raise KeyError(f"{self.name} declares no {role} layer in its taps ({self.taps})")
            if path not in outputs.features:
                raise KeyError(
                    f"{self.name} needs the {role}'s '{path}' output, but the {role}'s outputs hold "
                    f"{sorted(outputs.features) or 'no features'}: run it inside a Distiller (which installs "
                    f"the taps), capture the layer with kdistill.taps.FeatureTaps, or, for a teacher cache, build "
                    f"it with that layer (TeacherCache.build(..., features=['{path}']))"
                )
            out.append(outputs.features[path])
        return out[0], out[1]


class WeightedSum(DistillationLoss):
    """A weighted sum of distillation losses, each logged under its own name.

    ``loss = sum_i w_i * loss_i(student, teacher, batch)``; :meth:`named_terms` returns
    the weighted terms (``{"KDLoss": ..., "MyLoss": ...}``), which the Distiller logs.

    Args:
        losses: ``{name: (loss, weight)}``; weights ``>= 0``.
    """

    def __init__(self, losses: dict[str, tuple[DistillationLoss, float]]):
        super().__init__()
        if not losses:
            raise ValueError("WeightedSum needs at least one loss")
        for name, (loss, weight) in losses.items():
            if not isinstance(loss, DistillationLoss):
                raise TypeError(f"loss '{name}' is a {type(loss).__name__}, not a DistillationLoss")
            if not weight >= 0:
                raise ValueError(f"the weight of loss '{name}' must be >= 0, got {weight}")
        self.parts = nn.ModuleDict({name: loss for name, (loss, _) in losses.items()})
        self.weights = {name: float(w) for name, (_, w) in losses.items()}

    @property
    def nonnegative(self) -> bool:  # type: ignore[override]
        return all(loss.nonnegative for loss in self.parts.values())

    @property
    def taps(self) -> dict[str, str]:  # type: ignore[override]
        return {}  # each part declares its own; the Distiller collects them from parts

    def parts_list(self) -> list[DistillationLoss]:
        return list(self.parts.values())

    def setup(self, student: Outputs, teacher: Outputs) -> None:
        for loss in self.parts.values():
            loss.setup(student, teacher)

    def set_progress(self, epoch: int, global_step: int) -> None:
        super().set_progress(epoch, global_step)
        for loss in self.parts.values():
            loss.set_progress(epoch, global_step)

    def named_terms(self, student: Outputs, teacher: Outputs, batch: Batch) -> dict[str, torch.Tensor]:
        """Each part's weighted terms: ``{part: w * loss}``, or ``{part/term: w * term}`` for a
        part with several (DKD's ``tckd``/``nckd``, RKD's ``distance``/``angle``, ...).
        They sum to the loss."""
        out = {}
        for name, loss in self.parts.items():
            terms = loss.named_terms(student, teacher, batch)
            if len(terms) == 1:
                out[name] = self.weights[name] * next(iter(terms.values()))
            else:
                out.update({f"{name}/{key.split('/', 1)[-1]}": self.weights[name] * v for key, v in terms.items()})
        return out

    def forward(self, student: Outputs, teacher: Outputs, batch: Batch) -> torch.Tensor:
        return sum(self.named_terms(student, teacher, batch).values())

    def extra_repr(self) -> str:
        return ", ".join(f"{k}: weight {w}" for k, w in self.weights.items())
