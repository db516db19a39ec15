"""Losses on the relations between the samples of a batch.

Instead of matching each student feature to the teacher's, these methods match how the
samples of a batch relate to one another (similarities, distances, angles, conditional
probabilities, kernel correlations), so student and teacher features may have different
widths and no adapter is needed. Each method is a pure function (what tests and your own
loops call) with a :class:`~kdistill.losses.base.DistillationLoss` module beside it.

Every function takes the tapped tensors of any shape ``(B, ...)`` and flattens them to
``(B, D)`` (``D`` may differ between student and teacher). Gradients flow into whichever
argument requires them; the Distiller's teacher features never do. Half-precision
features are computed in float32, float64 stays float64. A batch of one sample has no
relations: every loss here is then 0.

Default weights are those of the CRD repository's CIFAR-100 runs (HobbitLong/RepDistiller,
``scripts/run_cifar_distill.sh``, the ``-b`` flag): SP 3000, RKD 1 (with distance and angle
weights 25 and 50 inside, ``distiller_zoo/RKD.py``), PKT 30000, CC 0.02.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..outputs import Batch, Outputs
from .base import DistillationLoss, check_same_batch, check_weight, compute_dtype

#: Clamp of squared pairwise distances before the square root (RepDistiller's ``pdist``):
#: keeps the gradient of ``sqrt`` finite for coincident points.
DISTANCE_EPS = 1e-12

#: PKT's epsilon (Passalis & Tefas's code, kept by RepDistiller): added to the feature norms
#: and to both probabilities inside the KL divergence's logarithm.
PKT_EPS = 1e-7
_PKT_EPS_MEANING = "it is added to the feature norms and inside PKT's logarithm (default 1e-7, the authors')"


# --------------------------------------------------------------------------- helpers


def flatten_pair(student: torch.Tensor, teacher: torch.Tensor, method: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Both features as ``(B, D)`` matrices in their compute dtype.

    Args:
        student: ``(B, ...)`` student features.
        teacher: ``(B, ...)`` teacher features (another width is fine).
        method: the loss's name, for error messages.

    Returns:
        ``(student, teacher)`` reshaped ``(B, ...) -> (B, D_s)`` and ``(B, D_t)``.

    Raises:
        ValueError: a tensor without a batch axis, or batch sizes that differ.
    """
    for role, x in (("student", student), ("teacher", teacher)):
        if x.dim() < 2:
            raise ValueError(
                f"{method} needs {role} features of shape (B, ...) with a batch axis and at least one "
                f"feature axis, got shape {tuple(x.shape)}; tap a layer that outputs one vector or map per sample"
            )
    check_same_batch(method, student, teacher)
    b = student.shape[0]
    # (B, C, H, W) or (B, T, D) -> (B, C*H*W) / (B, T*D)
    return (
        student.reshape(b, -1).to(compute_dtype(student)),
        teacher.reshape(b, -1).to(compute_dtype(teacher)),
    )


def _zero(x: torch.Tensor) -> torch.Tensor:
    """A scalar 0 that keeps ``x`` in the graph (a gradient of zeros, not ``None``)."""
    return x.sum() * 0.0


def _check_positive(name: str, value: float) -> float:
    v = float(value)
    if not (v > 0 and math.isfinite(v)):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return v


class _RelationLoss(DistillationLoss):
    """Shared plumbing: taps from ``student_layer`` / ``teacher_layer`` and a ``weight``."""

    def __init__(self, student_layer: str, teacher_layer: str, weight: float):
        super().__init__()
        for arg, value in (("student_layer", student_layer), ("teacher_layer", teacher_layer)):
            if not isinstance(value, str) or not value:
                raise ValueError(
                    f"{type(self).__name__} needs {arg} as a module path (e.g. 'layer3' or 'avgpool'), got {value!r}"
                )
        self.taps = {"student": student_layer, "teacher": teacher_layer}
        self.weight = check_weight("weight", weight)

    def _weights_repr(self) -> str:
        return f"student_layer={self.taps['student']!r}, teacher_layer={self.taps['teacher']!r}, weight={self.weight}"


# --------------------------------------------------------------------------- SP


def sp_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Similarity-preserving loss of Tung & Mori (2019), "Similarity-Preserving Knowledge
    Distillation", ICCV 2019, arXiv:1907.09682, eq. (1)-(4).

    With ``Q`` the ``(B, D)`` flattened features of a batch, ``G~ = Q Q^T`` is the
    ``(B, B)`` Gram matrix and ``G = G~ / ||G~[i, :]||_2`` its row-wise L2 normalisation;
    ``L = ||G_t - G_s||_F^2 / B^2``. The row normalisation makes the loss invariant to a
    rescaling of either model's features.

    Args:
        student: ``(B, ...)`` student features (flattened to ``(B, D_s)``).
        teacher: ``(B, ...)`` teacher features (flattened to ``(B, D_t)``).

    Returns:
        A scalar, ``>= 0`` (unweighted; RepDistiller weights it by 3000).

    Raises:
        ValueError: tensors without a batch axis or with different batch sizes.
    """
    s, t = flatten_pair(student, teacher, "sp_loss")
    b = s.shape[0]
    # (B, D) -> (B, B): Gram matrices, each row scaled to unit L2 norm
    g_s = F.normalize(s @ s.t(), p=2, dim=1)
    g_t = F.normalize(t @ t.t(), p=2, dim=1)
    return (g_t - g_s).pow(2).sum() / (b * b)


class SPLoss(_RelationLoss):
    """Similarity-preserving distillation (Tung & Mori, ICCV 2019) as a module; see :func:`sp_loss`.

    Args:
        student_layer: module path of the student's tapped layer (RepDistiller taps the
            last feature map before pooling).
        teacher_layer: module path of the teacher's tapped layer.
        weight: multiplier of :func:`sp_loss` (3000: RepDistiller's CIFAR-100 value).
    """

    nonnegative = True

    def __init__(self, student_layer: str, teacher_layer: str, *, weight: float = 3000.0):
        super().__init__(student_layer, teacher_layer, weight)

    def forward(self, student: Outputs, teacher: Outputs, batch: Batch | None = None) -> torch.Tensor:
        s, t = self.features(student, teacher)
        return self.weight * sp_loss(s, t)

    def extra_repr(self) -> str:
        return self._weights_repr()


# --------------------------------------------------------------------------- RKD


def pairwise_distances(x: torch.Tensor) -> torch.Tensor:
    """Euclidean distances between the rows of ``x``: ``(B, D) -> (B, B)``, zero diagonal.

    Computed from the Gram matrix of the centred rows (distances do not change under a
    translation, and centring shrinks the norms the Gram form subtracts), with the squared
    distance clamped at :data:`DISTANCE_EPS` before the square root so coincident points
    have a finite gradient.
    """
    x = x - x.mean(dim=0, keepdim=True)
    sq = x.pow(2).sum(dim=1)
    # (B,) + (B,) - (B, B) -> (B, B) squared distances
    d2 = (sq.unsqueeze(1) + sq.unsqueeze(0) - 2.0 * (x @ x.t())).clamp_min(DISTANCE_EPS)
    off_diagonal = ~torch.eye(x.shape[0], dtype=torch.bool, device=x.device)
    return d2.sqrt() * off_diagonal


def rkd_distance_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Distance-wise loss of Park, Kim, Lu & Cho (2019), "Relational Knowledge
    Distillation", CVPR 2019, arXiv:1904.05068, eq. (4)-(5).

    ``psi_D(x_i, x_j) = ||x_i - x_j||_2 / mu`` with ``mu`` the mean distance over the
    pairs ``i != j`` of the batch, and ``L = mean_{i, j} huber(psi_D(t_i, t_j), psi_D(s_i, s_j))``
    with the Huber (smooth L1, ``delta = 1``) loss. As in the authors' code and
    RepDistiller, the mean runs over all ``B^2`` entries (the zero diagonal included).
    Invariant to a rescaling or translation of either model's features.

    Args:
        student: ``(B, ...)`` student features (flattened to ``(B, D_s)``).
        teacher: ``(B, ...)`` teacher features (flattened to ``(B, D_t)``).

    Returns:
        A scalar, ``>= 0`` (unweighted; RepDistiller weights it by 25).

    Raises:
        ValueError: tensors without a batch axis or with different batch sizes.
    """
    s, t = flatten_pair(student, teacher, "rkd_distance_loss")
    b = s.shape[0]
    if b < 2:
        return _zero(s)
    # (B, D) -> (B, B), each divided by its mean over the B*(B-1) pairs i != j
    d_s = pairwise_distances(s)
    d_t = pairwise_distances(t)
    d_s = d_s / (d_s.sum() / (b * (b - 1)))
    d_t = d_t / (d_t.sum() / (b * (b - 1)))
    return F.smooth_l1_loss(d_s, d_t, beta=1.0)


def triplet_cosines(x: torch.Tensor) -> torch.Tensor:
    """Cosines of the angles of all triplets: ``(B, D) -> (B, B, B)``.

    ``cos[a, b, c] = <e_ab, e_ac>`` with ``e_ab = (x_b - x_a) / ||x_b - x_a||_2``: the
    cosine of the angle at vertex ``a`` of the triangle ``(x_a, x_b, x_c)``. A degenerate
    direction (``b == a``, or coincident points) is the zero vector, so its cosines are 0
    (RepDistiller's convention). Needs ``B^2 D`` memory for the direction vectors.
    """
    # (B, D) -> (B, B, D): e[a, b] = x_b - x_a, scaled to unit length (zero stays zero)
    e = F.normalize(x.unsqueeze(0) - x.unsqueeze(1), p=2, dim=2)
    # (B, B, D) @ (B, D, B) -> (B, B, B)
    return torch.bmm(e, e.transpose(1, 2))


def rkd_angle_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Angle-wise loss of Park et al. (2019), "Relational Knowledge Distillation",
    CVPR 2019, eq. (6)-(7).

    ``psi_A(x_i, x_j, x_k) = cos angle(x_i x_j x_k) = <e_ij, e_kj>`` with
    ``e_ij = (x_i - x_j) / ||x_i - x_j||_2``, and
    ``L = mean_{i, j, k} huber(psi_A(t_i, t_j, t_k), psi_A(s_i, s_j, s_k))`` (smooth L1,
    ``delta = 1``). As in the authors' code and RepDistiller the mean runs over all
    ``B^3`` triplets, degenerate ones (a repeated index) counting as 0 on both sides; see
    :func:`triplet_cosines`. Invariant to translation, rescaling and rotation.

    Args:
        student: ``(B, ...)`` student features (flattened to ``(B, D_s)``).
        teacher: ``(B, ...)`` teacher features (flattened to ``(B, D_t)``).

    Returns:
        A scalar, ``>= 0`` (unweighted; RepDistiller weights it by 50).

    Raises:
        ValueError: tensors without a batch axis or with different batch sizes.
    """
    s, t = flatten_pair(student, teacher, "rkd_angle_loss")
    if s.shape[0] < 2:
        return _zero(s)
    return F.smooth_l1_loss(triplet_cosines(s), triplet_cosines(t), beta=1.0)


def rkd_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    distance_weight: float = 25.0,
    angle_weight: float = 50.0,
) -> torch.Tensor:
    """Relational knowledge distillation (Park et al., CVPR 2019), eq. (8):
    ``distance_weight * rkd_distance_loss + angle_weight * rkd_angle_loss``.

    Args:
        student: ``(B, ...)`` student features.
        teacher: ``(B, ...)`` teacher features.
        distance_weight: ``lambda_D`` (25, RepDistiller's ``RKDLoss`` default).
        angle_weight: ``lambda_A`` (50, RepDistiller's ``RKDLoss`` default).

    Returns:
        A scalar, ``>= 0``.

    Raises:
        ValueError: a negative weight, or tensors as :func:`flatten_pair` rejects.
    """
    wd = check_weight("distance_weight", distance_weight, "it weights RKD's distance term")
    wa = check_weight("angle_weight", angle_weight, "it weights RKD's angle term")
    return wd * rkd_distance_loss(student, teacher) + wa * rkd_angle_loss(student, teacher)


class RKDLoss(_RelationLoss):
    """Relational knowledge distillation (Park et al., CVPR 2019) as a module; see :func:`rkd_loss`.

    Logged as two terms, ``RKDLoss/distance`` and ``RKDLoss/angle`` (:meth:`named_terms`).

    Args:
        student_layer: module path of the student's tapped layer (RepDistiller taps the
            pooled penultimate features).
        teacher_layer: module path of the teacher's tapped layer.
        weight: overall multiplier (1 in RepDistiller's CIFAR-100 run).
        distance_weight: ``lambda_D`` (25).
        angle_weight: ``lambda_A`` (50).
    """

    nonnegative = True

    def __init__(
        self,
        student_layer: str,
        teacher_layer: str,
        *,
        weight: float = 1.0,
        distance_weight: float = 25.0,
        angle_weight: float = 50.0,
    ):
        super().__init__(student_layer, teacher_layer, weight)
        self.distance_weight = check_weight("distance_weight", distance_weight, "it weights RKD's distance term")
        self.angle_weight = check_weight("angle_weight", angle_weight, "it weights RKD's angle term")

    def named_terms(self, student: Outputs, teacher: Outputs, batch: Batch | None = None) -> dict[str, torch.Tensor]:
        s, t = self.features(student, teacher)
        return {
            f"{self.name}/distance": self.weight * self.distance_weight * rkd_distance_loss(s, t),
            f"{self.name}/angle": self.weight * self.angle_weight * rkd_angle_loss(s, t),
        }

    def forward(self, student: Outputs, teacher: Outputs, batch: Batch | None = None) -> torch.Tensor:
        terms = self.named_terms(student, teacher, batch)
        return terms[f"{self.name}/distance"] + terms[f"{self.name}/angle"]

    def extra_repr(self) -> str:
        return f"{self._weights_repr()}, distance_weight={self.distance_weight}, angle_weight={self.angle_weight}"


# --------------------------------------------------------------------------- PKT


def cosine_conditional_probabilities(x: torch.Tensor, eps: float = PKT_EPS) -> torch.Tensor:
    """PKT's conditional probabilities from the cosine-similarity kernel: ``(B, D) -> (B, B)``.

    ``K(x_i, x_j) = (1 + cos(x_i, x_j)) / 2`` in ``[0, 1]``, with each row divided by its
    norm plus ``eps``; ``p_{j|i} = K(x_i, x_j) / sum_k K(x_i, x_k)`` (row ``i`` sums to 1).
    """
    x = x / (x.norm(p=2, dim=1, keepdim=True) + eps)
    # (B, D) -> (B, B) similarities scaled from [-1, 1] to [0, 1]
    kernel = (x @ x.t() + 1.0) / 2.0
    return kernel / kernel.sum(dim=1, keepdim=True)


def pkt_loss(student: torch.Tensor, teacher: torch.Tensor, eps: float = PKT_EPS) -> torch.Tensor:
    """Probabilistic knowledge transfer of Passalis & Tefas (2018), "Learning Deep
    Representations with Probabilistic Knowledge Transfer", ECCV 2018, eq. (8)-(10), with
    the cosine-similarity kernel (their eq. (13)).

    With ``p_{j|i}`` the teacher's and ``q_{j|i}`` the student's conditional probabilities
    (:func:`cosine_conditional_probabilities`),
    ``L = mean_{i, j} p_{j|i} log((p_{j|i} + eps) / (q_{j|i} + eps))``.
    As in the authors' code (kept by RepDistiller), the kernel includes ``j = i`` (the
    paper's sums leave it out) and the mean runs over the ``B^2`` entries, i.e. the
    per-sample KL divergences summed over ``j``, averaged over ``i`` and divided by ``B``.
    Zero when student and teacher features coincide. Unlike the authors' code, NaNs in the
    features are not silently replaced by zeros (the Distiller stops on a NaN loss instead).

    Args:
        student: ``(B, ...)`` student features (flattened to ``(B, D_s)``).
        teacher: ``(B, ...)`` teacher features (flattened to ``(B, D_t)``).
        eps: added to the feature norms and inside the logarithm (``1e-7`` as in the reference).

    Returns:
        A scalar, ``>= 0`` up to rounding of order ``eps`` (unweighted; RepDistiller
        weights it by 30000).

    Raises:
        ValueError: a negative ``eps``, or tensors as :func:`flatten_pair` rejects.
    """
    check_weight("eps", eps, _PKT_EPS_MEANING)
    s, t = flatten_pair(student, teacher, "pkt_loss")
    q = cosine_conditional_probabilities(s, eps)
    p = cosine_conditional_probabilities(t, eps)
    # (B, B) -> scalar: mean over all i, j of p log(p / q)
    return (p * torch.log((p + eps) / (q + eps))).mean()


class PKTLoss(_RelationLoss):
    """Probabilistic knowledge transfer (Passalis & Tefas, ECCV 2018) as a module; see :func:`pkt_loss`.

    Args:
        student_layer: module path of the student's tapped layer (RepDistiller taps the
            pooled penultimate features).
        teacher_layer: module path of the teacher's tapped layer.
        weight: multiplier of :func:`pkt_loss` (30000 in RepDistiller's CIFAR-100 run).
        eps: PKT's epsilon (``1e-7``).
    """

    nonnegative = True

    def __init__(self, student_layer: str, teacher_layer: str, *, weight: float = 30000.0, eps: float = PKT_EPS):
        super().__init__(student_layer, teacher_layer, weight)
        self.eps = check_weight("eps", eps, _PKT_EPS_MEANING)

    def forward(self, student: Outputs, teacher: Outputs, batch: Batch | None = None) -> torch.Tensor:
        s, t = self.features(student, teacher)
        return self.weight * pkt_loss(s, t, self.eps)

    def extra_repr(self) -> str:
        return f"{self._weights_repr()}, eps={self.eps}"


# --------------------------------------------------------------------------- CC


def taylor_rbf_correlation(x: torch.Tensor, gamma: float = 0.4, order: int = 2) -> torch.Tensor:
    """Correlation matrix of CC's Gaussian RBF kernel in its Taylor form: ``(B, D) -> (B, B)``.

    On L2-normalised rows, ``exp(-gamma ||x_i - x_j||^2) = exp(-2 gamma) exp(2 gamma x_i.x_j)``,
    and the second factor is expanded to ``order``:
    ``k(x_i, x_j) ~= sum_{p=0}^{P} exp(-2 gamma) (2 gamma)^p / p! (x_i . x_j)^p``.
    """
    x = F.normalize(x, p=2, dim=1)
    # (B, D) -> (B, B) cosine similarities
    sim = x @ x.t()
    corr = torch.zeros_like(sim)
    for p in range(order + 1):
        corr = corr + (math.exp(-2.0 * gamma) * (2.0 * gamma) ** p / math.factorial(p)) * sim.pow(p)
    return corr


def _check_cc(gamma: float, order: int) -> tuple[float, int]:
    g = _check_positive("gamma", gamma)
    if isinstance(order, bool) or not isinstance(order, int) or order < 0:
        raise ValueError(f"order (of the Taylor expansion) must be an integer >= 0, got {order!r}; CC uses 2")
    return g, order


def cc_loss(student: torch.Tensor, teacher: torch.Tensor, gamma: float = 0.4, order: int = 2) -> torch.Tensor:
    """Correlation congruence of Peng et al. (2019), "Correlation Congruence for Knowledge
    Distillation", ICCV 2019, arXiv:1904.01802, eq. (6)-(11).

    ``psi(F) = [k(f_i, f_j)]`` is the ``(B, B)`` correlation matrix of a batch under the
    Gaussian RBF kernel approximated by its ``order``-``P`` Taylor expansion
    (:func:`taylor_rbf_correlation`), and ``L_CC = ||psi(F_t) - psi(F_s)||_F^2 / B^2``.
    Only the correlation term; the paper's instance-level term is the ordinary KD loss.
    ``gamma = 0.4`` and ``P = 2`` are the values of AberHu's Knowledge-Distillation-Zoo
    (``kd_losses/cc.py``), the commonly used Taylor-form implementation.

    Args:
        student: ``(B, ...)`` student features (flattened to ``(B, D_s)``).
        teacher: ``(B, ...)`` teacher features (flattened to ``(B, D_t)``).
        gamma: RBF kernel parameter ``gamma > 0``.
        order: Taylor order ``P >= 0``.

    Returns:
        A scalar, ``>= 0`` (unweighted).

    Raises:
        ValueError: ``gamma <= 0``, ``order`` not an integer ``>= 0``, or tensors as
            :func:`flatten_pair` rejects.
    """
    g, p = _check_cc(gamma, order)
    s, t = flatten_pair(student, teacher, "cc_loss")
    b = s.shape[0]
    c_s = taylor_rbf_correlation(s, g, p)
    c_t = taylor_rbf_correlation(t, g, p)
    return (c_t - c_s).pow(2).sum() / (b * b)


class CCLoss(_RelationLoss):
    """Correlation congruence (Peng et al., ICCV 2019) as a module; see :func:`cc_loss`.

    Embedding: RepDistiller applies CC to ``nn.Linear`` projections (128-d, trained with the
    student) of both models' penultimate features. kdistill does **not** by default
    (``embed_dim=None``): the correlation matrices are ``(B, B)`` whatever the feature
    widths, so no projection is needed, and a trainable projection on the teacher's side
    turns its fixed target into a moving one that both heads can shrink together (collapsing
    both embeddings onto one direction makes the loss 0). Pass ``embed_dim=128`` to
    reproduce RepDistiller's set-up: :meth:`setup` then builds the two linear heads from
    the feature sizes, and they are trained with the student.

    Args:
        student_layer: module path of the student's tapped layer (RepDistiller taps the
            pooled penultimate features).
        teacher_layer: module path of the teacher's tapped layer.
        weight: multiplier of :func:`cc_loss` (0.02: RepDistiller's CIFAR-100 weight for CC).
        gamma: RBF kernel parameter (0.4).
        order: Taylor order (2).
        embed_dim: width of linear projections applied to both features first, or ``None``.
    """

    nonnegative = True

    def __init__(
        self,
        student_layer: str,
        teacher_layer: str,
        *,
        weight: float = 0.02,
        gamma: float = 0.4,
        order: int = 2,
        embed_dim: int | None = None,
    ):
        super().__init__(student_layer, teacher_layer, weight)
        self.gamma, self.order = _check_cc(gamma, order)
        if embed_dim is not None and (isinstance(embed_dim, bool) or not isinstance(embed_dim, int) or embed_dim < 1):
            raise ValueError(f"embed_dim must be a positive integer or None, got {embed_dim!r}")
        self.embed_dim = embed_dim
        self.embed_s: nn.Linear | None = None
        self.embed_t: nn.Linear | None = None

    def setup(self, student: Outputs, teacher: Outputs) -> None:
        """Build the linear heads (only with ``embed_dim``) from one batch's feature sizes."""
        if self.embed_dim is None:
            return
        s, t = self.features(student, teacher)
        sizes = (s[0].numel(), t[0].numel())
        if self.embed_s is not None:
            if (self.embed_s.in_features, self.embed_t.in_features) != sizes:
                raise ValueError(
                    f"{self.name} was set up for features of {self.embed_s.in_features} (student) and "
                    f"{self.embed_t.in_features} (teacher) values per sample, now gets {sizes[0]} and {sizes[1]}; "
                    "build a new loss for other models"
                )
            return
        dtype = compute_dtype(s)
        self.embed_s = nn.Linear(sizes[0], self.embed_dim, device=s.device, dtype=dtype)
        self.embed_t = nn.Linear(sizes[1], self.embed_dim, device=s.device, dtype=dtype)

    def forward(self, student: Outputs, teacher: Outputs, batch: Batch | None = None) -> torch.Tensor:
        s, t = self.features(student, teacher)
        if self.embed_dim is not None:
            if self.embed_s is None:
                raise RuntimeError(
                    f"{self.name}(embed_dim={self.embed_dim}) has no embedding heads yet: call "
                    "setup(student_outputs, teacher_outputs) with one batch's outputs first (the Distiller does)"
                )
            if t.is_inference():  # a teacher run under torch.inference_mode: autograd cannot save it
                t = t.clone()
            # (B, ...) -> (B, D) -> (B, embed_dim)
            s = self.embed_s(s.reshape(s.shape[0], -1).to(self.embed_s.weight.dtype))
            t = self.embed_t(t.reshape(t.shape[0], -1).to(self.embed_t.weight.dtype))
        return self.weight * cc_loss(s, t, self.gamma, self.order)

    def extra_repr(self) -> str:
        return f"{self._weights_repr()}, gamma={self.gamma}, order={self.order}, embed_dim={self.embed_dim}"


__all__ = [
    "CCLoss",
    "PKTLoss",
    "RKDLoss",
    "SPLoss",
    "cc_loss",
    "pkt_loss",
    "rkd_angle_loss",
    "rkd_distance_loss",
    "rkd_loss",
    "sp_loss",
]
