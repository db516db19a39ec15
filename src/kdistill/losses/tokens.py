"""Token-level distillation losses for language models.

Each divergence compares, at every trained-on token position, the student's and the
teacher's next-token distributions over the vocabulary, ``p = softmax(z / T)``:

* :func:`token_kl_loss`: forward KL ``KL(p_t || p_s)`` (Hinton et al. 2015) or reverse KL
  ``KL(p_s || p_t)`` (MiniLLM, Gu et al. 2024);
* :func:`generalized_jsd_loss`: the generalized Jensen-Shannon divergence of GKD (Agarwal
  et al. 2024), from forward KL (``beta = 0``) to reverse KL (``beta = 1``);
* :func:`skew_kl_loss`: skew forward / reverse KL of DistiLLM (Ko et al. 2024);
* :func:`total_variation_loss`: ``0.5 * sum_v |p_t - p_s|``.

Each is a pure function with a :class:`~kdistill.losses.base.DistillationLoss` module
beside it. Masks and reductions follow one rule: a position counts where the mask is true
(for a module, where ``batch.targets >= 0``; every position when the batch has no per-token
targets), ``reduction="mean"`` averages over the counted positions of the tensors given
(0, with a zero gradient, when none counts) and ``reduction="sum"`` adds them up.

Language-model logits are large (``B * T * V`` entries: 8 x 512 x 32000 is 131M, 0.5 GiB
in float32), and the plain computation keeps several float32 tensors of that size for the
backward pass. These losses are therefore computed over chunks of token positions by a
custom :class:`torch.autograd.Function`: each chunk's loss and its gradient with respect to
the chunk's student logits are computed right away and the gradient written into one
``(N, V)`` buffer in the student logits' dtype, so the extra memory is that buffer plus one
chunk's intermediates (see :data:`DEFAULT_CHUNK_ELEMENTS`).
"""

from __future__ import annotations

import math
from typing import Callable, ClassVar

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from ..outputs import Batch, Outputs, TopKLogits
from .base import DistillationLoss, compute_dtype
from .logits import check_temperature

#: Logits per chunk when ``chunk_size=None``: ``2**23`` (8M entries, 32 MiB per float32
#: tensor), i.e. ``2**23 // V`` token positions per chunk (262 for a 32000-entry vocabulary,
#: 55 for 151936). When all positions fit in one chunk the plain computation is used. On a
#: 2-core CPU this size was faster than both half of it (twice the operations, each with its
#: fixed cost) and twice it (tensors above 32 MiB are mapped from the operating system
#: afresh by glibc's allocator at every allocation).
DEFAULT_CHUNK_ELEMENTS = 2**23

_REDUCTIONS = ("mean", "sum")
_DIRECTIONS = ("forward", "reverse")



# ------------------------------------------------------------------------------ checks


def check_vocabularies(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> None:
    """Raise a ``ValueError`` unless student and teacher logits have the same shape (only
    ``.shape`` is read: a :class:`~kdistill.outputs.TopKLogits` or an ``Outputs`` will do).

    Args:
        student_logits: ``(B, T, V_s)`` (or ``(B, C)``) scores of the student.
        teacher_logits: ``(B, T, V_t)`` scores of the teacher.

    Raises:
        ValueError: the vocabularies differ (naming both sizes and how to fix it), or the
            positions differ (naming both shapes).
    """
    if student_logits.shape == teacher_logits.shape:
        return
    s, t = student_logits.shape[-1], teacher_logits.shape[-1]
    if s != t:
        raise ValueError(
            f"the student's vocabulary has {s} entries and the teacher's {t}: a token loss compares the two "
            "distributions entry by entry, so both must score the same vocabulary. If both models share one "
            "tokenizer and a head is padded, pass vocab_size=<tokenizer size> to Distiller.compile "
            "(YAML: stages.distil.vocab_size), which compares the first vocab_size logits of each; otherwise the "
            "models need the same tokenizer"
        )
    raise ValueError(
        f"student logits have shape {tuple(student_logits.shape)} and teacher logits "
        f"{tuple(teacher_logits.shape)}: both must score the same positions of the same batch "
        "(same sequences, same length)"
    )


def _check_fraction(name: str, value: float, meaning: str, *, upper_open: bool = False) -> float:
    """``value`` as a float in ``[0, 1]`` (``[0, 1)`` with ``upper_open``), else a ``ValueError``."""
    try:
        if isinstance(value, (str, bytes)):
            raise TypeError
        v = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}") from None
    ok = 0.0 <= v < 1.0 if upper_open else 0.0 <= v <= 1.0
    if not ok:  # NaN fails too
        interval = "[0, 1)" if upper_open else "[0, 1]"
        raise ValueError(f"{name} must be in {interval}, got {value!r}: {meaning}")
    return v


def _check_direction(direction: str) -> str:
    if direction not in _DIRECTIONS:
        raise ValueError(
            f"direction must be 'forward' (KL(teacher || student), mode-covering) or 'reverse' "
            f"(KL(student || teacher), mode-seeking), got {direction!r}"
        )
    return direction


def _check_chunk_size(chunk_size: int | None) -> int | None:
    if chunk_size is None:
        return None
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 0:
        raise ValueError(
            f"chunk_size must be a whole number of token positions >= 0, got {chunk_size!r}: "
            "None picks one (DEFAULT_CHUNK_ELEMENTS logits per chunk), 0 computes all positions at once"
        )
    return chunk_size


def _chunk_rows(chunk_size: int | None, vocab: int, rows: int) -> int:
    """Positions per chunk; 0 for the plain (unchunked) computation."""
    if chunk_size is None:
        per_chunk = max(1, DEFAULT_CHUNK_ELEMENTS // max(vocab, 1))
        return 0 if rows <= per_chunk else per_chunk  # one chunk: nothing to save
    return chunk_size


# ------------------------------------------------------------------- divergences per row
# Each takes the (n, V) log-probabilities of both sides and returns the (n,) divergence of
# every row. Mixtures are formed in log space, so tiny probabilities stay exact.


def _kl_rows(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """``sum_v p_v (log p_v - log q_v)`` per row, with ``0 log 0 = 0`` (a ``-inf`` logit of
    ``p``'s side contributes nothing, and no NaN)."""
    p = log_p.exp()
    # the log ratio is set to 0 where p is 0 (not the product: its backward would be 0 * inf)
    return (p * torch.where(p > 0, log_p - log_q, 0.0)).sum(dim=-1)


def _log_mix(log_a: torch.Tensor, log_b: torch.Tensor, weight_a: float) -> torch.Tensor:
    """``log(w * a + (1 - w) * b)`` from ``log a`` and ``log b``, for ``0 < w < 1``."""
    return torch.logaddexp(log_a + math.log(weight_a), log_b + math.log1p(-weight_a))


def _forward_kl_rows(log_p_s: torch.Tensor, log_p_t: torch.Tensor) -> torch.Tensor:
    return _kl_rows(log_p_t, log_p_s)


def _reverse_kl_rows(log_p_s: torch.Tensor, log_p_t: torch.Tensor) -> torch.Tensor:
    return _kl_rows(log_p_s, log_p_t)


# The two KLs also come with their gradient in closed form, with respect to the softened
# student logits u = z_s / T (what the chunked path uses instead of a backward pass):
#   forward: d/du KL(p_t || p_s) = p_s - p_t
#   reverse: d/du KL(p_s || p_t) = p_s * (d - sum_v p_s d),  d = log p_s - log p_t


def _forward_kl_rows_and_grad(log_p_s: torch.Tensor, log_p_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    p_t = log_p_t.exp()
    rows = (p_t * torch.where(p_t > 0, log_p_t - log_p_s, 0.0)).sum(dim=-1)
    return rows, log_p_s.exp_().sub_(p_t)  # log_p_s is not needed after this


def _reverse_kl_rows_and_grad(log_p_s: torch.Tensor, log_p_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    p_s = log_p_s.exp()
    d = torch.where(p_s > 0, log_p_s - log_p_t, 0.0)
    rows = (p_s * d).sum(dim=-1)
    return rows, d.sub_(rows.unsqueeze(-1)).mul_(p_s)


#: The divergences whose gradient is written out above.
_CLOSED_FORM = {_forward_kl_rows: _forward_kl_rows_and_grad, _reverse_kl_rows: _reverse_kl_rows_and_grad}


def _gjsd_rows(beta: float) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    if beta == 0.0:  # the mixture form vanishes at the ends; by definition these are the KLs
        return _forward_kl_rows
    if beta == 1.0:
        return _reverse_kl_rows

    def rows(log_p_s: torch.Tensor, log_p_t: torch.Tensor) -> torch.Tensor:
        log_m = _log_mix(log_p_t, log_p_s, beta)  # m = beta * p_t + (1 - beta) * p_s
        return beta * _kl_rows(log_p_t, log_m) + (1.0 - beta) * _kl_rows(log_p_s, log_m)

    return rows


def _skew_rows(lam: float, direction: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    if lam == 0.0:  # no skew: the plain KL of that direction
        return _forward_kl_rows if direction == "forward" else _reverse_kl_rows
    if direction == "forward":

        def rows(log_p_s: torch.Tensor, log_p_t: torch.Tensor) -> torch.Tensor:
            return _kl_rows(log_p_t, _log_mix(log_p_t, log_p_s, lam))  # KL(p_t || lam p_t + (1 - lam) p_s)

    else:

        def rows(log_p_s: torch.Tensor, log_p_t: torch.Tensor) -> torch.Tensor:
            return _kl_rows(log_p_s, _log_mix(log_p_s, log_p_t, lam))  # KL(p_s || lam p_s + (1 - lam) p_t)

    return rows


def _tv_rows(log_p_s: torch.Tensor, log_p_t: torch.Tensor) -> torch.Tensor:
    return 0.5 * (log_p_s.exp() - log_p_t.exp()).abs().sum(dim=-1)


class _Softened:
    """A divergence applied to logits: log-softmax of ``z / T`` on both sides, then the
    divergence of each row; with the gradient of a chunk's scaled sum, for the chunked path."""

    def __init__(self, divergence: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], temperature: float):
        self.divergence = divergence
        self.temperature = temperature
        self.closed_form = _CLOSED_FORM.get(divergence)

    def _log_probs(self, student: torch.Tensor, teacher: "torch.Tensor | _SparseRows"
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        t = self.temperature
        if isinstance(teacher, _SparseRows):
            return F.log_softmax(student if t == 1.0 else student / t, dim=-1), teacher.dense_log_probs(t, student.dtype)
        if t != 1.0:  # x / 1 is x: no copy
            student, teacher = student / t, teacher / t
        return F.log_softmax(student, dim=-1), F.log_softmax(teacher, dim=-1)

    def __call__(self, student: torch.Tensor, teacher: "torch.Tensor | _SparseRows") -> torch.Tensor:
        """``(n, V), (n, V) -> (n,)``: the divergence of each row (differentiable); the
        teacher's rows dense or sparse (:class:`_SparseRows`)."""
        return self.divergence(*self._log_probs(student, teacher))

    def value_and_grad(
        self, student: torch.Tensor, teacher: "torch.Tensor | _SparseRows", scale: float, needs_grad: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``scale * sum`` of the rows' divergences, and its gradient w.r.t. ``student``
        (``None`` unless ``needs_grad``): in closed form where there is one, else by autograd
        on a detached copy of the chunk."""
        sparse_form = _SPARSE_CLOSED_FORM.get(self.divergence) if isinstance(teacher, _SparseRows) else None
        if sparse_form is not None:  # neither the teacher's (n, V) log-probabilities nor autograd
            t = self.temperature
            rows, grad_u = sparse_form(F.log_softmax(student if t == 1.0 else student / t, dim=-1), teacher, t)
            return rows.sum() * scale, (grad_u.mul_(scale / t) if needs_grad else None)
        if not needs_grad:
            return self(student, teacher).sum() * scale, None
        if self.closed_form is not None:
            rows, grad_u = self.closed_form(*self._log_probs(student, teacher))
            return rows.sum() * scale, grad_u.mul_(scale / self.temperature)  # du/dz = 1 / T
        leaf = student.detach().requires_grad_()
        with torch.enable_grad():
            value = self(leaf, teacher).sum() * scale
        (grad,) = torch.autograd.grad(value, leaf)
        return value.detach(), grad


# ------------------------------------------------------------- a sparse (top-k) teacher
# A TopKLogits teacher gives, per position, k logits at ids and one logit ("fill") for each
# of the other c = V - k tokens. Softened at T, its log-probabilities are
#   lt_top = values / T - lse,  lt_fill = fill / T - lse,
#   lse = log(sum_k exp(values / T) + c * exp(fill / T)),
# and the divergences below use them without building the (n, V) teacher: the forward
# KL's tail sum is the fill's probability times (c * lt_fill - the student's log-probs
# summed over the c tail tokens), and that sum is the row's total minus its top k.


class _SparseRows:
    """The rows of a sparse teacher that a chunk of counted positions needs."""

    def __init__(self, topk: TopKLogits, rows: torch.Tensor | None):
        self.ids, self.values, self.fill = topk.ids, topk.values, topk.fill
        self.vocab = topk.vocab_size
        self.rows = rows  # the sparse row of each counted position; None: the same order

    def __len__(self) -> int:
        return self.ids.shape[0] if self.rows is None else self.rows.numel()

    def chunk(self, start: int, stop: int, device: torch.device) -> "_SparseRows":
        if self.rows is None:
            part = slice(start, stop)
            ids, values, fill = self.ids[part], self.values[part], self.fill[part]
        else:
            index = self.rows[start:stop]
            ids, values, fill = self.ids[index], self.values[index], self.fill[index]
        out = object.__new__(_SparseRows)
        out.ids, out.values, out.fill = ids.to(device), values.to(device), fill.to(device)
        out.vocab, out.rows = self.vocab, None
        return out

    def log_probs(self, temperature: float, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, int]:
        """``(lt_top (n, k), lt_fill (n,), c)``: the log-probabilities at ``T`` of the top k
        and of each of the ``c`` other tokens."""
        v, f = self.values.to(dtype) / temperature, self.fill.to(dtype) / temperature
        c = self.vocab - v.shape[-1]
        if c > 0:
            lse = torch.logsumexp(torch.cat([v, (f + math.log(c)).unsqueeze(-1)], dim=-1), dim=-1)
        else:
            lse = torch.logsumexp(v, dim=-1)
        return v - lse.unsqueeze(-1), f - lse, c

    def dense_log_probs(self, temperature: float, dtype: torch.dtype) -> torch.Tensor:
        """``(n, V)``: the same log-probabilities written out (for divergences without a
        sparse form)."""
        lt_top, lt_fill, _ = self.log_probs(temperature, dtype)
        out = lt_fill.unsqueeze(-1).expand(lt_fill.shape[0], self.vocab).clone()
        return out.scatter_(-1, self.ids, lt_top)


def _sparse_forward_kl(ls_top: torch.Tensor, total: torch.Tensor, lt_top: torch.Tensor, lt_fill: torch.Tensor,
                       c: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``KL(p_t || p_s)`` per row for a sparse teacher, and ``p_t``'s top-k and fill
    probabilities, from the student's log-probabilities at the top k (``ls_top``, ``(n, k)``)
    and summed over the vocabulary (``total``, ``(n,)``)."""
    p_top = lt_top.exp()
    rows = (p_top * torch.where(p_top > 0, lt_top - ls_top, 0.0)).sum(dim=-1)
    if c == 0:
        return rows, p_top, torch.zeros_like(lt_fill)
    p_fill = lt_fill.exp()
    tail = c * lt_fill - (total - ls_top.sum(dim=-1))  # sum over the c tail tokens of (lt_fill - log p_s)
    return rows + torch.where(p_fill > 0, p_fill * tail, 0.0), p_top, p_fill


def _sparse_forward_kl_and_grad(log_p_s: torch.Tensor, chunk: _SparseRows, temperature: float
                                ) -> tuple[torch.Tensor, torch.Tensor]:
    lt_top, lt_fill, c = chunk.log_probs(temperature, log_p_s.dtype)
    rows, p_top, p_fill = _sparse_forward_kl(log_p_s.gather(-1, chunk.ids), log_p_s.sum(dim=-1), lt_top, lt_fill, c)
    grad = log_p_s.exp_()  # p_s - p_t: the fill's probability everywhere, the top k's at theirs
    s_top = grad.gather(-1, chunk.ids)
    grad.sub_(p_fill.unsqueeze(-1)).scatter_(-1, chunk.ids, s_top - p_top)
    return rows, grad


def _sparse_reverse_kl_and_grad(log_p_s: torch.Tensor, chunk: _SparseRows, temperature: float
                                ) -> tuple[torch.Tensor, torch.Tensor]:
    lt_top, lt_fill, _ = chunk.log_probs(temperature, log_p_s.dtype)
    p_s = log_p_s.exp()
    # d = log p_s - log p_t: the fill's log-probability everywhere, the top k's at theirs
    d = torch.where(p_s > 0, log_p_s - lt_fill.unsqueeze(-1), 0.0)
    d.scatter_(-1, chunk.ids, torch.where(p_s.gather(-1, chunk.ids) > 0, log_p_s.gather(-1, chunk.ids) - lt_top, 0.0))
    rows = (p_s * d).sum(dim=-1)
    return rows, d.sub_(rows.unsqueeze(-1)).mul_(p_s)


#: The divergences with a sparse form (value and gradient w.r.t. u = z_s / T).
_SPARSE_CLOSED_FORM = {_forward_kl_rows: _sparse_forward_kl_and_grad, _reverse_kl_rows: _sparse_reverse_kl_and_grad}


class _SparseKLOnLogProbs(torch.autograd.Function):
    """``scale * sum`` over counted rows of ``KL(p_t || p_s)`` for a sparse teacher, from
    the student's log-probabilities ``log_p_s`` ``(N, V)`` as already computed (with their
    graph) for the hard-label loss: one sum over ``V`` in the forward pass, and in the
    backward pass the gradient ``-scale * p_t`` with respect to ``log_p_s``, which autograd
    adds to the label loss's before the one log-softmax backward."""

    @staticmethod
    def forward(ctx, log_p_s: torch.Tensor, rows: torch.Tensor | None, sparse: _SparseRows,  # type: ignore[override]
                temperature: float, scale: float) -> torch.Tensor:
        sparse = sparse.chunk(0, len(sparse), log_p_s.device)  # its rows in the counted positions' order
        ids = sparse.ids
        dtype = compute_dtype(log_p_s)
        lt_top, lt_fill, c = sparse.log_probs(temperature, dtype)
        total = log_p_s.sum(dim=-1, dtype=dtype)  # (N,): one read of the log-probabilities
        if rows is None:
            ls_top = log_p_s.gather(-1, ids)
        else:
            ls_top, total = log_p_s[rows.unsqueeze(-1), ids], total[rows]
        value, p_top, p_fill = _sparse_forward_kl(ls_top.to(dtype), total, lt_top, lt_fill, c)
        ctx.save_for_backward(ids, p_top, p_fill, rows if rows is not None else ids.new_empty(0))
        ctx.has_rows, ctx.scale, ctx.shape = rows is not None, scale, log_p_s.shape
        return value.sum() * scale

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output: torch.Tensor):  # type: ignore[override]
        ids, p_top, p_fill, rows = ctx.saved_tensors
        factor = -ctx.scale * grad_output
        n = ctx.shape[0]
        fills = p_fill.new_zeros(n)
        if ctx.has_rows:
            fills[rows] = p_fill * factor
            grad = fills.unsqueeze(-1).expand(ctx.shape).clone()
            grad[rows.unsqueeze(-1), ids] = p_top * factor
        else:
            grad = (p_fill * factor).unsqueeze(-1).expand(ctx.shape).clone()
            grad.scatter_(-1, ids, p_top * factor)
        return grad, None, None, None, None


# ---------------------------------------------------------------------- chunked autograd


class _ChunkedTokenLoss(torch.autograd.Function):
    """``scale * sum_rows per_row(student[rows], teacher[rows])``, computed over chunks of
    rows; each chunk's gradient with respect to the student is computed in the forward pass
    and written into one preallocated buffer, which the backward pass scales."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        student: torch.Tensor,
        teacher: "torch.Tensor | _SparseRows",
        rows: torch.Tensor | None,
        per_row: "_Softened",
        scale: float,
        chunk: int,
        dtype: torch.dtype,
    ) -> torch.Tensor:
        # student, teacher: (N, V) (teacher: or the sparse rows of the n counted positions);
        # rows: (n,) indices of the positions that count, None for all
        needs_grad = ctx.needs_input_grad[0]
        grad = None
        if needs_grad:
            # (N, V) in the student's dtype; rows that do not count keep a zero gradient
            grad = torch.empty_like(student) if rows is None else torch.zeros_like(student)
        total = torch.zeros((), dtype=dtype, device=student.device)
        n = student.shape[0] if rows is None else rows.numel()
        for start in range(0, n, chunk):
            # 1. one chunk of both sides, upcast to the compute dtype: (n_c, V)
            if rows is None:
                index = None
                s_c = student[start : start + chunk]
            else:
                index = rows[start : start + chunk]
                s_c = student.index_select(0, index)
            if isinstance(teacher, _SparseRows):  # its rows are in the counted positions' order
                t_c = teacher.chunk(start, start + chunk, student.device)
            else:
                t_c = (teacher[start : start + chunk] if index is None else teacher.index_select(0, index)).to(dtype)
            # 2. its loss, and at once its gradient w.r.t. the chunk's student logits
            value, g = per_row.value_and_grad(s_c.detach().to(dtype), t_c, scale, needs_grad)
            if g is not None:
                if index is None:
                    grad[start : start + chunk].copy_(g)
                else:
                    grad.index_copy_(0, index, g.to(grad.dtype))
            total += value
        # saved (not an attribute of ctx), so autograd frees the buffer once backward has run
        if grad is not None:
            ctx.save_for_backward(grad)
        return total

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output: torch.Tensor):  # type: ignore[override]
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None, None, None
        (grad,) = ctx.saved_tensors
        # out of place: the buffer stays valid for a second backward (retain_graph=True);
        # a 0-dim grad_output keeps the buffer's dtype
        return grad * grad_output, None, None, None, None, None, None


def token_loss(
    divergence: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | TopKLogits,
    temperature: float,
    *,
    temperature_squared: bool = True,
    mask: torch.Tensor | None = None,
    reduction: str = "mean",
    chunk_size: int | None = None,
    student_log_probs: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reduce a per-position divergence over the counted positions, chunked or not.

    The machinery shared by this module's losses (and usable for your own): ``divergence``
    takes the ``(n, V)`` log-probabilities ``log softmax(z_s / T)`` and
    ``log softmax(z_t / T)`` and returns the ``(n,)`` divergence of each row.

    A sparse teacher (:class:`~kdistill.outputs.TopKLogits`, e.g. from a
    :class:`~kdistill.teacher.TokenCache`) is read as it is: the forward and reverse KL
    have a sparse form (no ``(n, V)`` teacher tensor at all); the other divergences build
    one chunk's teacher log-probabilities at a time. Its rows must cover the counted
    positions.

    Args:
        divergence: ``divergence(log_p_s, log_p_t) -> (n,)``, one value per row.
        student_logits: ``(B, T, V)`` (or ``(B, C)``) raw scores of the student.
        teacher_logits: the teacher's scores, same shape (detached: a fixed target), or a
            :class:`~kdistill.outputs.TopKLogits` of that shape.
        temperature: softening temperature ``T > 0``.
        temperature_squared: multiply by ``T^2``.
        mask: optional boolean mask of the positions that count, ``(B, T)`` (or ``(B,)``).
        reduction: ``"mean"`` over the counted positions, or their ``"sum"``.
        chunk_size: token positions per chunk; ``None`` picks one
            (:data:`DEFAULT_CHUNK_ELEMENTS`), ``0`` computes everything at once with plain
            autograd.
        student_log_probs: ``log_softmax(student_logits / T)`` with its graph, when it is
            already computed (the hard-label loss's, at ``T = 1``): with a sparse teacher the
            forward KL then reads it instead of computing its own (one sum over the
            vocabulary and a sparse gradient; not chunked, as the label loss is not).

    Returns:
        A scalar in the compute dtype (float32 for half-precision logits).

    Raises:
        ValueError: the vocabularies or positions differ, a bad mask, a sparse teacher
            without rows at counted positions.
    """
    t = check_temperature(temperature)
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be 'mean' (over the counted positions) or 'sum', got {reduction!r}")
    chunk_size = _check_chunk_size(chunk_size)
    check_vocabularies(student_logits, teacher_logits)
    sparse = isinstance(teacher_logits, TopKLogits)
    vocab = student_logits.shape[-1]
    # (B, T, V) -> (N, V): every position is one row
    student = student_logits.reshape(-1, vocab)
    rows, count = None, student.shape[0]
    if mask is not None:
        positions = tuple(student_logits.shape[:-1])
        if tuple(mask.shape) != positions:
            raise ValueError(
                f"mask has shape {tuple(mask.shape)} but the logits have {positions} positions (their shape "
                "without the vocabulary axis); pass one boolean per token position, e.g. targets >= 0"
            )
        keep = mask.to(device=student.device, dtype=torch.bool).reshape(-1)
        rows = keep.nonzero().squeeze(1)  # (n,) the positions that count
        count = rows.numel()
        if count == student.shape[0]:
            rows = None  # all of them: no copies
    scale = (t * t if temperature_squared else 1.0) / (max(count, 1) if reduction == "mean" else 1)
    loss_rows = _Softened(divergence, t)
    chunk = _chunk_rows(chunk_size, vocab, count)
    if sparse:
        teacher = _SparseRows(teacher_logits, teacher_logits.rows_of(rows))
        dtype = compute_dtype(student)
        if student_log_probs is not None and divergence is _forward_kl_rows and chunk_size != 0:
            return _SparseKLOnLogProbs.apply(student_log_probs.reshape(-1, vocab), rows, teacher, t, scale)
        if chunk_size == 0:  # plain autograd, the teacher's log-probabilities written out
            if rows is not None:
                student = student.index_select(0, rows)
            return loss_rows(student.to(dtype), teacher.chunk(0, count, student.device)).sum() * scale
        # one chunk or more: the sparse forms need no (n, V) teacher tensor and no autograd graph
        return _ChunkedTokenLoss.apply(student, teacher, rows, loss_rows, scale, chunk or max(count, 1), dtype)
    teacher = teacher_logits.detach().reshape(-1, vocab)
    dtype = torch.promote_types(compute_dtype(student), compute_dtype(teacher))
    if chunk == 0:
        # plain autograd over all counted positions at once
        if rows is not None:
            student, teacher = student.index_select(0, rows), teacher.index_select(0, rows)
        return loss_rows(student.to(dtype), teacher.to(dtype)).sum() * scale
    return _ChunkedTokenLoss.apply(student, teacher, rows, loss_rows, scale, chunk, dtype)


# ---------------------------------------------------------------------- the losses


def token_kl_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 1.0,
    *,
    direction: str = "forward",
    temperature_squared: bool = True,
    mask: torch.Tensor | None = None,
    reduction: str = "mean",
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Forward or reverse KL between the teacher's and the student's token distributions.

    * forward: ``L = T^2 * mean_i KL(p_t(i) || p_s(i))`` (Hinton, Vinyals & Dean 2015,
      "Distilling the Knowledge in a Neural Network", arXiv:1503.02531), the same value as
      :func:`~kdistill.losses.kd_loss`. Mode-covering: the student is pushed to put mass
      wherever the teacher has some.
    * reverse: ``L = T^2 * mean_i KL(p_s(i) || p_t(i))`` (Gu, Dong, Wei & Huang 2024,
      "MiniLLM: Knowledge Distillation of Large Language Models", ICLR 2024,
      arXiv:2306.08543). Mode-seeking: the student is penalised for mass where the teacher
      has little, not for leaving some of the teacher's modes out.

    ``p = softmax(z / T)`` over the vocabulary, ``KL(p || q) = sum_v p_v (log p_v - log q_v)``,
    ``i`` runs over the positions where ``mask`` is true. ``T`` is the loss's softening
    temperature, separate from any sampling temperature used to generate the sequences.
    Computed over chunks of positions (see the module's description); the value and the
    gradient equal the unchunked ones up to float rounding.

    Args:
        student_logits: ``(B, T, V)`` raw scores of the student (or ``(B, C)``); float16,
            bfloat16, float32 or float64 (half precision is computed in float32).
        teacher_logits: the teacher's scores, same shape (detached: a fixed target).
        temperature: softening temperature ``T > 0`` (1, as in MiniLLM, GKD and DistiLLM).
        direction: ``"forward"`` (``KL(p_t || p_s)``) or ``"reverse"`` (``KL(p_s || p_t)``).
        temperature_squared: multiply by ``T^2`` (Hinton et al.'s scaling, as
            :func:`~kdistill.losses.kd_loss`); ``False`` for the unscaled divergence.
        mask: optional ``(B, T)`` boolean mask of the positions that count (e.g.
            ``targets >= 0``); ``None``: all.
        reduction: ``"mean"`` over the counted positions (0 when none counts) or ``"sum"``.
        chunk_size: token positions per chunk; ``None`` picks a size
            (:data:`DEFAULT_CHUNK_ELEMENTS`), ``0`` computes all positions at once.

    Returns:
        A scalar (float32 for half-precision logits, else the logits' dtype).

    Raises:
        ValueError: the vocabularies (or shapes) differ, ``T <= 0``, an unknown
            ``direction`` or ``reduction``, or a mask of the wrong shape.
    """
    rows = _forward_kl_rows if _check_direction(direction) == "forward" else _reverse_kl_rows
    return token_loss(
        rows, student_logits, teacher_logits, temperature, temperature_squared=temperature_squared,
        mask=mask, reduction=reduction, chunk_size=chunk_size,
    )


def generalized_jsd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    beta: float = 0.5,
    temperature: float = 1.0,
    *,
    temperature_squared: bool = True,
    mask: torch.Tensor | None = None,
    reduction: str = "mean",
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Generalized Jensen-Shannon divergence of GKD: Agarwal, Vieillard, Zhou, Stanczyk,
    Ramos, Geist & Bachem (2024), "On-Policy Distillation of Language Models: Learning from
    Self-Generated Mistakes", ICLR 2024, arXiv:2306.13649 (Eq. 1).

    With the mixture ``m = beta * p_t + (1 - beta) * p_s``:

    ``JSD_beta = beta * KL(p_t || m) + (1 - beta) * KL(p_s || m)``,
    ``L = T^2 * mean_i JSD_beta(i)``,

    and at the ends, where the mixture form vanishes, by definition ``JSD_0 = KL(p_t || p_s)``
    (forward KL, mode-covering) and ``JSD_1 = KL(p_s || p_t)`` (reverse KL, mode-seeking).
    This is the convention of TRL's ``GKDTrainer.generalized_jsd_loss``, whose values this
    function reproduces (with ``temperature_squared=False``: TRL does not scale by ``T^2``).
    ``m`` is computed in log space (``logaddexp(log p_t + log beta, log p_s + log(1 - beta))``).
    The gradient also flows through the student's share of ``m``. ``T`` is the loss's
    softening temperature, separate from the sampling temperature of on-policy generation.

    Args:
        student_logits: ``(B, T, V)`` raw scores of the student (or ``(B, C)``).
        teacher_logits: the teacher's scores, same shape (detached: a fixed target).
        beta: ``in [0, 1]``; 0 is forward KL, 1 reverse KL, 0.5 the symmetric
            Jensen-Shannon divergence.
        temperature: softening temperature ``T > 0``.
        temperature_squared: multiply by ``T^2``.
        mask: optional ``(B, T)`` boolean mask of the positions that count.
        reduction: ``"mean"`` over the counted positions (0 when none counts) or ``"sum"``.
        chunk_size: token positions per chunk (``None``: automatic, ``0``: unchunked).

    Returns:
        A scalar.

    Raises:
        ValueError: the vocabularies differ, ``beta`` outside ``[0, 1]``, ``T <= 0``, an
            unknown ``reduction``, or a mask of the wrong shape.
    """
    b = _check_fraction("beta", beta, "0 is forward KL(teacher || student), 1 reverse KL(student || teacher)")
    return token_loss(
        _gjsd_rows(b), student_logits, teacher_logits, temperature, temperature_squared=temperature_squared,
        mask=mask, reduction=reduction, chunk_size=chunk_size,
    )


def skew_kl_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    lam: float = 0.1,
    temperature: float = 1.0,
    *,
    direction: str = "forward",
    temperature_squared: bool = True,
    mask: torch.Tensor | None = None,
    reduction: str = "mean",
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Skew KL of DistiLLM: Ko, Kim, Chen & Yun (2024), "DistiLLM: Towards Streamlined
    Distillation for Large Language Models", ICML 2024, arXiv:2402.03898.

    * forward: ``SKL = KL(p_t || lam * p_t + (1 - lam) * p_s)``;
    * reverse: ``SRKL = KL(p_s || lam * p_s + (1 - lam) * p_t)``;

    ``L = T^2 * mean_i SKL(i)`` (or ``SRKL``). Mixing a share ``lam`` of the first
    distribution into the second keeps the divergence finite and its gradient bounded where
    the second has (almost) no mass, which the paper shows stabilises training; ``lam = 0``
    is the plain KL of that direction. DistiLLM's code returns the cross-entropy
    ``-sum_v p_t log m`` for the forward skew KL, which differs from ``SKL`` by the
    teacher's entropy, a constant: the gradients are the same. The mixture is formed in log
    space; the gradient also flows through the student's share of it.

    Args:
        student_logits: ``(B, T, V)`` raw scores of the student (or ``(B, C)``).
        teacher_logits: the teacher's scores, same shape (detached: a fixed target).
        lam: skew ``in [0, 1)``, the share of the first distribution in the mixture (0.1 in
            the paper).
        temperature: softening temperature ``T > 0`` (separate from any sampling temperature).
        direction: ``"forward"`` (SKL) or ``"reverse"`` (SRKL).
        temperature_squared: multiply by ``T^2``.
        mask: optional ``(B, T)`` boolean mask of the positions that count.
        reduction: ``"mean"`` over the counted positions (0 when none counts) or ``"sum"``.
        chunk_size: token positions per chunk (``None``: automatic, ``0``: unchunked).

    Returns:
        A scalar.

    Raises:
        ValueError: the vocabularies differ, ``lam`` outside ``[0, 1)``, ``T <= 0``, an
            unknown ``direction`` or ``reduction``, or a mask of the wrong shape.
    """
    lam_ = _check_fraction("lam", lam, "the share of the first distribution in the mixture; 1 would compare "
                           "a distribution with itself (always 0)", upper_open=True)
    return token_loss(
        _skew_rows(lam_, _check_direction(direction)), student_logits, teacher_logits, temperature,
        temperature_squared=temperature_squared, mask=mask, reduction=reduction, chunk_size=chunk_size,
    )


def total_variation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 1.0,
    *,
    temperature_squared: bool = True,
    mask: torch.Tensor | None = None,
    reduction: str = "mean",
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Total variation distance: ``L = T^2 * mean_i 0.5 * sum_v |p_t(i)_v - p_s(i)_v|``.

    Symmetric and bounded in ``[0, 1]`` per position; used as a distillation objective for
    language models by Wen, Li, Du & Mou (2023), "f-Divergence Minimization for
    Sequence-Level Knowledge Distillation", ACL 2023, arXiv:2307.15190, and among DistiLLM's
    baselines (Ko et al. 2024).

    Args:
        student_logits: ``(B, T, V)`` raw scores of the student (or ``(B, C)``).
        teacher_logits: the teacher's scores, same shape (detached: a fixed target).
        temperature: softening temperature ``T > 0`` (separate from any sampling temperature).
        temperature_squared: multiply by ``T^2`` (the default of every loss here).
        mask: optional ``(B, T)`` boolean mask of the positions that count.
        reduction: ``"mean"`` over the counted positions (0 when none counts) or ``"sum"``.
        chunk_size: token positions per chunk (``None``: automatic, ``0``: unchunked).

    Returns:
        A scalar.

    Raises:
        ValueError: the vocabularies differ, ``T <= 0``, an unknown ``reduction``, or a mask
            of the wrong shape.
    """
    return token_loss(
        _tv_rows, student_logits, teacher_logits, temperature, temperature_squared=temperature_squared,
        mask=mask, reduction=reduction, chunk_size=chunk_size,
    )


# ------------------------------------------------------------------------------ modules


class _TokenLoss(DistillationLoss):
    """Shared by the token losses: the temperature, the ``T^2`` switch, the chunk size, and
    the mask taken from the batch (``targets >= 0`` for a token batch, else every position)."""

    def __init__(self, temperature: float, temperature_squared: bool, chunk_size: int | None):
        super().__init__()
        self.temperature = check_temperature(temperature)
        self.temperature_squared = bool(temperature_squared)
        self.chunk_size = _check_chunk_size(chunk_size)

    def loss(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError  # pragma: no cover

    def divergence(self) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """The per-row divergence ``(log_p_s, log_p_t) -> (n,)`` this loss averages."""
        raise NotImplementedError  # pragma: no cover

    def forward(self, student: Outputs, teacher: Outputs, batch: Batch | None = None) -> torch.Tensor:
        """The mean over this batch's trained-on positions (``batch.targets >= 0``).

        A teacher given sparsely (``teacher.topk``, from a token cache) is read without
        building its dense logits; the student's log-probabilities at this loss's
        temperature are reused when its :class:`~kdistill.outputs.Outputs` keeps them
        (the Distiller's hard-label loss computed them)."""
        mask = batch.token_mask if batch is not None else None
        if teacher.topk is None:
            return self.loss(student.logits, teacher.logits, mask)
        return token_loss(
            self.divergence(), student.logits, teacher.topk, self.temperature,
            temperature_squared=self.temperature_squared, mask=mask, chunk_size=self.chunk_size,
            student_log_probs=student.kept_log_probs(self.temperature),
        )

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature}, temperature_squared={self.temperature_squared}, "
                f"chunk_size={self.chunk_size}")


class TokenKLLoss(_TokenLoss):
    """Forward (or reverse) KL per token, mean over trained-on positions; see
    :func:`token_kl_loss`. In YAML: ``{name: forward_kl}`` or
    ``{name: token_kl, direction: reverse}``.

    Args:
        direction: ``"forward"`` (``KL(p_t || p_s)``, mode-covering) or ``"reverse"``
            (``KL(p_s || p_t)``, mode-seeking, MiniLLM).
        temperature: softening temperature ``T > 0``.
        temperature_squared: multiply by ``T^2``.
        chunk_size: token positions per chunk (``None``: automatic, ``0``: unchunked).
    """

    aliases: ClassVar[tuple[str, ...]] = ("forward_kl", "token_kl")

    def __init__(
        self,
        direction: str = "forward",
        temperature: float = 1.0,
        *,
        temperature_squared: bool = True,
        chunk_size: int | None = None,
    ):
        super().__init__(temperature, temperature_squared, chunk_size)
        self.direction = _check_direction(direction)

    def divergence(self) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        return _forward_kl_rows if self.direction == "forward" else _reverse_kl_rows

    def loss(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return token_kl_loss(
            student_logits, teacher_logits, self.temperature, direction=self.direction,
            temperature_squared=self.temperature_squared, mask=mask, chunk_size=self.chunk_size,
        )

    def extra_repr(self) -> str:
        return f"direction={self.direction!r}, " + super().extra_repr()


class GeneralizedJSDLoss(_TokenLoss):
    """GKD's generalized Jensen-Shannon divergence per token; see :func:`generalized_jsd_loss`.
    In YAML: ``{name: gkd, beta: 0.5}``.

    Args:
        beta: ``in [0, 1]``: 0 forward KL, 1 reverse KL (TRL's convention).
        temperature: softening temperature ``T > 0``.
        temperature_squared: multiply by ``T^2`` (``False`` matches TRL's GKD).
        chunk_size: token positions per chunk (``None``: automatic, ``0``: unchunked).
    """

    aliases: ClassVar[tuple[str, ...]] = ("generalized_jsd", "gkd", "jsd_beta")

    def __init__(
        self,
        beta: float = 0.5,
        temperature: float = 1.0,
        *,
        temperature_squared: bool = True,
        chunk_size: int | None = None,
    ):
        super().__init__(temperature, temperature_squared, chunk_size)
        self.beta = _check_fraction("beta", beta, "0 is forward KL(teacher || student), 1 reverse KL(student || teacher)")

    def divergence(self) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        return _gjsd_rows(self.beta)

    def loss(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return generalized_jsd_loss(
            student_logits, teacher_logits, self.beta, self.temperature,
            temperature_squared=self.temperature_squared, mask=mask, chunk_size=self.chunk_size,
        )

    def extra_repr(self) -> str:
        return f"beta={self.beta}, " + super().extra_repr()


class SkewKLLoss(_TokenLoss):
    """DistiLLM's skew KL per token; see :func:`skew_kl_loss`. In YAML:
    ``{name: skew_kl, lam: 0.1}`` (forward) or ``{name: skew_reverse_kl}``.

    Args:
        lam: skew ``in [0, 1)`` (0.1 in the paper).
        temperature: softening temperature ``T > 0``.
        direction: ``"forward"`` (SKL) or ``"reverse"`` (SRKL).
        temperature_squared: multiply by ``T^2``.
        chunk_size: token positions per chunk (``None``: automatic, ``0``: unchunked).
    """

    aliases: ClassVar[tuple[str, ...]] = ("skew_kl", "skew_forward_kl")

    def __init__(
        self,
        lam: float = 0.1,
        temperature: float = 1.0,
        *,
        direction: str = "forward",
        temperature_squared: bool = True,
        chunk_size: int | None = None,
    ):
        super().__init__(temperature, temperature_squared, chunk_size)
        self.lam = _check_fraction("lam", lam, "the share of the first distribution in the mixture", upper_open=True)
        self.direction = _check_direction(direction)

    def divergence(self) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        return _skew_rows(self.lam, self.direction)

    def loss(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return skew_kl_loss(
            student_logits, teacher_logits, self.lam, self.temperature, direction=self.direction,
            temperature_squared=self.temperature_squared, mask=mask, chunk_size=self.chunk_size,
        )

    def extra_repr(self) -> str:
        return f"lam={self.lam}, direction={self.direction!r}, " + super().extra_repr()


class SkewReverseKLLoss(SkewKLLoss):
    """DistiLLM's skew reverse KL, ``KL(p_s || lam * p_s + (1 - lam) * p_t)`` per token: the
    name YAML's ``{name: skew_reverse_kl}`` resolves to; see :func:`skew_kl_loss`.

    Args:
        lam: skew ``in [0, 1)`` (0.1 in the paper).
        temperature: softening temperature ``T > 0``.
        temperature_squared: multiply by ``T^2``.
        chunk_size: token positions per chunk (``None``: automatic, ``0``: unchunked).
    """

    aliases: ClassVar[tuple[str, ...]] = ("skew_reverse_kl",)

    def __init__(
        self,
        lam: float = 0.1,
        temperature: float = 1.0,
        *,
        temperature_squared: bool = True,
        chunk_size: int | None = None,
    ):
        super().__init__(lam, temperature, direction="reverse", temperature_squared=temperature_squared,
                         chunk_size=chunk_size)


class TotalVariationLoss(_TokenLoss):
    """Total variation distance per token; see :func:`total_variation_loss`. In YAML:
    ``{name: tv}``.

    Args:
        temperature: softening temperature ``T > 0``.
        temperature_squared: multiply by ``T^2``.
        chunk_size: token positions per chunk (``None``: automatic, ``0``: unchunked).
    """

    aliases: ClassVar[tuple[str, ...]] = ("total_variation", "tv")

    def __init__(self, temperature: float = 1.0, *, temperature_squared: bool = True, chunk_size: int | None = None):
        super().__init__(temperature, temperature_squared, chunk_size)

    def divergence(self) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        return _tv_rows

    def loss(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return total_variation_loss(
            student_logits, teacher_logits, self.temperature, temperature_squared=self.temperature_squared,
            mask=mask, chunk_size=self.chunk_size,
        )
