"""Losses on intermediate features: hints, attention, selectivity, information, factors.

Each method is a pure function on tensors (what tests and your own training loops call)
with a :class:`~kdistill.losses.base.DistillationLoss` module beside it (what the
Distiller calls). A module reads the student's and the teacher's tapped layers
(``taps = {"student": student_layer, "teacher": teacher_layer}``) and multiplies its
function by ``weight``, whose default is the weight CRD's benchmark used on CIFAR-100
(Tian et al., ICLR 2020, github.com/HobbitLong/RepDistiller, ``scripts/run_cifar_distill.sh``):

=============  ==================  =========  ==========================================
method         module              weight     other defaults
=============  ==================  =========  ==========================================
FitNets        :class:`HintLoss`     100      adapter from ``make_adapter``
AT             :class:`ATLoss`       1000     ``p=2``
NST            :class:`NSTLoss`      50       polynomial kernel, degree 2, ``c=0``
VID            :class:`VIDLoss`      1        ``init_pred_var=5.0``, ``eps=1e-5``
FT             :class:`FTLoss`       200      ``rate=0.5``, ``p=1``
=============  ==================  =========  ==========================================

``weight`` scales the module's value; a :class:`~kdistill.losses.WeightedSum` weight
multiplies on top of it (use 1 there to keep CRD's scale).

Parts whose shapes depend on the models (adapters, VID's regressor, FT's paraphraser and
translator) are built in :meth:`setup` from one batch's outputs, which the Distiller calls
before training and whose parameters it trains with the student. They are never built
lazily in ``forward``: parameters created there would miss the optimizer. A module that
needs them raises a ``RuntimeError`` saying to call ``setup`` first.

When student and teacher maps differ in spatial size, the larger one is reduced to the
smaller with adaptive average pooling (:func:`match_spatial`), as in CRD's code, except
for FitNets, whose adapter resizes the student map to the teacher's.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..adapters import make_adapter
from ..outputs import Batch, Outputs
from .base import DistillationLoss, check_same_batch, check_weight, compute_dtype

# --------------------------------------------------------------------------- checks


def _check_number(name: str, value: float, *, low: float = 0.0, inclusive: bool = False, hint: str = "") -> float:
    """Return ``value`` as a float, or raise a ``ValueError`` naming it and its range."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    ok = math.isfinite(v) and (v >= low if inclusive else v > low)
    if not ok:
        bound = f">= {low:g}" if inclusive else f"> {low:g}"
        raise ValueError(f"{name} must be a finite number {bound}, got {value!r}" + (f": {hint}" if hint else ""))
    return v


def _check_int(name: str, value: int, *, low: int, hint: str) -> int:
    """Return ``value`` if it is an integer ``>= low`` (``True`` is not one), else raise."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}: {hint}")
    return value


def _float(x: torch.Tensor) -> torch.Tensor:
    """``x`` in the dtype losses are computed in (half precision is upcast to float32)."""
    return x.to(compute_dtype(x))


def _check_maps(method: str, student: torch.Tensor, teacher: torch.Tensor) -> None:
    """Raise a ``ValueError`` unless both are ``(B, C, H, W)`` maps with the same ``B``."""
    for role, x in (("student", student), ("teacher", teacher)):
        if x.dim() != 4:
            raise ValueError(
                f"{method} compares feature maps of shape (B, C, H, W), but the {role}'s feature has shape "
                f"{tuple(x.shape)}: tap a convolutional layer (`kdistill layers MODEL` lists the shapes)"
            )
    check_same_batch(method, student, teacher)


def match_spatial(student: torch.Tensor, teacher: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Bring two ``(B, C, H, W)`` maps to the same ``(H, W)`` by pooling the larger one.

    Each side is reduced with ``adaptive_avg_pool2d`` to ``(min(Hs, Ht), min(Ws, Wt))``
    where it is larger (CRD's ``at_loss``/``nst_loss``/``VIDLoss`` do the same for square
    maps, comparing heights only); channel counts are left alone.

    Args:
        student: ``(B, Cs, Hs, Ws)``.
        teacher: ``(B, Ct, Ht, Wt)``.

    Returns:
        ``(B, Cs, H, W)`` and ``(B, Ct, H, W)``.
    """
    size = (min(student.shape[-2], teacher.shape[-2]), min(student.shape[-1], teacher.shape[-1]))
    if tuple(student.shape[-2:]) != size:
        student = F.adaptive_avg_pool2d(student, size)  # (B, Cs, Hs, Ws) -> (B, Cs, H, W)
    if tuple(teacher.shape[-2:]) != size:
        teacher = F.adaptive_avg_pool2d(teacher, size)  # (B, Ct, Ht, Wt) -> (B, Ct, H, W)
    return student, teacher


def _not_set_up(name: str, part: str) -> RuntimeError:
    return RuntimeError(
        f"{name} has no {part} yet: call loss.setup(student_outputs, teacher_outputs) with one batch's "
        "outputs (features included) before using it; the Distiller does this before training, so "
        "its parameters are trained with the student"
    )


def _param_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype of parts built for feature ``x``: float64 for float64, else float32."""
    return compute_dtype(x)


# --------------------------------------------------------------------------- FitNets


def hint_loss(student_feature: torch.Tensor, teacher_feature: torch.Tensor) -> torch.Tensor:
    """FitNets hint loss: Romero et al. (2015), "FitNets: Hints for Thin Deep Nets", ICLR,
    arXiv:1412.6550.

    ``L_HT = mean((r(v_s) - u_t)^2)``: the mean squared error between the student's guided
    layer after the regressor ``r`` (here: already applied, see :class:`HintLoss`) and the
    teacher's hint layer. The paper writes ``1/2 ||u_t - r(v_s)||^2``; this is the
    element-wise mean CRD's ``HintLoss`` (``nn.MSELoss``) uses, whose weight 100 is the default
    of :class:`HintLoss`.

    Args:
        student_feature: the adapted student feature, any shape, e.g. ``(B, C, H, W)``.
        teacher_feature: the teacher's feature, the same shape.

    Returns:
        A scalar.

    Raises:
        ValueError: if the shapes differ (map the student feature with an adapter first).
    """
    if student_feature.shape != teacher_feature.shape:
        raise ValueError(
            f"hint_loss compares tensors of the same shape, got the student's {tuple(student_feature.shape)} "
            f"and the teacher's {tuple(teacher_feature.shape)}: map the student feature first, e.g. with "
            "kdistill.adapters.make_adapter(student.shape, teacher.shape) (HintLoss does this in setup)"
        )
    dtype = torch.promote_types(compute_dtype(student_feature), compute_dtype(teacher_feature))
    return F.mse_loss(student_feature.to(dtype), teacher_feature.to(dtype))


class HintLoss(DistillationLoss):
    """FitNets (Romero et al., ICLR 2015) as a module: ``weight * hint_loss(adapter(s), t)``.

    :meth:`setup` builds the regressor with :func:`kdistill.adapters.make_adapter` from one
    batch's shapes (``nn.Identity`` when they already match; a 1x1 conv + BN, resizing to
    the teacher's spatial size, for maps); it is trained with the student.

    **Two stages.** The paper first trains the student up to its guided layer, with the
    regressor, on the hint term alone (stage 1), then the whole student with KD (stage 2).
    ``hint_epochs`` marks stage 1: :attr:`in_hint_stage` is true while ``self.epoch <
    hint_epochs`` (the Distiller sets ``epoch`` through ``set_progress``), and the
    Distiller then trains on this term alone (:attr:`exclusive`). The module itself always returns the hint
    term; with the default ``hint_epochs=0`` there is no stage 1 and the term is trained
    jointly with the others throughout, as in CRD's benchmark. A loop of your own::

        for epoch in range(epochs):
            hint.set_progress(epoch, step)
            loss = hint(s_out, t_out, batch)
            if not hint.in_hint_stage:
                loss = loss + task_and_kd_losses
            ...

    Args:
        student_layer: module path of the student's guided layer, e.g. ``"layer2"``.
        teacher_layer: module path of the teacher's hint layer.
        weight: scale of the loss (CRD's CIFAR-100 setting: 100).
        hint_epochs: epochs of stage 1, ``>= 0`` (0: single stage, the hint trained jointly).

    Raises:
        ValueError: ``weight < 0`` or ``hint_epochs`` not a non-negative integer.
    """

    nonnegative: ClassVar[bool] = True
    aliases: ClassVar[tuple[str, ...]] = ("fitnets", "fitnet")

    def __init__(self, student_layer: str, teacher_layer: str, *, weight: float = 100.0, hint_epochs: int = 0):
        super().__init__()
        self.taps = {"student": student_layer, "teacher": teacher_layer}
        self.weight = check_weight("weight", weight)
        self.hint_epochs = _check_int(
            "hint_epochs", hint_epochs, low=0,
            hint="the number of epochs the student trains on the hint alone (0 trains it jointly from the start)",
        )
        self.adapter: nn.Module | None = None
        self._shapes: tuple | None = None

    @property
    def in_hint_stage(self) -> bool:
        """True during FitNets' stage 1 (``epoch < hint_epochs``): train on this term only."""
        return self.epoch < self.hint_epochs

    @property
    def exclusive(self) -> bool:
        """The Distiller trains on the hint term alone during stage 1."""
        return self.in_hint_stage

    def setup(self, student: Outputs, teacher: Outputs) -> None:
        """Build the adapter from one batch's tapped features (kept if the shapes are unchanged).

        Raises:
            KeyError: a tapped layer is missing from the outputs.
            ValueError: no adapter exists between the two shapes.
        """
        s, t = self.features(student, teacher)
        shapes = (tuple(s.shape[1:]), tuple(t.shape[1:]))
        if self.adapter is not None and shapes == self._shapes:
            return  # already built (e.g. before a resume loads its weights)
        self.adapter = make_adapter(s.shape, t.shape).to(device=s.device, dtype=_param_dtype(s))
        self._shapes = shapes

    def forward(self, student: Outputs, teacher: Outputs, batch: Batch | None = None) -> torch.Tensor:
        s, t = self.features(student, teacher)
        if self.adapter is None:
            raise _not_set_up(self.name, "adapter")
        param = next(self.adapter.parameters(), None)  # none for nn.Identity
        dtype = _param_dtype(s) if param is None else param.dtype
        # (B, Cs, Hs, Ws) -> (B, Ct, Ht, Wt), or (B, Ds) -> (B, Dt)
        return self.weight * hint_loss(self.adapter(s.to(dtype)), t.to(dtype))

    def extra_repr(self) -> str:
        return f"taps={self.taps}, weight={self.weight}, hint_epochs={self.hint_epochs}"


# --------------------------------------------------------------------------- AT


def attention_map(feature: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """Spatial attention map of Zagoruyko & Komodakis (2017): ``vec(F(A)) / ||vec(F(A))||_2``
    with ``F(A) = mean_c |A_c|^p``.

    The paper sums over channels; the mean differs by the constant ``C``, which the L2
    normalisation removes.

    Args:
        feature: ``(B, C, H, W)`` activations.
        p: exponent ``p > 0`` (the paper's choice, and the default, is 2).

    Returns:
        ``(B, H*W)``: one L2-normalised map per sample.
    """
    # (B, C, H, W) -> (B, H, W) -> (B, H*W)
    a = feature.abs().pow(p).mean(dim=1).flatten(1)
    return F.normalize(a, p=2.0, dim=1)


def at_loss(student_feature: torch.Tensor, teacher_feature: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """Attention transfer: Zagoruyko & Komodakis (2017), "Paying More Attention to
    Attention: Improving the Performance of Convolutional Neural Networks via Attention
    Transfer", ICLR, arXiv:1612.03928.

    ``L_AT = mean_{b, j} (Q_s[b, j] - Q_t[b, j])^2`` with ``Q = vec(mean_c |A_c|^p) /
    ||vec(mean_c |A_c|^p)||_2`` (:func:`attention_map`). The paper writes
    ``beta/2 * ||Q_s - Q_t||_2`` and sets ``beta = 1000`` divided by the number of elements
    of the map and the batch size; this is the form CRD's ``Attention`` loss uses (squared
    difference averaged over batch and positions, weight 1000 in :class:`ATLoss`). Channel
    counts may differ; spatial sizes are matched by :func:`match_spatial`.

    Args:
        student_feature: ``(B, Cs, Hs, Ws)``.
        teacher_feature: ``(B, Ct, Ht, Wt)``.
        p: exponent of the attention map, ``p > 0``.

    Returns:
        A scalar.

    Raises:
        ValueError: non-4D features, different batch sizes, or ``p <= 0``.
    """
    p = _check_number("p", p, hint="the attention map's exponent (Zagoruyko & Komodakis use 2)")
    _check_maps("at_loss", student_feature, teacher_feature)
    s, t = match_spatial(_float(student_feature), _float(teacher_feature))
    return (attention_map(s, p) - attention_map(t, p)).pow(2).mean()


class ATLoss(DistillationLoss):
    """Attention transfer (Zagoruyko & Komodakis, ICLR 2017) as a module:
    ``weight * at_loss(s, t, p)``; see :func:`at_loss`. Nothing to build in
    :meth:`setup`, which only checks the taps.

    Args:
        student_layer: module path of the student's layer, e.g. ``"layer3"``.
        teacher_layer: module path of the teacher's layer.
        p: exponent of the attention map (2).
        weight: scale of the loss (CRD's CIFAR-100 setting: 1000).

    Raises:
        ValueError: ``p <= 0`` or ``weight < 0``.
    """

    nonnegative: ClassVar[bool] = True

    def __init__(self, student_layer: str, teacher_layer: str, *, p: float = 2.0, weight: float = 1000.0):
        super().__init__()
        self.taps = {"student": student_layer, "teacher": teacher_layer}
        self.p = _check_number("p", p, hint="the attention map's exponent (Zagoruyko & Komodakis use 2)")
        self.weight = check_weight("weight", weight)

    def setup(self, student: Outputs, teacher: Outputs) -> None:
        """Nothing to build; checks that both taps hold (B, C, H, W) maps of one batch.

        Raises:
            KeyError: a tapped layer is missing from the outputs.
            ValueError: the tapped features are not maps of the same batch.
        """
        _check_maps(self.name, *self.features(student, teacher))

    def forward(self, student: Outputs, teacher: Outputs, batch: Batch | None = None) -> torch.Tensor:
        s, t = self.features(student, teacher)
        return self.weight * at_loss(s, t, self.p)

    def extra_repr(self) -> str:
        return f"taps={self.taps}, p={self.p}, weight={self.weight}"


# --------------------------------------------------------------------------- NST


def nst_loss(
    student_feature: torch.Tensor,
    teacher_feature: torch.Tensor,
    *,
    degree: int = 2,
    c: float = 0.0,
) -> torch.Tensor:
    """Neuron selectivity transfer: Huang & Wang (2017), "Like What You Like: Knowledge
    Distill via Neuron Selectivity Transfer", arXiv:1707.01219.

    Each channel's map, flattened and L2-normalised, is a sample of the layer's
    distribution of neuron selectivity patterns; the loss is their squared maximum mean
    discrepancy with the polynomial kernel ``k(x, y) = (x^T y + c)^d``::

        MMD^2 = 1/Ct^2 sum_{i,i'} k(t_i, t_i') + 1/Cs^2 sum_{j,j'} k(s_j, s_j')
                - 2/(Cs Ct) sum_{i,j} k(s_j, t_i)

    averaged over the batch. The paper's choice (and CRD's) is ``d = 2, c = 0``. Channel
    counts may differ; spatial sizes are matched by :func:`match_spatial`. With a
    positive-definite kernel (``c >= 0``) the value is a squared distance, so never negative.

    Args:
        student_feature: ``(B, Cs, Hs, Ws)``.
        teacher_feature: ``(B, Ct, Ht, Wt)``.
        degree: ``d``, a positive integer.
        c: the kernel's offset, ``>= 0``.

    Returns:
        A scalar.

    Raises:
        ValueError: non-4D features, different batch sizes, ``degree < 1`` or ``c < 0``.
    """
    _check_int("degree", degree, low=1, hint="the polynomial kernel's degree (Huang & Wang use 2)")
    c = _check_number("c", c, inclusive=True, hint="the polynomial kernel's offset (Huang & Wang use 0)")
    _check_maps("nst_loss", student_feature, teacher_feature)
    s, t = match_spatial(_float(student_feature), _float(teacher_feature))
    # (B, C, H, W) -> (B, C, H*W), each channel's map L2-normalised
    s = F.normalize(s.flatten(2), p=2.0, dim=2)
    t = F.normalize(t.flatten(2), p=2.0, dim=2)

    def kernel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        # (B, Ca, N) x (B, Cb, N) -> (B, Ca, Cb)
        return (a @ b.transpose(1, 2) + c).pow(degree)

    # the mean over (B, Ca, Cb) is the batch mean of 1/(Ca Cb) sum_{a,b} k
    return kernel(t, t).mean() + kernel(s, s).mean() - 2 * kernel(s, t).mean()


class NSTLoss(DistillationLoss):
    """Neuron selectivity transfer (Huang & Wang, 2017) as a module:
    ``weight * nst_loss(s, t)``; see :func:`nst_loss`. Nothing to build in
    :meth:`setup`, which only checks the taps.

    Args:
        student_layer: module path of the student's layer.
        teacher_layer: module path of the teacher's layer.
        degree: degree of the polynomial kernel (2).
        c: offset of the polynomial kernel (0).
        weight: scale of the loss (CRD's CIFAR-100 setting: 50).

    Raises:
        ValueError: ``degree < 1``, ``c < 0`` or ``weight < 0``.
    """

    nonnegative: ClassVar[bool] = True

    def __init__(self, student_layer: str, teacher_layer: str, *, degree: int = 2, c: float = 0.0, weight: float = 50.0):
        super().__init__()
        self.taps = {"student": student_layer, "teacher": teacher_layer}
        self.degree = _check_int("degree", degree, low=1, hint="the polynomial kernel's degree (Huang & Wang use 2)")
        self.c = _check_number("c", c, inclusive=True, hint="the polynomial kernel's offset (Huang & Wang use 0)")
        self.weight = check_weight("weight", weight)

    def setup(self, student: Outputs, teacher: Outputs) -> None:
        """Nothing to build; checks that both taps hold (B, C, H, W) maps of one batch.

        Raises:
            KeyError: a tapped layer is missing from the outputs.
            ValueError: the tapped features are not maps of the same batch.
        """
        _check_maps(self.name, *self.features(student, teacher))

    def forward(self, student: Outputs, teacher: Outputs, batch: Batch | None = None) -> torch.Tensor:
        s, t = self.features(student, teacher)
        return self.weight * nst_loss(s, t, degree=self.degree, c=self.c)

    def extra_repr(self) -> str:
        return f"taps={self.taps}, degree={self.degree}, c={self.c}, weight={self.weight}"


# --------------------------------------------------------------------------- VID


def vid_variance(alpha: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """VID's per-channel variance ``sigma_c^2 = log(1 + exp(alpha_c)) + eps`` (softplus, so
    always ``> eps``).

    Args:
        alpha: ``(C,)`` unconstrained parameters.
        eps: floor of the variance, ``> 0``.

    Returns:
        ``(C,)`` variances.
    """
    return F.softplus(alpha) + eps


def vid_loss(pred_mean: torch.Tensor, teacher_feature: torch.Tensor, variance: torch.Tensor) -> torch.Tensor:
    """Variational information distillation: Ahn et al. (2019), "Variational Information
    Distillation for Knowledge Transfer", CVPR, arXiv:1904.05835.

    The student maximises a variational lower bound on its mutual information with the
    teacher by fitting a Gaussian ``q(t | s) = N(t; mu(s), sigma_c^2)`` with a learnt mean
    ``mu`` (a regressor on the student's feature) and a learnt per-channel variance. The
    loss is its negative log-likelihood (the constant ``log(2 pi) / 2`` dropped), averaged
    over all elements as in the authors' and CRD's code::

        L = mean_{b,c,h,w} [ (t_bchw - mu_bchw)^2 / (2 sigma_c^2) + log(sigma_c^2) / 2 ]

    It is not a divergence: it is negative wherever ``sigma_c^2 < 1`` fits well.

    Args:
        pred_mean: ``(B, C, H, W)`` the regressor's prediction ``mu(s)``.
        teacher_feature: ``(B, C, H, W)`` the teacher's feature ``t``.
        variance: ``(C,)`` positive variances ``sigma_c^2`` (:func:`vid_variance`).

    Returns:
        A scalar.

    Raises:
        ValueError: shapes that do not fit together, or a variance that is not positive.
    """
    if pred_mean.shape != teacher_feature.shape or pred_mean.dim() < 2:
        raise ValueError(
            f"vid_loss needs the predicted mean and the teacher's feature in the same (B, C, ...) shape, got "
            f"{tuple(pred_mean.shape)} and {tuple(teacher_feature.shape)}: map the student's feature with "
            "VIDLoss's regressor (built in setup) first"
        )
    if variance.dim() != 1 or variance.shape[0] != pred_mean.shape[1]:
        raise ValueError(
            f"variance must hold one value per channel, shape ({pred_mean.shape[1]},), got {tuple(variance.shape)}"
        )
    if not bool((variance > 0).all()):  # one device sync; VIDLoss's softplus + eps needs no check
        raise ValueError(
            f"variance must be positive, got a minimum of {variance.min().item():.3g}: build it with "
            "vid_variance(alpha, eps)"
        )
    return _vid_nll(pred_mean, teacher_feature, variance)


def _vid_nll(pred_mean: torch.Tensor, teacher_feature: torch.Tensor, variance: torch.Tensor) -> torch.Tensor:
    """:func:`vid_loss` without its checks."""
    dtype = torch.promote_types(compute_dtype(pred_mean), compute_dtype(variance))
    mu, t, var = pred_mean.to(dtype), teacher_feature.to(dtype), variance.to(dtype)
    # (C,) -> (1, C, 1, ...): one variance per channel, broadcast over batch and positions
    var = var.view(1, -1, *([1] * (mu.dim() - 2)))
    neg_log_prob = 0.5 * ((t - mu).pow(2) / var + var.log())
    return neg_log_prob.mean()


class VIDLoss(DistillationLoss):
    """Variational information distillation (Ahn et al., CVPR 2019) as a module:
    ``weight * vid_loss(regressor(s), t, softplus(alpha) + eps)``; see :func:`vid_loss`.

    :meth:`setup` builds, from one batch's shapes, the regressor (three 1x1 convolutions
    without bias, ``Cs -> mid -> mid -> Ct`` with ReLUs between, as in the authors' code)
    and ``alpha``, one parameter per teacher channel initialised so that every variance
    starts at ``init_pred_var``. Both are trained with the student. Spatial sizes are
    matched by :func:`match_spatial` before the regressor.

    Args:
        student_layer: module path of the student's layer.
        teacher_layer: module path of the teacher's layer.
        weight: scale of the loss (CRD's CIFAR-100 setting: 1).
        init_pred_var: initial variance, ``> eps`` (5.0, the authors' value).
        eps: floor of the variance, ``> 0`` (1e-5).
        mid_channels: width of the regressor's hidden layers (default: the teacher's
            channel count, as in CRD's runs).

    Raises:
        ValueError: a hyper-parameter out of range.
    """

    nonnegative: ClassVar[bool] = False  # a negative log-likelihood: log(sigma^2) < 0 is fine

    def __init__(
        self,
        student_layer: str,
        teacher_layer: str,
        *,
        weight: float = 1.0,
        init_pred_var: float = 5.0,
        eps: float = 1e-5,
        mid_channels: int | None = None,
    ):
        super().__init__()
        self.taps = {"student": student_layer, "teacher": teacher_layer}
        self.weight = check_weight("weight", weight)
        self.eps = _check_number("eps", eps, hint="the variance's floor (the authors use 1e-5)")
        self.init_pred_var = _check_number(
            "init_pred_var", init_pred_var, low=self.eps,
            hint=f"the initial variance must exceed eps={self.eps:g} (the authors use 5.0)",
        )
        if mid_channels is not None:
            _check_int("mid_channels", mid_channels, low=1, hint="the regressor's width, or None for the teacher's channels")
        self.mid_channels = mid_channels
        self.regressor: nn.Module | None = None
        self.alpha: nn.Parameter | None = None
        self._shapes: tuple | None = None

    def setup(self, student: Outputs, teacher: Outputs) -> None:
        """Build the regressor and the variances (kept if the channel counts are unchanged).

        Raises:
            KeyError: a tapped layer is missing from the outputs.
            ValueError: the tapped features are not ``(B, C, H, W)`` maps.
        """
        s, t = self.features(student, teacher)
        _check_maps(self.name, s, t)
        cs, ct = int(s.shape[1]), int(t.shape[1])
        if self.regressor is not None and self._shapes == (cs, ct):
            return
        mid = self.mid_channels or ct
        self.regressor = nn.Sequential(
            nn.Conv2d(cs, mid, kernel_size=1, bias=False),
            nn.ReLU(),
            nn.Conv2d(mid, mid, kernel_size=1, bias=False),
            nn.ReLU(),
            nn.Conv2d(mid, ct, kernel_size=1, bias=False),
        ).to(device=s.device, dtype=_param_dtype(s))
        # softplus(alpha) + eps = init_pred_var  <=>  alpha = log(exp(init_pred_var - eps) - 1)
        v = self.init_pred_var - self.eps
        start = v + math.log(-math.expm1(-v))  # = log(exp(v) - 1), without overflow for large v
        self.alpha = nn.Parameter(torch.full((ct,), start, device=s.device, dtype=_param_dtype(s)))
        self._shapes = (cs, ct)

    def variance(self) -> torch.Tensor:
        """``(Ct,)`` the current variances ``softplus(alpha) + eps``."""
        if self.alpha is None:
            raise _not_set_up(self.name, "variance parameters")
        return vid_variance(self.alpha, self.eps)

    def forward(self, student: Outputs, teacher: Outputs, batch: Batch | None = None) -> torch.Tensor:
        s, t = self.features(student, teacher)
        if self.regressor is None:
            raise _not_set_up(self.name, "regressor")
        _check_maps(self.name, s, t)
        dtype = self.alpha.dtype
        s, t = match_spatial(s.to(dtype), t.to(dtype))
        mu = self.regressor(s)  # (B, Cs, H, W) -> (B, Ct, H, W)
        if mu.shape != t.shape:
            raise ValueError(
                f"{self.name}: the regressor maps the student's feature to {tuple(mu.shape)} but the teacher's is "
                f"{tuple(t.shape)}; the taps changed shape since setup: call setup again"
            )
        return self.weight * _vid_nll(mu, t, self.variance())  # softplus + eps > 0: no check needed

    def extra_repr(self) -> str:
        return (
            f"taps={self.taps}, weight={self.weight}, init_pred_var={self.init_pred_var}, eps={self.eps}, "
            f"mid_channels={self.mid_channels}"
        )


# --------------------------------------------------------------------------- FT


def ft_loss(student_factor: torch.Tensor, teacher_factor: torch.Tensor, p: float = 1.0) -> torch.Tensor:
    """Factor transfer: Kim, Park & Kwak (2018), "Paraphrasing Complex Network: Network
    Compression via Factor Transfer", NeurIPS, arXiv:1802.04977.

    ``L_FT = || F_t / ||F_t||_2 - F_s / ||F_s||_2 ||_p`` with ``F`` a sample's factor
    flattened to a vector (the teacher's from the paraphraser, the student's from the
    translator), ``p = 1`` in the paper. As in the authors' code (``nn.L1Loss`` on the
    normalised factors), it is averaged over the batch and the vector's ``D`` elements:
    ``mean_b (1/D) sum_j |u_t[b, j] - u_s[b, j]|^p``. Spatial sizes are matched by
    :func:`match_spatial`.

    Args:
        student_factor: ``(B, K, Hs, Ws)``, the translator's output.
        teacher_factor: ``(B, K, Ht, Wt)``, the paraphraser's encoding of the teacher feature.
        p: the norm's order, ``p > 0``.

    Returns:
        A scalar.

    Raises:
        ValueError: non-4D factors, different batch sizes or channel counts, or ``p <= 0``.
    """
    p = _check_number("p", p, hint="the norm's order (Kim et al. use 1)")
    _check_maps("ft_loss", student_factor, teacher_factor)
    if student_factor.shape[1] != teacher_factor.shape[1]:
        raise ValueError(
            f"ft_loss compares factors with the same number of channels, got {student_factor.shape[1]} (student) "
            f"and {teacher_factor.shape[1]} (teacher): build the translator and the paraphraser with the same rate"
        )
    s, t = match_spatial(_float(student_factor), _float(teacher_factor))
    # (B, K, H, W) -> (B, K*H*W), each sample's factor L2-normalised
    u_s = F.normalize(s.flatten(1), p=2.0, dim=1)
    u_t = F.normalize(t.flatten(1), p=2.0, dim=1)
    return (u_t - u_s).abs().pow(p).mean()


def _conv_stack(channels: list[int], *, transpose: bool = False, batch_norm: bool = False) -> nn.Sequential:
    """3x3 stride-1 convolutions ``channels[0] -> channels[1] -> ...``, each followed by
    (optional BN and) LeakyReLU(0.1): the blocks of Kim et al.'s paraphraser and translator."""
    layers: list[nn.Module] = []
    conv = nn.ConvTranspose2d if transpose else nn.Conv2d
    for c_in, c_out in zip(channels[:-1], channels[1:]):
        layers.append(conv(c_in, c_out, kernel_size=3, stride=1, padding=1))
        if batch_norm:
            layers.append(nn.BatchNorm2d(c_out))
        layers.append(nn.LeakyReLU(0.1))
    return nn.Sequential(*layers)


class Paraphraser(nn.Module):
    """FT's paraphraser: a convolutional autoencoder on the teacher's feature map.

    Encoder ``C -> C -> K -> K`` (3x3 convolutions), decoder ``K -> K -> C -> C`` (3x3
    transposed convolutions), LeakyReLU(0.1) after each, spatial size kept, with ``K =
    int(C * rate)`` (Kim et al.'s paraphrase rate; 0.5 on CIFAR).

    Args:
        channels: ``C``, the teacher feature's channels.
        factor_channels: ``K``.
    """

    def __init__(self, channels: int, factor_channels: int):
        super().__init__()
        self.encoder = _conv_stack([channels, channels, factor_channels, factor_channels])
        self.decoder = _conv_stack([factor_channels, factor_channels, channels, channels], transpose=True)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W) -> (B, K, H, W)``: the teacher factor."""
        return self.encoder(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W) -> (B, C, H, W)``: the reconstruction."""
        return self.decoder(self.encoder(x))


class FTLoss(DistillationLoss):
    """Factor transfer (Kim et al., NeurIPS 2018) as a module:
    ``weight * ft_loss(translator(s), paraphraser.encode(t), p)``; see :func:`ft_loss`.

    :meth:`setup` builds, from one batch's shapes, the :class:`Paraphraser` on the teacher's
    feature and the translator on the student's (3x3 convolutions ``Cs -> Cs -> K -> K``
    with BN and LeakyReLU(0.1)), ``K = int(Ct * rate)``.

    **Two stages.** The paraphraser is trained first, alone, to reconstruct the teacher's
    feature (:meth:`paraphraser_loss`, a mean squared error; CRD's runs: 30 epochs of SGD
    at learning rate 0.01), then frozen while the translator is trained with the student on
    this loss. ``forward`` computes the teacher factor without gradients, so the
    paraphraser never changes there (optimizers skip parameters without gradients). With
    ``pretrain_epochs > 0`` the Distiller runs stage 1 itself before distilling (SGD at
    ``pretrain_lr``, over the training data as the teacher sees it), once: the
    ``pretrained`` flag is saved with the loss, so a resumed run does not repeat it. Stage
    1 by hand, with the building blocks::

        ft = FTLoss("layer3", "layer3")
        distiller.compile(optimizer, distillation_loss_fn=ft, alpha=...)
        distiller.setup(x_train[:64])      # builds the paraphraser and the translator
        opt = torch.optim.SGD(ft.paraphraser.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
        with kdistill.taps.FeatureTaps(teacher, ["layer3"]) as taps:
            for epoch in range(30):
                for x, _ in loader:
                    with torch.no_grad():
                        teacher(x)
                    loss = ft.paraphraser_loss(taps.pop()["layer3"])
                    opt.zero_grad(); loss.backward(); opt.step()
        distiller.fit(x_train, y_train, ...)  # stage 2 (setup is not repeated)

    Args:
        student_layer: module path of the student's layer.
        teacher_layer: module path of the teacher's layer.
        rate: paraphrase rate ``k > 0``: the factors have ``K = int(Ct * k) >= 1`` channels
            (0.5, the paper's and CRD's value).
        p: order of the norm between normalised factors (1).
        weight: scale of the loss (CRD's CIFAR-100 setting: 200).
        pretrain_epochs: epochs of stage 1 the Distiller runs before distilling (CRD: 30;
            default 0: none, pre-train by hand or accept a random paraphraser).
        pretrain_lr: stage 1's SGD learning rate (CRD: 0.01).

    Raises:
        ValueError: ``rate <= 0``, ``p <= 0`` or ``weight < 0``.
    """

    nonnegative: ClassVar[bool] = True

    def __init__(self, student_layer: str, teacher_layer: str, *, rate: float = 0.5, p: float = 1.0, weight: float = 200.0,
                 pretrain_epochs: int = 0, pretrain_lr: float = 0.01):
        super().__init__()
        self.pretrain_epochs = _check_int(
            "pretrain_epochs", pretrain_epochs, low=0,
            hint="the epochs the paraphraser trains alone before distillation (CRD's runs: 30; 0: none)")
        self.pretrain_lr = _check_number("pretrain_lr", pretrain_lr, hint="the paraphraser's SGD learning rate (CRD: 0.01)")
        self.register_buffer("pretrained", torch.zeros((), dtype=torch.bool))
        self.taps = {"student": student_layer, "teacher": teacher_layer}
        self.rate = _check_number(
            "rate", rate, hint="the paraphrase rate k: the factors have int(k * C) channels (Kim et al. use 0.5)"
        )
        self.p = _check_number("p", p, hint="the norm's order (Kim et al. use 1)")
        self.weight = check_weight("weight", weight)
        self.paraphraser: Paraphraser | None = None
        self.translator: nn.Module | None = None
        self._shapes: tuple | None = None

    def setup(self, student: Outputs, teacher: Outputs) -> None:
        """Build the paraphraser and the translator (kept if the channel counts are unchanged).

        Raises:
            KeyError: a tapped layer is missing from the outputs.
            ValueError: features that are not maps, or a rate that leaves no factor channel.
        """
        s, t = self.features(student, teacher)
        _check_maps(self.name, s, t)
        cs, ct = int(s.shape[1]), int(t.shape[1])
        if self.paraphraser is not None and self._shapes == (cs, ct):
            return
        k = int(ct * self.rate)
        if k < 1:
            raise ValueError(
                f"rate={self.rate:g} leaves int({ct} * {self.rate:g}) = {k} factor channels for the teacher's "
                f"{ct} channels; use a rate of at least {1 / ct:.3g}"
            )
        dtype = _param_dtype(s)
        self.paraphraser = Paraphraser(ct, k).to(device=s.device, dtype=dtype)
        self.translator = _conv_stack([cs, cs, k, k], batch_norm=True).to(device=s.device, dtype=dtype)
        self._shapes = (cs, ct)

    @property
    def needs_pretraining(self) -> bool:
        """True until the paraphraser has had its ``pretrain_epochs`` (the Distiller runs them)."""
        return self.pretrain_epochs > 0 and not bool(self.pretrained)

    def pretrain_loss(self, teacher: Outputs, batch: Batch) -> torch.Tensor:
        """Stage 1 inside the Distiller: :meth:`paraphraser_loss` on the teacher's tapped layer."""
        return self.paraphraser_loss(teacher.features[self.taps["teacher"]])

    def pretrain_optimizer(self) -> torch.optim.Optimizer:
        """SGD over the paraphraser (CRD's settings: momentum 0.9, weight decay 5e-4)."""
        if self.paraphraser is None:
            raise _not_set_up(self.name, "paraphraser")
        return torch.optim.SGD(self.paraphraser.parameters(), lr=self.pretrain_lr, momentum=0.9, weight_decay=5e-4)

    def finish_pretraining(self) -> None:
        self.pretrained.fill_(True)

    def paraphraser_loss(self, teacher_feature: torch.Tensor) -> torch.Tensor:
        """Stage 1: the paraphraser's reconstruction error ``mean((P(t) - t)^2)``.

        Args:
            teacher_feature: ``(B, Ct, H, W)`` the teacher's tapped feature.

        Returns:
            A scalar; its gradient reaches the paraphraser only.

        Raises:
            RuntimeError: before :meth:`setup`.
        """
        if self.paraphraser is None:
            raise _not_set_up(self.name, "paraphraser")
        t = teacher_feature.detach().to(next(self.paraphraser.parameters()).dtype)
        return F.mse_loss(self.paraphraser(t), t)

    def forward(self, student: Outputs, teacher: Outputs, batch: Batch | None = None) -> torch.Tensor:
        s, t = self.features(student, teacher)
        if self.paraphraser is None or self.translator is None:
            raise _not_set_up(self.name, "paraphraser and translator")
        dtype = next(self.translator.parameters()).dtype
        factor_s = self.translator(s.to(dtype))  # (B, Cs, Hs, Ws) -> (B, K, Hs, Ws)
        with torch.no_grad():  # stage 2: the paraphraser is frozen
            factor_t = self.paraphraser.encode(t.to(dtype))  # (B, Ct, Ht, Wt) -> (B, K, Ht, Wt)
        return self.weight * ft_loss(factor_s, factor_t, self.p)

    def extra_repr(self) -> str:
        return f"taps={self.taps}, rate={self.rate}, p={self.p}, weight={self.weight}"

