"""Contrastive representation distillation (CRD): Tian, Krishnan & Isola (2020),
"Contrastive Representation Distillation", ICLR 2020, arXiv:1910.10699.

The student is trained to tell, for each sample, the teacher's representation of that
same sample (the positive) apart from the teacher's representations of other samples (the
negatives), and vice versa. Negatives come from a memory bank of past embeddings, one row
per dataset sample, so thousands of them are available at batch size 64. The objective is
the paper's NCE form (eq. (18)-(20)): with ``N`` negatives drawn from a dataset of ``M``
samples, the critic

    h(a, b) = P(a, b) / (P(a, b) + N / M),    P(a, b) = exp(a . b / tau) / Z

estimates the probability that the pair came from the joint distribution, and

    L = -(1 / B) * sum_i [ log h(a_i, b_i) + sum_{k=1}^{N} log(1 - h(a_i, b_{ik})) ].

``Z`` (the partition function) is estimated once, on the first batch, as
``M * mean(exp(a . b / tau))`` over all its scores (as RepDistiller's ``crd/memory.py``
does) and then kept fixed. Both directions are summed: the student's embedding anchored on
the teacher's memory, and the teacher's embedding anchored on the student's memory.

Defaults are RepDistiller's CIFAR-100 settings (``train_student.py``,
``scripts/run_cifar_distill.sh``): weight 0.8, ``feat_dim=128``, ``nce_k=16384``,
``nce_t=0.07``, ``nce_m=0.5``. Negatives are drawn uniformly over the dataset here (the
paper's noise distribution); RepDistiller's CIFAR-100 loader instead draws them from the
samples of other classes ("exact" mode): pass ``contrast_index`` to :func:`crd_loss` for
such a sampler of your own.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..outputs import Batch, Outputs
from .base import DistillationLoss, check_weight


# --------------------------------------------------------------------------- pure functions


def sample_contrast_index(
    index: torch.Tensor,
    n_data: int,
    nce_k: int,
    *,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Positive and negative memory rows for each sample: ``(B,) -> (B, 1 + nce_k)``.

    Column 0 is the sample's own index (the positive); columns ``1..nce_k`` are drawn
    uniformly from ``[0, n_data)`` with replacement, so a negative can, with probability
    ``1 / n_data``, be the positive itself (as with RepDistiller's uniform sampler).

    Args:
        index: ``(B,)`` dataset indices of the batch.
        n_data: dataset size (rows of the memory bank).
        nce_k: negatives per sample.
        generator: optional random generator (on ``index``'s device).

    Returns:
        ``(B, 1 + nce_k)`` long tensor on ``index``'s device.
    """
    b = index.shape[0]
    negatives = torch.randint(0, n_data, (b, nce_k), device=index.device, generator=generator)
    # (B,) -> (B, 1) next to (B, K) -> (B, 1 + K)
    return torch.cat([index.reshape(b, 1).long(), negatives], dim=1)


def contrast_logits(
    anchor: torch.Tensor,
    memory: torch.Tensor,
    contrast_index: torch.Tensor,
    temperature: float,
) -> torch.Tensor:
    """Scores of anchors against memory rows: ``(B, F), (M, F), (B, 1+K) -> (B, 1+K)``.

    ``logits[i, k] = memory[contrast_index[i, k]] . anchor[i] / temperature``. The memory
    rows are read without gradient (the bank is not a parameter).

    Two equal ways to get them; the one holding fewer numbers is used: scoring every
    anchor against the whole bank and picking the columns (``B * M`` numbers: 3.2 M for
    CIFAR-100 at batch 64), or gathering the ``B * (1+K)`` rows first as RepDistiller does
    (``B * (1+K) * F`` numbers: 134 M for the same run).
    """
    b, k1 = contrast_index.shape
    memory = memory.detach()
    contrast_index = contrast_index.to(memory.device)
    if memory.shape[0] <= k1 * memory.shape[1]:
        # a copy: autograd keeps it for the anchor's gradient, and the bank is updated in place
        bank = memory.to(anchor.dtype, copy=True)
        # (B, F) @ (F, M) -> (B, M) -> pick (B, 1+K)
        return (anchor @ bank.t()).gather(1, contrast_index) / temperature
    # (B, 1+K) -> (B*(1+K), F) -> (B, 1+K, F): the rows each anchor is compared with
    rows = memory.index_select(0, contrast_index.reshape(-1)).reshape(b, k1, -1).to(anchor.dtype)
    # (B, 1+K, F) @ (B, F, 1) -> (B, 1+K)
    return torch.bmm(rows, anchor.unsqueeze(2)).squeeze(2) / temperature


def estimate_log_normalizer(logits: torch.Tensor, n_data: int) -> torch.Tensor:
    """``log Z`` with ``Z = n_data * mean(exp(logits))`` (a detached scalar), computed in
    log space: ``logsumexp(logits) - log(numel) + log(n_data)``."""
    with torch.no_grad():
        return torch.logsumexp(logits.detach().reshape(-1), dim=0) - math.log(logits.numel()) + math.log(n_data)


def nce_loss(logits: torch.Tensor, log_normalizer: torch.Tensor | float, n_data: int) -> torch.Tensor:
    """CRD's NCE loss (Tian et al., ICLR 2020, eq. (18)-(20)) for one anchoring direction.

    With ``P = exp(logits) / Z``, ``K = logits.shape[1] - 1`` negatives and ``c = K / n_data``
    (``K`` times the uniform noise probability), ``h = P / (P + c)`` and
    ``L = -(1/B) [sum_i log h_i0 + sum_{i, k>=1} log(1 - h_ik)]``. Computed in log space
    (``log h = -softplus(log c - log P)``, ``log(1 - h) = -softplus(log P - log c)``), which
    is exact and needs no epsilon (RepDistiller adds ``1e-7`` to ``P + c``; with ``c`` about
    0.33 for CIFAR-100 the difference is below float32 resolution).

    Args:
        logits: ``(B, 1 + K)`` scores ``a . b / tau``; column 0 the positive pair.
        log_normalizer: ``log Z``.
        n_data: dataset size ``M`` (the noise distribution is uniform over it).

    Returns:
        A scalar, ``>= 0``.

    Raises:
        ValueError: ``logits`` not of shape ``(B, 1 + K)`` with ``K >= 1``.
    """
    if logits.dim() != 2 or logits.shape[1] < 2:
        raise ValueError(
            f"nce_loss needs scores of shape (B, 1 + K) with the positive in column 0 and K >= 1 "
            f"negatives, got shape {tuple(logits.shape)}"
        )
    b, k = logits.shape[0], logits.shape[1] - 1
    log_p = logits - log_normalizer  # (B, 1+K): log P
    log_c = math.log(k) - math.log(n_data)
    positive = F.softplus(log_c - log_p[:, 0]).sum()  # -sum_i log h(positive)
    negative = F.softplus(log_p[:, 1:] - log_c).sum()  # -sum_{i,k} log(1 - h(negative))
    return (positive + negative) / b


def crd_loss(
    student_embed: torch.Tensor,
    teacher_embed: torch.Tensor,
    student_memory: torch.Tensor,
    teacher_memory: torch.Tensor,
    contrast_index: torch.Tensor,
    *,
    temperature: float = 0.07,
    log_normalizers: tuple[torch.Tensor | float, torch.Tensor | float] | None = None,
) -> torch.Tensor:
    """CRD loss (Tian et al., ICLR 2020, eq. (18)-(20)), both directions, given the embeddings.

    ``L = nce(student anchored on the teacher's memory) + nce(teacher anchored on the
    student's memory)``; see :func:`nce_loss`. Memory banks are read, never written (see
    :func:`update_memory_`).

    Args:
        student_embed: ``(B, F)`` L2-normalised student embeddings.
        teacher_embed: ``(B, F)`` L2-normalised teacher embeddings.
        student_memory: ``(M, F)`` bank of student embeddings (one row per dataset sample).
        teacher_memory: ``(M, F)`` bank of teacher embeddings.
        contrast_index: ``(B, 1 + K)`` memory rows to score, the positive in column 0
            (:func:`sample_contrast_index`, or your own sampler).
        temperature: ``tau > 0`` (0.07).
        log_normalizers: ``(log Z_student_anchor, log Z_teacher_anchor)``; ``None``
            estimates both from this batch (what CRD does on its first batch).

    Returns:
        A scalar, ``>= 0``.

    Raises:
        ValueError: mismatched shapes or a non-positive temperature.
    """
    tau = float(temperature)
    if not (tau > 0 and math.isfinite(tau)):
        raise ValueError(f"temperature must be a positive number, got {temperature!r} (CRD uses 0.07)")
    if student_embed.shape != teacher_embed.shape or student_memory.shape != teacher_memory.shape:
        raise ValueError(
            f"crd_loss needs embeddings of one shape (B, F) and memories of one shape (M, F), got "
            f"{tuple(student_embed.shape)}, {tuple(teacher_embed.shape)}, {tuple(student_memory.shape)} "
            f"and {tuple(teacher_memory.shape)}"
        )
    if student_embed.shape[1] != student_memory.shape[1]:
        raise ValueError(
            f"embeddings have {student_embed.shape[1]} dimensions but the memory rows {student_memory.shape[1]}"
        )
    n_data = student_memory.shape[0]
    logits_s = contrast_logits(student_embed, teacher_memory, contrast_index, tau)
    logits_t = contrast_logits(teacher_embed, student_memory, contrast_index, tau)
    if log_normalizers is None:
        log_normalizers = (estimate_log_normalizer(logits_s, n_data), estimate_log_normalizer(logits_t, n_data))
    return nce_loss(logits_s, log_normalizers[0], n_data) + nce_loss(logits_t, log_normalizers[1], n_data)


def update_memory_(memory: torch.Tensor, index: torch.Tensor, embed: torch.Tensor, momentum: float) -> None:
    """Momentum update of the bank rows ``index``, in place and outside autograd.

    ``memory[i] <- normalize(m * memory[i] + (1 - m) * embed)`` for each sample (L2
    normalisation, as RepDistiller's ``crd/memory.py`` does); other rows are untouched.
    Indices should be unique within a batch (with repeats, which one is kept is undefined).

    Args:
        memory: ``(M, F)`` bank (a buffer).
        index: ``(B,)`` rows to update.
        embed: ``(B, F)`` new embeddings (detached here).
        momentum: ``m`` in ``[0, 1)``: the weight of the old row.
    """
    with torch.no_grad():
        index = index.to(memory.device).long()
        # (B,) -> (B, F): old rows blended with the new embeddings, then back to unit length
        rows = memory.index_select(0, index) * momentum + embed.detach().to(memory.dtype) * (1.0 - momentum)
        memory.index_copy_(0, index, F.normalize(rows, p=2, dim=1))


# --------------------------------------------------------------------------- modules


class EmbedHead(nn.Module):
    """CRD's embedding head: flatten, ``nn.Linear(in_features, feat_dim)``, L2-normalise.

    ``(B, ...) -> (B, in_features) -> (B, feat_dim)`` with unit-norm rows.
    """

    def __init__(self, in_features: int, feat_dim: int, *, device=None, dtype=None):
        super().__init__()
        self.linear = nn.Linear(in_features, feat_dim, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (B, C, H, W) -> (B, C*H*W)
        x = x.reshape(x.shape[0], -1).to(self.linear.weight.dtype)
        return F.normalize(self.linear(x), p=2, dim=1)


def _positive_int(name: str, value: int, hint: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}; {hint}")
    return value


class CRDLoss(DistillationLoss):
    """Contrastive representation distillation (Tian et al., ICLR 2020); see :func:`crd_loss`.

    Parts:

    * two :class:`EmbedHead` s (linear + L2 norm) mapping the student's and the teacher's
      tapped features to ``feat_dim``; built by :meth:`setup` from one batch's feature
      sizes and trained with the student (the Distiller adds them to the optimizer);
    * two memory banks, ``student_memory`` and ``teacher_memory`` of shape
      ``(n_data, feat_dim)``, keyed by ``batch.index``: each training step scores every
      sample against its own row and ``nce_k`` uniformly drawn rows of the *other*
      model's bank, then moves the batch's rows towards the new embeddings with momentum
      ``nce_m`` (:func:`update_memory_`, outside autograd);
    * ``log_normalizers``: ``log Z`` of each direction, estimated on the first training
      batch and then fixed.

    The banks and normalisers are **buffers**: they move with ``.to(device)`` and are saved
    in ``state_dict()``, so training checkpoints carry them and a resumed run continues
    with the same memory (``2 * n_data * feat_dim`` numbers: 51 MB in float32 for CIFAR-100).
    They are updated only in training mode (``loss.train()``, the default); in eval mode
    the loss is computed without changing any state.

    Args:
        student_layer: module path of the student's tapped layer (RepDistiller taps the
            pooled penultimate features).
        teacher_layer: module path of the teacher's tapped layer.
        n_data: the training set's size: one memory row per sample, and ``batch.index``
            must lie in ``[0, n_data)``.
        weight: multiplier of the loss (0.8 in RepDistiller's CIFAR-100 run).
        feat_dim: embedding width (128).
        nce_k: negatives per sample (16384).
        nce_t: temperature ``tau`` (0.07).
        nce_m: memory momentum (0.5).
    """

    nonnegative = True

    def __init__(
        self,
        student_layer: str,
        teacher_layer: str,
        n_data: int,
        *,
        weight: float = 0.8,
        feat_dim: int = 128,
        nce_k: int = 16384,
        nce_t: float = 0.07,
        nce_m: float = 0.5,
    ):
        super().__init__()
        for arg, value in (("student_layer", student_layer), ("teacher_layer", teacher_layer)):
            if not isinstance(value, str) or not value:
                raise ValueError(f"CRDLoss needs {arg} as a module path (e.g. 'avgpool'), got {value!r}")
        self.taps = {"student": student_layer, "teacher": teacher_layer}
        self.n_data = _positive_int("n_data", n_data, "pass the number of samples in the training set")
        self.weight = check_weight("weight", weight)
        self.feat_dim = _positive_int("feat_dim", feat_dim, "CRD uses 128")
        self.nce_k = _positive_int("nce_k", nce_k, "CRD uses 16384 negatives")
        t = float(nce_t)
        if not (t > 0 and math.isfinite(t)):
            raise ValueError(f"nce_t (the temperature) must be a positive number, got {nce_t!r}; CRD uses 0.07")
        self.nce_t = t
        m = float(nce_m)
        if not 0.0 <= m < 1.0:
            raise ValueError(f"nce_m (the memory momentum) must be in [0, 1), got {nce_m!r}; CRD uses 0.5")
        self.nce_m = m
        # the banks start as uniform noise in [-s, s], s = 1 / sqrt(feat_dim / 3): rows of
        # norm about 1, as in RepDistiller
        bound = 1.0 / math.sqrt(self.feat_dim / 3.0)
        self.register_buffer("student_memory", torch.rand(self.n_data, self.feat_dim).mul_(2 * bound).sub_(bound))
        self.register_buffer("teacher_memory", torch.rand(self.n_data, self.feat_dim).mul_(2 * bound).sub_(bound))
        # log Z of (student anchored on teacher memory, teacher anchored on student memory); NaN: not yet estimated
        self.register_buffer("log_normalizers", torch.full((2,), float("nan")))
        self.embed_s: EmbedHead | None = None
        self.embed_t: EmbedHead | None = None

    # ------------------------------------------------------------------ set-up
    def setup(self, student: Outputs, teacher: Outputs) -> None:
        """Build the two embedding heads from the tapped features' sizes (once)."""
        s, t = self.features(student, teacher)
        sizes = (s[0].numel(), t[0].numel())
        if self.embed_s is not None:
            have = (self.embed_s.linear.in_features, self.embed_t.linear.in_features)
            if have != sizes:
                raise ValueError(
                    f"{self.name} was set up for features of {have[0]} (student) and {have[1]} (teacher) values "
                    f"per sample, now gets {sizes[0]} and {sizes[1]}; build a new loss for other models"
                )
            return
        dtype = torch.promote_types(s.dtype, torch.float32) if s.is_floating_point() else torch.float32
        self.embed_s = EmbedHead(sizes[0], self.feat_dim, device=s.device, dtype=dtype)
        self.embed_t = EmbedHead(sizes[1], self.feat_dim, device=s.device, dtype=dtype)

    # ------------------------------------------------------------------ checks
    def _check_index(self, batch: Batch | None, batch_size: int) -> torch.Tensor:
        index = None if batch is None else batch.index
        if index is None:
            raise ValueError(
                f"{self.name} keys its memory bank by dataset position, but batch.index is None: use a "
                "loader that yields each sample's index (kdistill's loaders for arrays, tensors and "
                "Datasets do; a DataLoader must yield (inputs, targets, index))"
            )
        if index.dim() != 1 or index.shape[0] != batch_size:
            raise ValueError(
                f"batch.index must have shape ({batch_size},), one dataset position per sample, "
                f"got shape {tuple(index.shape)}"
            )
        if index.is_floating_point() or index.is_complex() or index.dtype == torch.bool:
            raise ValueError(f"batch.index must hold integer dataset positions, got dtype {index.dtype}")
        lo, hi = (int(v) for v in torch.aminmax(index))
        if lo < 0 or hi >= self.n_data:
            raise ValueError(
                f"batch.index holds dataset positions from {lo} to {hi}, but {self.name} was built with "
                f"n_data={self.n_data} memory rows (positions 0 to {self.n_data - 1}): pass n_data=len(train_set), "
                "the size of the data being distilled on"
            )
        return index.to(self.student_memory.device).long()

    def _require_setup(self) -> None:
        if self.embed_s is None:
            raise RuntimeError(
                f"{self.name} has no embedding heads yet: call setup(student_outputs, teacher_outputs) with one "
                "batch's outputs first (the Distiller does this before training); it sizes the heads from the features"
            )

    # ------------------------------------------------------------------ loss
    def named_terms(self, student: Outputs, teacher: Outputs, batch: Batch | None = None) -> dict[str, torch.Tensor]:
        """The two directions, ``CRDLoss/student_anchor`` and ``CRDLoss/teacher_anchor`` (weighted).

        In training mode this also sets the normalisers (first batch) and updates the
        memory rows of the batch, so call it *or* :meth:`forward` once per step.
        """
        s, t = self.features(student, teacher)
        self._require_setup()
        index = self._check_index(batch, s.shape[0])
        if t.is_inference():  # a teacher run under torch.inference_mode: autograd cannot save it
            t = t.clone()
        # 1. embed both sides: (B, ...) -> (B, feat_dim), unit norm
        v_s = self.embed_s(s)
        v_t = self.embed_t(t)
        # 2. positive + nce_k uniform negatives per sample: (B,) -> (B, 1 + nce_k)
        contrast_index = sample_contrast_index(index, self.n_data, self.nce_k)
        # 3. scores against the other model's memory: (B, 1 + nce_k)
        logits_s = contrast_logits(v_s, self.teacher_memory, contrast_index, self.nce_t)
        logits_t = contrast_logits(v_t, self.student_memory, contrast_index, self.nce_t)
        # 4. the normalisers Z: estimated on the first training batch, then fixed
        log_z = self.log_normalizers
        if torch.isnan(log_z).any():
            log_z = torch.stack(
                [estimate_log_normalizer(logits_s, self.n_data), estimate_log_normalizer(logits_t, self.n_data)]
            )
            if self.training:
                self.log_normalizers.copy_(log_z)
        log_z = log_z.to(logits_s.dtype)
        # 5. NCE in both directions
        terms = {
            f"{self.name}/student_anchor": self.weight * nce_loss(logits_s, log_z[0], self.n_data),
            f"{self.name}/teacher_anchor": self.weight * nce_loss(logits_t, log_z[1], self.n_data),
        }
        # 6. move the batch's memory rows towards the new embeddings (no autograd)
        if self.training:
            update_memory_(self.student_memory, index, v_s, self.nce_m)
            update_memory_(self.teacher_memory, index, v_t, self.nce_m)
        return terms

    def forward(self, student: Outputs, teacher: Outputs, batch: Batch | None = None) -> torch.Tensor:
        terms = self.named_terms(student, teacher, batch)
        return terms[f"{self.name}/student_anchor"] + terms[f"{self.name}/teacher_anchor"]

    def extra_repr(self) -> str:
        return (
            f"student_layer={self.taps['student']!r}, teacher_layer={self.taps['teacher']!r}, n_data={self.n_data}, "
            f"weight={self.weight}, feat_dim={self.feat_dim}, nce_k={self.nce_k}, nce_t={self.nce_t}, nce_m={self.nce_m}"
        )


__all__ = [
    "CRDLoss",
    "EmbedHead",
    "contrast_logits",
    "crd_loss",
    "estimate_log_normalizer",
    "nce_loss",
    "sample_contrast_index",
    "update_memory_",
]
