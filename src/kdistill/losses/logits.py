"""Losses on logits.

Each method is a pure function (what tests and your own training loops call) with a
:class:`~kdistill.losses.base.DistillationLoss` module beside it (what the Distiller calls).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InvalidDivergenceError
from ..outputs import Batch, Outputs
from .base import DistillationLoss

#: Smallest probability used when a divergence is computed from probabilities (Keras's
#: ``epsilon``): keeps ``log`` finite where a distribution has exact zeros.
EPSILON = 1e-7


def check_temperature(temperature: float) -> float:
    """Return ``temperature`` as a float, or raise if it is not a positive finite number."""
    t = float(temperature)
    if not (t > 0 and t != float("inf")):
        raise ValueError(
            f"temperature must be a positive number, got {temperature!r}: "
            "use 1 for the plain softmax and values above 1 (e.g. 2-20) to soften it"
        )
    return t


def check_same_classes(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> None:
    """Raise a ``ValueError`` naming both shapes if student and teacher logits differ."""
    if student_logits.shape != teacher_logits.shape:
        s, t = student_logits.shape[-1], teacher_logits.shape[-1]
        what = (
            f"the student predicts {s} classes and the teacher {t}"
            if s != t
            else f"student logits have shape {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)}"
        )
        raise ValueError(
            f"student and teacher outputs do not match: {what}. Both must score the same "
            "classes in the same order: build the student with the teacher's num_classes."
        )


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """float32 for half-precision (and integer) logits, else their own dtype (float64 stays)."""
    return torch.promote_types(x.dtype, torch.float32) if x.is_floating_point() else torch.float32


def masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of ``values`` over the positions where ``mask`` is true (all if ``None``).

    Raises:
        ValueError: if ``mask`` does not have the shape of ``values`` (no broadcasting: a
            ``(B,)`` mask on ``(B, T)`` values would silently mean something else).
    """
    if mask is None:
        return values.mean()
    if tuple(mask.shape) != tuple(values.shape):
        raise ValueError(
            f"mask has shape {tuple(mask.shape)} but the per-position losses have shape "
            f"{tuple(values.shape)} (the logits' shape without the class axis); pass one "
            "boolean per sample (or per token)"
        )
    keep = mask.to(device=values.device, dtype=torch.bool)
    # masked_fill, not values * mask: a NaN/inf at a masked-out position must not leak in
    return values.masked_fill(~keep, 0.0).sum() / keep.sum().clamp_min(1).to(values.dtype)


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 4.0,
    *,
    temperature_squared: bool = True,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Knowledge-distillation loss of Hinton, Vinyals & Dean (2015), "Distilling the
    Knowledge in a Neural Network", arXiv:1503.02531.

    ``L = T^2 * mean_i KL(p_t(i) || p_s(i))`` with ``p = softmax(z / T)`` over the last
    axis, ``KL(p || q) = sum_c p_c (log p_c - log q_c)``.

    The factor ``T^2`` keeps the gradient's magnitude independent of ``T`` (the soft
    targets' gradients scale as ``1/T^2``), so the weight between this term and the
    hard-label loss means the same at every temperature; ``temperature_squared=False``
    gives the unscaled KL. Computed from ``log_softmax`` of both sides, so it is exact
    where the softened distributions have tiny probabilities.

    Args:
        student_logits: ``(B, C)`` or ``(B, T, V)`` raw scores of the student.
        teacher_logits: the teacher's scores, same shape.
        temperature: softening temperature ``T > 0``.
        temperature_squared: multiply by ``T^2`` (Hinton et al.'s scaling).
        mask: optional boolean mask over the leading axes (``(B,)`` or ``(B, T)``);
            positions where it is false are left out of the mean.

    Returns:
        A scalar: the KL divergence averaged over samples (positions), times ``T^2``.

    Raises:
        ValueError: if the shapes differ or ``temperature`` is not positive.
    """
    t = check_temperature(temperature)
    check_same_classes(student_logits, teacher_logits)
    # half precision is upcast to float32; float32 and float64 keep their precision
    log_p_s = F.log_softmax(student_logits.to(_compute_dtype(student_logits)) / t, dim=-1)
    log_p_t = F.log_softmax(teacher_logits.to(_compute_dtype(teacher_logits)) / t, dim=-1)
    # (B, C) -> (B,): KL per sample; exp(log_p_t) is the teacher's soft target
    per_sample = (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=-1)
    loss = masked_mean(per_sample, mask)
    return loss * (t * t) if temperature_squared else loss


class KDLoss(DistillationLoss):
    """Hinton et al. (2015) soft-target loss as a module; see :func:`kd_loss`.

    Args:
        temperature: softening temperature (Hinton et al. used 1-20; 4 is the CIFAR default
            of the research toolkits).
        temperature_squared: multiply by ``T^2``.
    """

    def __init__(self, temperature: float = 4.0, *, temperature_squared: bool = True):
        super().__init__()
        self.temperature = check_temperature(temperature)
        self.temperature_squared = bool(temperature_squared)

    def forward(self, student: Outputs, teacher: Outputs, batch: Batch | None = None) -> torch.Tensor:
        return kd_loss(
            student.logits,
            teacher.logits,
            self.temperature,
            temperature_squared=self.temperature_squared,
        )

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, temperature_squared={self.temperature_squared}"


def kl_divergence(student_probs: torch.Tensor, teacher_probs: torch.Tensor) -> torch.Tensor:
    """``mean_i sum_c t_ic (log t_ic - log s_ic)`` of two probability distributions.

    Both are clipped to ``[EPSILON, 1]`` first, as Keras's ``KLDivergence`` does.

    Args:
        student_probs: ``(B, C)`` (or ``(B, T, V)``) probabilities, rows summing to 1.
        teacher_probs: the target distribution, same shape.

    Returns:
        ``(B,)`` (or ``(B, T)``): the divergence of each sample; take ``.mean()`` for the loss.
    """
    t = teacher_probs.clamp(EPSILON, 1.0)
    s = student_probs.clamp(EPSILON, 1.0)
    return (t * (t.log() - s.log())).sum(dim=-1)


class KLDivergence(nn.Module):
    """Keras-style ``KLDivergence`` for ``Distiller.compile(distillation_loss_fn=...)``.

    It receives **probability distributions**, already softened by the Distiller, in
    PyTorch's ``(input, target)`` order: ``loss(student_probs, teacher_probs)``. Given
    raw logits it would not be a divergence; the Distiller never passes it logits.
    """

    def forward(self, student_probs: torch.Tensor, teacher_probs: torch.Tensor) -> torch.Tensor:
        return kl_divergence(student_probs, teacher_probs).mean()


#: Names accepted for ``distillation_loss_fn`` as a string.
_NAMED_DIVERGENCES: dict[str, Callable[[], nn.Module]] = {
    "kl": KLDivergence,
    "kld": KLDivergence,
    "kl_divergence": KLDivergence,
    "kullback_leibler_divergence": KLDivergence,
}


class SoftTargetLoss(DistillationLoss):
    """Applies a user's loss on softened distributions, the way the Keras example does.

    ``T^2 * fn(softmax(student_logits / T), softmax(teacher_logits / T))``.

    What ``fn`` receives is fixed: the **student's** softened probabilities first and the
    **teacher's** second (PyTorch's ``(input, target)`` order), rows summing to 1 over the
    last axis. It returns a scalar, or one value per sample (then averaged).

    Two spellings are recognised so they mean what a reader expects: kdistill's
    :class:`KLDivergence` (or the strings ``"kl"``, ``"kl_divergence"``) is computed from
    log-softmax for exactness (same value, no clipping), and ``torch.nn.KLDivLoss`` gets
    the log-probabilities it expects as its first argument.

    Args:
        fn: the loss, a callable or one of the names above.
        temperature: softening temperature ``T > 0``.
        temperature_squared: multiply by ``T^2`` (default; Hinton et al.).
    """

    def __init__(
        self,
        fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | str = "kl",
        temperature: float = 3.0,
        *,
        temperature_squared: bool = True,
    ):
        super().__init__()
        if isinstance(fn, str):
            key = fn.lower()
            if key not in _NAMED_DIVERGENCES:
                raise ValueError(
                    f"unknown distillation loss {fn!r}: expected one of "
                    f"{sorted(_NAMED_DIVERGENCES)}, a callable on probability distributions, "
                    "or a kdistill.losses.DistillationLoss module"
                )
            fn = _NAMED_DIVERGENCES[key]()
        if isinstance(fn, type):
            raise TypeError(
                f"distillation_loss_fn is the class {fn.__name__}, not an instance of it; "
                f"pass {fn.__name__}() (with its arguments)"
            )
        if not callable(fn):
            raise TypeError(f"distillation_loss_fn must be callable, got {type(fn).__name__}")
        self.fn = fn
        self.temperature = check_temperature(temperature)
        self.temperature_squared = bool(temperature_squared)

    @property
    def name(self) -> str:
        fn = self.fn
        return getattr(fn, "__name__", None) or type(fn).__name__

    def forward(self, student: Outputs, teacher: Outputs, batch: Batch | None = None) -> torch.Tensor:
        t = self.temperature
        if isinstance(self.fn, KLDivergence):
            return kd_loss(student.logits, teacher.logits, t, temperature_squared=self.temperature_squared)
        check_same_classes(student.logits, teacher.logits)
        # 1. soften both sides with the same temperature
        log_p_s = F.log_softmax(student.logits.to(_compute_dtype(student.logits)) / t, dim=-1)
        log_p_t = F.log_softmax(teacher.logits.to(_compute_dtype(teacher.logits)) / t, dim=-1)
        # 2. the user's loss on (student, teacher) distributions
        if isinstance(self.fn, nn.KLDivLoss):
            value = self.fn(log_p_s, log_p_t if self.fn.log_target else log_p_t.exp())
        else:
            value = self.fn(log_p_s.exp(), log_p_t.exp())
        if not isinstance(value, torch.Tensor):
            raise TypeError(
                f"distillation loss {self.name} returned {type(value).__name__}; it must return a "
                "torch.Tensor (a scalar, or one value per sample)"
            )
        if value.dim() > 0:
            # (B,) per sample, or (B, T) per token for sequences; anything else (e.g. an
            # unreduced (B, C)) would be averaged over the wrong axes without a word
            per_position = tuple(student.logits.shape[:-1])
            if tuple(value.shape) not in {per_position, per_position[:1]}:
                raise ValueError(
                    f"distillation loss {self.name} returned shape {tuple(value.shape)}; expected a "
                    f"scalar or one value per sample {per_position[:1]}"
                    + (f" or per position {per_position}" if len(per_position) > 1 else "")
                    + ". Reduce over the class axis (e.g. .sum(-1)) inside the loss"
                )
            value = value.mean()
        # 3. Hinton et al.'s T^2 keeps gradient scale independent of T
        return value * (t * t) if self.temperature_squared else value

    def extra_repr(self) -> str:
        return f"fn={self.name}, temperature={self.temperature}, temperature_squared={self.temperature_squared}"


def check_divergence(name: str, value: float, *, tolerance: float = 1e-4) -> None:
    """Raise if a divergence that cannot be negative came out negative beyond rounding.

    A negative "KL" is the signature of a loss given raw logits (or its arguments in the
    wrong order) instead of probability distributions: the student then learns nothing
    useful, silently. Stop instead.
    """
    if value < -tolerance:
        raise InvalidDivergenceError(
            f"distillation loss {name} returned {value:.6g}, but a divergence between "
            "probability distributions is never negative. It was probably given raw logits "
            "or log-probabilities, or (student, teacher) in the wrong order. kdistill passes "
            "distillation_loss_fn softened probabilities as fn(student_probs, teacher_probs); "
            "use kdistill.losses.KLDivergence() or KDLoss() for the standard loss."
        )
