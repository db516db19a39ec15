"""Losses on logits.

Each method is a pure function (what tests and your own training loops call) with a
:class:`~kdistill.losses.base.DistillationLoss` module beside it (what the Distiller calls).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InvalidDivergenceError
from ..outputs import UNLABELLED, Batch, Outputs
from .base import WIDE_DTYPES, DistillationLoss, check_weight, compute_dtype, in_compute_dtype

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


def check_same_classes(student_logits: torch.Tensor | Outputs, teacher_logits: torch.Tensor | Outputs) -> None:
    """Raise a ``ValueError`` naming both shapes if student and teacher logits differ
    (tensors, or :class:`~kdistill.outputs.Outputs`: only ``.shape`` is read)."""
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
        teacher_logits: the teacher's scores, same shape (detached: no gradient reaches it).
        temperature: softening temperature ``T > 0``.
        temperature_squared: multiply by ``T^2`` (Hinton et al.'s scaling).
        mask: optional boolean mask over the leading axes (``(B,)`` or ``(B, T)``);
            positions where it is false are left out of the mean.

    Returns:
        A scalar: the KL divergence averaged over samples (positions), times ``T^2``.

    Raises:
        ValueError: if the shapes differ or ``temperature`` is not positive.
    """
    # (a float in (0, inf) is valid as it is: checked without a call, as this runs every step)
    t = temperature if type(temperature) is float and 0.0 < temperature < math.inf else check_temperature(temperature)
    if student_logits.shape != teacher_logits.shape:
        check_same_classes(student_logits, teacher_logits)  # raises, naming both shapes
    # half precision is upcast to float32; float32 and float64 keep their precision; the
    # teacher's soft targets are a fixed target, as in every other logits loss
    if teacher_logits.requires_grad:
        teacher_logits = teacher_logits.detach()
    if student_logits.dtype not in WIDE_DTYPES or teacher_logits.dtype not in WIDE_DTYPES:
        student_logits, teacher_logits = in_compute_dtype(student_logits), in_compute_dtype(teacher_logits)
    log_p_s = (student_logits / t).log_softmax(-1)
    log_p_t = (teacher_logits / t).log_softmax(-1)
    if mask is None:
        # sum over positions and classes of exp(log_p_t) * (log_p_t - log_p_s) (exp(log_p_t) is the
        # teacher's soft target), / positions: kl_div's fused sum, two operations fewer per step
        # than a per-position sum and its mean. Same gradient, bit for bit (d/dz of sum/N is the
        # mean's); the value differs from the per-position mean by float rounding only
        positions = log_p_s.numel() // log_p_s.shape[-1]  # B, or B * T
        loss = F.kl_div(log_p_s, log_p_t, reduction="sum", log_target=True) / positions
    else:
        # (B, C) -> (B,): KL per sample (position), then the mean over the kept ones
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
            mask=None if batch is None else batch.token_mask,  # tokens: the trained-on positions only
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
        mask = None if batch is None else batch.token_mask  # tokens: the trained-on positions only
        if isinstance(self.fn, KLDivergence):
            return kd_loss(student.logits, teacher.logits, t, temperature_squared=self.temperature_squared, mask=mask)
        check_same_classes(student.logits, teacher.logits)
        # 1. soften both sides with the same temperature
        log_p_s = F.log_softmax(student.logits.to(compute_dtype(student.logits)) / t, dim=-1)
        log_p_t = F.log_softmax(teacher.logits.to(compute_dtype(teacher.logits)) / t, dim=-1)
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
            # per token: the mean over the trained-on positions (a scalar is taken as it is)
            value = masked_mean(value, mask) if mask is not None and tuple(value.shape) == tuple(mask.shape) \
                else value.mean()
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


# --------------------------------------------------------------------------- the logit zoo
# DKD, DIST, logit standardisation, reverse KL and Jensen-Shannon: each a pure function with
# a DistillationLoss beside it. The teacher's logits are a fixed target in all of them: the
# functions detach them, so no gradient ever reaches the teacher.

#: Added to the product of norms in a Pearson correlation (DIST's reference code uses 1e-8).
PEARSON_EPS = 1e-8
#: Added to the standard deviation before dividing by it (the logit-standardisation code's 1e-7).
STD_EPS = 1e-7


def _logit_pair(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both sides in one compute dtype (half precision upcast), the teacher's detached."""
    check_same_classes(student_logits, teacher_logits)
    dtype = torch.promote_types(compute_dtype(student_logits), compute_dtype(teacher_logits))
    return student_logits.to(dtype), teacher_logits.detach().to(dtype)


def _check_mask_shape(mask: torch.Tensor, positions: tuple[int, ...]) -> None:
    if tuple(mask.shape) != positions:
        raise ValueError(
            f"mask has shape {tuple(mask.shape)} but the logits have {positions} positions "
            "(their shape without the class axis); pass one boolean per sample (or per token)"
        )


# ----------------------------------------------------------------- DKD (Zhao et al., 2022)


def _dkd_targets(targets: torch.Tensor | None, teacher_logits: torch.Tensor) -> torch.Tensor:
    """The class each position is decoupled on: its label, or the teacher's top class where
    the label is ``-1`` (unlabelled) or there are no labels at all."""
    teacher_top = teacher_logits.argmax(dim=-1)  # (B,) or (B, T)
    if targets is None:
        return teacher_top
    if not isinstance(targets, torch.Tensor) or targets.is_floating_point() or targets.dtype == torch.bool:
        raise TypeError(
            f"targets must be an integer tensor of class indices (-1 = unlabelled), got "
            f"{targets.dtype if isinstance(targets, torch.Tensor) else type(targets).__name__}"
        )
    positions = tuple(teacher_logits.shape[:-1])
    if tuple(targets.shape) != positions:
        raise ValueError(
            f"targets has shape {tuple(targets.shape)} but the logits {tuple(teacher_logits.shape)} "
            f"need one label per position, shape {positions}"
        )
    num_classes = teacher_logits.shape[-1]
    targets = targets.to(teacher_top.device)
    if bool(((targets < UNLABELLED) | (targets >= num_classes)).any()):
        raise ValueError(
            f"targets must be class indices in [0, {num_classes}) or -1 for unlabelled samples; "
            f"got values from {int(targets.min())} to {int(targets.max())}"
        )
    return torch.where(targets == UNLABELLED, teacher_top, targets.long())


def dkd_terms(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    targets: torch.Tensor | None = None,
    temperature: float = 4.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The two parts of DKD at each position, unweighted: ``(T^2 * TCKD, T^2 * NCKD)``.

    See :func:`dkd_loss` for the formula.

    Args:
        student_logits: ``(B, C)`` or ``(B, T, V)`` raw scores of the student.
        teacher_logits: the teacher's scores, same shape (detached here).
        targets: ``(B,)`` (or ``(B, T)``) integer labels, ``-1`` where unlabelled; ``None``
            uses the teacher's top class everywhere.
        temperature: softening temperature ``T > 0``.

    Returns:
        Two tensors of shape ``(B,)`` (or ``(B, T)``): TCKD and NCKD per position, times ``T^2``.

    Raises:
        ValueError: shapes differ, fewer than 2 classes, a label out of range, or ``T <= 0``.
        TypeError: if ``targets`` is not an integer tensor.
    """
    t = check_temperature(temperature)
    s, te = _logit_pair(student_logits, teacher_logits)
    num_classes = s.shape[-1]
    if num_classes < 2:
        raise ValueError(f"DKD needs at least 2 classes (a target and a non-target one), got {num_classes}")
    target = _dkd_targets(targets, te)  # (B,) or (B, T)
    gt = F.one_hot(target, num_classes).bool()  # (..., C): true at the target class

    def decouple(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # Exact log-probabilities from logsumexp (no log of a probability that may round to 0/1):
        # log p_gt = z_gt - lse(z);  log(1 - p_gt) = lse_{c != gt}(z) - lse(z);
        # log p_hat_c = z_c - lse_{c != gt}(z), the distribution among the non-target classes.
        lse_all = torch.logsumexp(z, dim=-1)  # (...,)
        lse_rest = torch.logsumexp(z.masked_fill(gt, float("-inf")), dim=-1)  # (...,)
        log_gt = z.gather(-1, target.unsqueeze(-1)).squeeze(-1) - lse_all
        return log_gt, lse_rest - lse_all, z - lse_rest.unsqueeze(-1)

    log_gt_s, log_rest_s, log_hat_s = decouple(s / t)
    log_gt_t, log_rest_t, log_hat_t = decouple(te / t)
    # 1. TCKD: KL between the binary distributions b = [p_gt, 1 - p_gt]
    tckd = log_gt_t.exp() * (log_gt_t - log_gt_s) + log_rest_t.exp() * (log_rest_t - log_rest_s)
    # 2. NCKD: KL between the distributions among the non-target classes (target left out)
    nckd = (log_hat_t.exp() * (log_hat_t - log_hat_s)).masked_fill(gt, 0.0).sum(dim=-1)
    return tckd * (t * t), nckd * (t * t)


def dkd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    targets: torch.Tensor | None = None,
    alpha: float = 1.0,
    beta: float = 8.0,
    temperature: float = 4.0,
    *,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Decoupled knowledge distillation of Zhao, Cui, Song, Qiu & Liang (2022), "Decoupled
    Knowledge Distillation", CVPR 2022, arXiv:2203.08679 (Eq. 7).

    ``L = T^2 * mean_i (alpha * TCKD_i + beta * NCKD_i)``, with ``p = softmax(z / T)`` and
    ``g`` the target class of sample ``i``:

    * ``TCKD = KL(b_t || b_s)``, ``b = [p_g, 1 - p_g]`` (target vs. all other classes);
    * ``NCKD = KL(p_hat_t || p_hat_s)``, ``p_hat_c = p_c / (1 - p_g)`` for ``c != g``
      (the distribution among the non-target classes).

    Classical KD is ``TCKD + (1 - p_g^t) * NCKD``; DKD frees NCKD from the teacher's
    confidence by weighting it with ``beta`` instead. Computed from ``logsumexp`` in log
    space, so it stays exact (and finite) when a probability rounds to 0 or 1; mdistiller
    approximates NCKD by subtracting 1000 from the target logit, which agrees to rounding.

    **Unlabelled samples** (target ``-1``, or ``targets=None``) are decoupled on the
    teacher's top class (its argmax) instead of a label. The warm-up of the paper (the loss
    ramped up over the first epochs) lives in :class:`DKDLoss`, not here.

    Args:
        student_logits: ``(B, C)`` or ``(B, T, V)`` raw scores of the student.
        teacher_logits: the teacher's scores, same shape (detached: no gradient reaches it).
        targets: ``(B,)`` (or ``(B, T)``) integer labels, ``-1`` where unlabelled; ``None``
            when there are no labels (the teacher's argmax everywhere).
        alpha: weight of TCKD, ``>= 0`` (1.0 in mdistiller's CIFAR-100 configs).
        beta: weight of NCKD, ``>= 0`` (8.0 in mdistiller's CIFAR-100 configs).
        temperature: softening temperature ``T > 0`` (4.0).
        mask: optional boolean mask over the leading axes; positions where it is false are
            left out of the mean.

    Returns:
        A scalar.

    Raises:
        ValueError: shapes differ, fewer than 2 classes, a label outside ``[0, C)`` other
            than ``-1``, a negative weight, ``T <= 0``, or a mask of the wrong shape.
        TypeError: if ``targets`` is not an integer tensor.
    """
    a = check_weight("alpha", alpha, "it weights DKD's target-class term (TCKD)")
    b = check_weight("beta", beta, "it weights DKD's non-target-class term (NCKD)")
    tckd, nckd = dkd_terms(student_logits, teacher_logits, targets, temperature)
    return masked_mean(a * tckd + b * nckd, mask)


def _check_warmup(warmup: int) -> int:
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ValueError(
            f"warmup must be a whole number of epochs >= 0, got {warmup!r} "
            "(0 turns the warm-up off; mdistiller uses 20)"
        )
    return warmup


class DKDLoss(DistillationLoss):
    """Decoupled knowledge distillation (Zhao et al., CVPR 2022) with its linear warm-up;
    see :func:`dkd_loss`.

    ``loss = min((epoch + 1) / warmup, 1) * dkd_loss(...)``: the loss ramps up linearly over
    the first ``warmup`` epochs (``epoch`` is the 0-based epoch the Distiller reports
    through :meth:`set_progress`; mdistiller counts epochs from 1 and uses
    ``min(epoch / warmup, 1)``, the same schedule). ``warmup=0`` turns the ramp off.

    Labels come from ``batch.targets``; unlabelled samples (``-1``) and batches without
    labels are decoupled on the teacher's argmax.

    Defaults are mdistiller's CIFAR-100 configuration (``mdistiller/engine/cfg.py``:
    ``DKD.ALPHA 1.0, BETA 8.0, T 4.0, WARMUP 20``, as in ``configs/cifar100/dkd/res32x4_res8x4.yaml``;
    some of its per-pair configs lower ``BETA``, e.g. ``res56_res20.yaml`` 2.0 and
    ``wrn40_2_wrn_16_2.yaml`` 6.0). mdistiller trains on
    ``CE_WEIGHT * CE + loss`` with ``CE_WEIGHT 1.0``: compile the Distiller with
    ``label_loss_weight=1.0`` to do the same.

    Args:
        alpha: weight of TCKD, ``>= 0``. Not the Distiller's ``alpha`` (the hard-label weight).
        beta: weight of NCKD, ``>= 0``.
        temperature: softening temperature ``T > 0``.
        warmup: epochs of the linear warm-up, ``>= 0``.
    """

    def __init__(self, alpha: float = 1.0, beta: float = 8.0, temperature: float = 4.0, *, warmup: int = 20):
        super().__init__()
        self.alpha = check_weight("alpha", alpha, "it weights DKD's target-class term (TCKD)")
        self.beta = check_weight("beta", beta, "it weights DKD's non-target-class term (NCKD)")
        self.temperature = check_temperature(temperature)
        self.warmup = _check_warmup(warmup)

    @property
    def warmup_factor(self) -> float:
        """``min((epoch + 1) / warmup, 1)`` at the current epoch (1 without a warm-up)."""
        return 1.0 if self.warmup == 0 else min((self.epoch + 1) / self.warmup, 1.0)

    def named_terms(self, student: Outputs, teacher: Outputs, batch: Batch | None = None) -> dict[str, torch.Tensor]:
        """``{"DKDLoss/tckd": ..., "DKDLoss/nckd": ...}``, each weighted and warmed up."""
        targets = None if batch is None else batch.targets
        tckd, nckd = dkd_terms(student.logits, teacher.logits, targets, self.temperature)
        w = self.warmup_factor
        return {f"{self.name}/tckd": w * self.alpha * tckd.mean(), f"{self.name}/nckd": w * self.beta * nckd.mean()}

    def forward(self, student: Outputs, teacher: Outputs, batch: Batch | None = None) -> torch.Tensor:
        targets = None if batch is None else batch.targets
        return self.warmup_factor * dkd_loss(
            student.logits, teacher.logits, targets, self.alpha, self.beta, self.temperature
        )

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, beta={self.beta}, temperature={self.temperature}, warmup={self.warmup}"


# ---------------------------------------------------------------- DIST (Huang et al., 2022)


def _pearson_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pearson correlation of each row of ``a`` with the same row of ``b``: ``(N, K) -> (N,)``."""
    a = a - a.mean(dim=-1, keepdim=True)
    b = b - b.mean(dim=-1, keepdim=True)
    return (a * b).sum(dim=-1) / (a.norm(dim=-1) * b.norm(dim=-1) + PEARSON_EPS)


def dist_terms(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 4.0,
    *,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DIST's two relations, unweighted: ``(T^2 * inter-class, T^2 * intra-class)``.

    See :func:`dist_loss` for the formula.

    Args:
        student_logits: ``(B, C)`` or ``(B, T, V)`` raw scores of the student.
        teacher_logits: the teacher's scores, same shape (detached here).
        temperature: the softmax temperature ``tau > 0``.
        mask: optional boolean mask over the leading axes.

    Returns:
        Two scalars (both 0 when the mask leaves nothing).

    Raises:
        ValueError: shapes differ, ``tau <= 0``, or a mask of the wrong shape.
    """
    t = check_temperature(temperature)
    s, te = _logit_pair(student_logits, teacher_logits)
    num_classes = s.shape[-1]
    # (B, C) or (B, T, V) -> (N, C): every sample (token) is one instance
    y_s = F.softmax(s / t, dim=-1).reshape(-1, num_classes)
    y_t = F.softmax(te / t, dim=-1).reshape(-1, num_classes)
    if mask is not None:
        _check_mask_shape(mask, tuple(s.shape[:-1]))
        keep = mask.to(device=y_s.device, dtype=torch.bool).reshape(-1)
        y_s, y_t = y_s[keep], y_t[keep]
        if y_s.shape[0] == 0:  # nothing left: no loss, but keep the graph
            zero = s.sum() * 0.0
            return zero, zero
    # 1. inter-class relation: per instance, correlation across the classes
    inter = 1.0 - _pearson_rows(y_s, y_t).mean()
    # 2. intra-class relation: per class, correlation across the instances of the batch
    intra = 1.0 - _pearson_rows(y_s.T, y_t.T).mean()
    return inter * (t * t), intra * (t * t)


def dist_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    beta: float = 2.0,
    gamma: float = 2.0,
    temperature: float = 4.0,
    *,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """DIST of Huang, You, Wang, Qian & Xu (2022), "Knowledge Distillation from A Stronger
    Teacher", NeurIPS 2022, arXiv:2205.10536.

    With ``Y = softmax(Z / tau)`` the ``(B, C)`` matrices of probabilities and
    ``d_p(u, v) = 1 - pearson(u, v)``:

    ``L = tau^2 * (beta * mean_i d_p(Y_s[i, :], Y_t[i, :]) + gamma * mean_j d_p(Y_s[:, j], Y_t[:, j]))``

    The first term (inter-class relation) matches, for each sample, how the classes rank
    against each other; the second (intra-class relation) matches, for each class, how the
    samples of the batch rank against each other. ``tau^2`` scales both, as in the authors'
    code. Pearson correlation is ``cos(u - mean(u), v - mean(v))`` with ``1e-8`` added to the
    product of norms (:data:`PEARSON_EPS`), as in the reference implementation. Each
    ``d_p`` is in ``[0, 2]``, so the loss is never negative.

    For ``(B, T, V)`` logits every token is an instance (the intra-class relation runs over
    all unmasked tokens of the batch). With a single instance the intra-class relation has
    nothing to correlate and is ``1`` (no gradient).

    Args:
        student_logits: ``(B, C)`` or ``(B, T, V)`` raw scores of the student.
        teacher_logits: the teacher's scores, same shape (detached: no gradient reaches it).
        beta: weight of the inter-class relation, ``>= 0``.
        gamma: weight of the intra-class relation, ``>= 0``.
        temperature: the softmax temperature ``tau > 0``.
        mask: optional boolean mask over the leading axes; masked-out instances take no
            part in either relation.

    Returns:
        A scalar.

    Raises:
        ValueError: shapes differ, a negative weight, ``tau <= 0``, or a mask of the wrong shape.
    """
    b = check_weight("beta", beta, "it weights DIST's inter-class relation")
    g = check_weight("gamma", gamma, "it weights DIST's intra-class relation")
    inter, intra = dist_terms(student_logits, teacher_logits, temperature, mask=mask)
    return b * inter + g * intra


class DISTLoss(DistillationLoss):
    """DIST (Huang et al., NeurIPS 2022): relations, not values; see :func:`dist_loss`.

    Defaults are the CIFAR-100 setting ``beta = gamma = 2``, ``tau = 4`` (the authors'
    classification code, ``hunto/image_classification_sota`` ``lib/models/losses/dist_kd.py``,
    builds ``DIST(beta=1, gamma=1, tau)`` with the temperature taken from the method name and
    the overall weight from the config; ImageNet uses ``beta = gamma = 1``, ``tau = 1``).

    Args:
        beta: weight of the inter-class relation, ``>= 0``.
        gamma: weight of the intra-class relation, ``>= 0``.
        temperature: the softmax temperature ``tau > 0``.
    """

    def __init__(self, beta: float = 2.0, gamma: float = 2.0, temperature: float = 4.0):
        super().__init__()
        self.beta = check_weight("beta", beta, "it weights DIST's inter-class relation")
        self.gamma = check_weight("gamma", gamma, "it weights DIST's intra-class relation")
        self.temperature = check_temperature(temperature)

    def named_terms(self, student: Outputs, teacher: Outputs, batch: Batch | None = None) -> dict[str, torch.Tensor]:
        """``{"DISTLoss/inter": ..., "DISTLoss/intra": ...}``, each weighted."""
        inter, intra = dist_terms(student.logits, teacher.logits, self.temperature)
        return {f"{self.name}/inter": self.beta * inter, f"{self.name}/intra": self.gamma * intra}

    def forward(self, student: Outputs, teacher: Outputs, batch: Batch | None = None) -> torch.Tensor:
        return dist_loss(student.logits, teacher.logits, self.beta, self.gamma, self.temperature)

    def extra_repr(self) -> str:
        return f"beta={self.beta}, gamma={self.gamma}, temperature={self.temperature}"


# ------------------------------------------------- logit standardisation (Sun et al., 2024)


def standardize_logits(logits: torch.Tensor) -> torch.Tensor:
    """Z-score of each sample's logits over the class axis: ``(z - mean(z)) / (std(z) + 1e-7)``.

    ``std`` is Bessel-corrected (``torch.std``'s default), as in the authors' code; the
    paper's ``sigma`` (divisor ``C``) differs from it by the constant ``sqrt(C / (C - 1))``.

    Args:
        logits: ``(B, C)`` or ``(B, T, V)`` raw scores, ``C >= 2``.

    Returns:
        A tensor of the same shape, each row with mean 0 and standard deviation ~1.

    Raises:
        ValueError: with fewer than 2 classes (no spread to standardise).
    """
    if logits.shape[-1] < 2:
        raise ValueError(f"standardising logits needs at least 2 classes, got {logits.shape[-1]}")
    mean = logits.mean(dim=-1, keepdim=True)
    std = logits.std(dim=-1, keepdim=True)
    return (logits - mean) / (std + STD_EPS)


def ls_kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 2.0,
    *,
    temperature_squared: bool = True,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """KD on standardised logits, Sun, Ren, Li, Wang & Cao (2024), "Logit Standardization
    in Knowledge Distillation", CVPR 2024, arXiv:2403.01427 (Algorithm 1).

    ``L = T^2 * mean_i KL(softmax(Z(z_t) / T) || softmax(Z(z_s) / T))`` with
    ``Z(z) = (z - mean(z)) / std(z)`` over each sample's classes
    (:func:`standardize_logits`). Equivalently, each side gets its own temperature
    ``T * std(z)``, so the student matches the teacher's logit *relations* (their ranks and
    relative gaps) without having to match their range. ``T`` is the paper's "base
    temperature"; the ``T^2`` factor is applied as in the authors' code.

    Args:
        student_logits: ``(B, C)`` or ``(B, T, V)`` raw scores of the student, ``C >= 2``.
        teacher_logits: the teacher's scores, same shape (detached: no gradient reaches it).
        temperature: base temperature ``T > 0`` (2 in the authors' CIFAR-100 runs).
        temperature_squared: multiply by ``T^2``.
        mask: optional boolean mask over the leading axes (as :func:`kd_loss`).

    Returns:
        A scalar.

    Raises:
        ValueError: shapes differ, fewer than 2 classes, ``T <= 0``, or a mask of the wrong shape.
    """
    check_temperature(temperature)
    s, te = _logit_pair(student_logits, teacher_logits)
    return kd_loss(
        standardize_logits(s), standardize_logits(te), temperature, temperature_squared=temperature_squared, mask=mask
    )


class LogitStandardKDLoss(DistillationLoss):
    """KD with logit standardisation (Sun et al., CVPR 2024); see :func:`ls_kd_loss`.

    ``loss = weight * ls_kd_loss(student, teacher, T)``. Defaults are the authors'
    CIFAR-100 settings (``sunshangquan/logit-standardization-KD``, ``tools/train.py``:
    ``--base-temp 2 --kd-weight 9`` with cross-entropy weight 1): compile the Distiller with
    ``label_loss_weight=1.0`` to train on ``CE + 9 * loss`` as they did (with ``alpha``
    instead, ``alpha * CE + (1 - alpha) * weight * loss``, ``alpha=0.5`` keeps their 1 : 9).

    Args:
        temperature: base temperature ``T > 0``.
        weight: multiplies the loss, ``>= 0``.
        temperature_squared: multiply by ``T^2``.
    """

    def __init__(self, temperature: float = 2.0, weight: float = 9.0, *, temperature_squared: bool = True):
        super().__init__()
        self.temperature = check_temperature(temperature)
        self.weight = check_weight("weight", weight, "it weights the standardised KD loss")
        self.temperature_squared = bool(temperature_squared)

    def forward(self, student: Outputs, teacher: Outputs, batch: Batch | None = None) -> torch.Tensor:
        return self.weight * ls_kd_loss(
            student.logits, teacher.logits, self.temperature, temperature_squared=self.temperature_squared
        )

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, weight={self.weight}, temperature_squared={self.temperature_squared}"


# -------------------------------------------------------- reverse KL and Jensen-Shannon


def reverse_kl_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 4.0,
    *,
    temperature_squared: bool = True,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reverse KL: ``L = T^2 * mean_i KL(p_s(i) || p_t(i))``, ``p = softmax(z / T)``.

    The forward KL of Hinton et al. (:func:`kd_loss`) with the arguments swapped. It is
    mode-seeking: the student is penalised for mass where the teacher has little, but not
    for missing some of the teacher's modes (Minka 2005, "Divergence measures and message
    passing"; used for distilling generative models by Gu et al. 2024, "MiniLLM", ICLR 2024).
    ``T^2`` keeps the gradient's scale independent of ``T`` as in Hinton et al. (2015).

    Args:
        student_logits: ``(B, C)`` or ``(B, T, V)`` raw scores of the student.
        teacher_logits: the teacher's scores, same shape (detached: no gradient reaches it).
        temperature: softening temperature ``T > 0``.
        temperature_squared: multiply by ``T^2``.
        mask: optional boolean mask over the leading axes (as :func:`kd_loss`).

    Returns:
        A scalar.

    Raises:
        ValueError: shapes differ, ``T <= 0``, or a mask of the wrong shape.
    """
    t = check_temperature(temperature)
    s, te = _logit_pair(student_logits, teacher_logits)
    log_p_s = F.log_softmax(s / t, dim=-1)
    log_p_t = F.log_softmax(te / t, dim=-1)
    # (B, C) -> (B,): KL(student || teacher) per sample, weighted by the student's own probabilities
    per_sample = (log_p_s.exp() * (log_p_s - log_p_t)).sum(dim=-1)
    loss = masked_mean(per_sample, mask)
    return loss * (t * t) if temperature_squared else loss


class ReverseKLLoss(DistillationLoss):
    """Reverse KL between the softened distributions; see :func:`reverse_kl_loss`.

    Args:
        temperature: softening temperature ``T > 0`` (4, as :class:`KDLoss`; generative-model
            work such as MiniLLM uses 1).
        temperature_squared: multiply by ``T^2``.
    """

    def __init__(self, temperature: float = 4.0, *, temperature_squared: bool = True):
        super().__init__()
        self.temperature = check_temperature(temperature)
        self.temperature_squared = bool(temperature_squared)

    def forward(self, student: Outputs, teacher: Outputs, batch: Batch | None = None) -> torch.Tensor:
        return reverse_kl_loss(
            student.logits, teacher.logits, self.temperature, temperature_squared=self.temperature_squared
        )

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, temperature_squared={self.temperature_squared}"


def js_divergence_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 4.0,
    *,
    temperature_squared: bool = True,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Jensen-Shannon divergence between the softened distributions (Lin 1991, "Divergence
    measures based on the Shannon entropy", IEEE Trans. Inf. Theory 37(1)).

    ``L = T^2 * mean_i [ KL(p_s || m) / 2 + KL(p_t || m) / 2 ]``, ``m = (p_s + p_t) / 2``,
    ``p = softmax(z / T)``.

    Symmetric in student and teacher, and bounded: each sample's divergence is in
    ``[0, log 2]`` (natural log), so the loss is in ``[0, T^2 log 2]``. The ``T^2`` factor
    is Hinton et al.'s (2015) scaling, kept so a weight means the same at every ``T`` as for
    :func:`kd_loss` (for ``p_s`` near ``p_t`` JS is about a quarter of the KL, so it also
    has the same gradient-scale argument). ``m`` is computed in log space
    (``logaddexp(log p_s, log p_t) - log 2``), so it stays exact for tiny probabilities.

    Args:
        student_logits: ``(B, C)`` or ``(B, T, V)`` raw scores of the student.
        teacher_logits: the teacher's scores, same shape (detached: no gradient reaches it).
        temperature: softening temperature ``T > 0``.
        temperature_squared: multiply by ``T^2``.
        mask: optional boolean mask over the leading axes (as :func:`kd_loss`).

    Returns:
        A scalar.

    Raises:
        ValueError: shapes differ, ``T <= 0``, or a mask of the wrong shape.
    """
    t = check_temperature(temperature)
    s, te = _logit_pair(student_logits, teacher_logits)
    log_p_s = F.log_softmax(s / t, dim=-1)
    log_p_t = F.log_softmax(te / t, dim=-1)
    log_m = torch.logaddexp(log_p_s, log_p_t) - math.log(2.0)
    # (B, C) -> (B,): half of each side's KL to the mixture
    per_sample = 0.5 * (log_p_s.exp() * (log_p_s - log_m)).sum(dim=-1) + 0.5 * (
        log_p_t.exp() * (log_p_t - log_m)
    ).sum(dim=-1)
    loss = masked_mean(per_sample, mask)
    return loss * (t * t) if temperature_squared else loss


class JSDivergenceLoss(DistillationLoss):
    """Jensen-Shannon divergence between the softened distributions; see
    :func:`js_divergence_loss`.

    Args:
        temperature: softening temperature ``T > 0`` (4, as :class:`KDLoss`).
        temperature_squared: multiply by ``T^2``.
    """

    def __init__(self, temperature: float = 4.0, *, temperature_squared: bool = True):
        super().__init__()
        self.temperature = check_temperature(temperature)
        self.temperature_squared = bool(temperature_squared)

    def forward(self, student: Outputs, teacher: Outputs, batch: Batch | None = None) -> torch.Tensor:
        return js_divergence_loss(
            student.logits, teacher.logits, self.temperature, temperature_squared=self.temperature_squared
        )

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, temperature_squared={self.temperature_squared}"
