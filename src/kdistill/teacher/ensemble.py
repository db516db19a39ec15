"""A teacher made of several teachers: their logits combined, their layers addressed by name.

The combining rule is a pure function, :func:`combine_logits`; :class:`EnsembleTeacher`
applies it to its members' outputs on every batch. Three rules (``T`` is the distillation
loss's temperature, told by :meth:`EnsembleTeacher.set_temperatures`; ``w_i`` fixed
weights, uniform unless given, normalised to sum to 1):

* ``"mean_logits"``: ``L = sum_i w_i z_i``, the (weighted) mean of the logits.
* ``"mean_probs"``: ``L = T * log(sum_i w_i softmax(z_i / T))``, so that
  ``softmax(L / T) = sum_i w_i softmax(z_i / T)``: a loss that softens ``L`` at ``T`` sees
  exactly the mean of the members' softened distributions, the ensemble's predictive
  distribution that Hinton et al. (2015, "Distilling the Knowledge in a Neural
  Network", sec. 3-4) distil an ensemble from. The default.
* ``"confidence"``: per-sample weights from each member's confidence,
  ``a_i(x) = w_i exp(-H_i(x)) / sum_j w_j exp(-H_j(x))`` with ``H_i(x)`` the entropy (in
  nats) of ``softmax(z_i(x) / T)``, then ``L = T * log(sum_i a_i(x) softmax(z_i / T))``:
  the more certain a member is about a sample, the more of that sample's target it makes.
  This is the label-free, entropy-based weighting of Kwon et al. (2020, "Adaptive
  Knowledge Distillation Based on Entropy", ICASSP), written as a softmax of negative
  entropies over the members; Confidence-Aware Multi-Teacher KD (Zhang et al., 2022,
  ICASSP) weights members by their cross-entropy with the *labels* instead, which
  unlabelled samples do not have, so it is not what this implements.

Every member runs on the same prepared batch. A member is any teacher (a
:class:`~kdistill.teacher.LiveTeacher`, a :class:`~kdistill.teacher.TeacherCache`: a cache
per member, or your own kind); an ``nn.Module`` is wrapped as a ``LiveTeacher``. Caching
each member, rather than the combined output, keeps every cache reusable by any ensemble
or single-teacher run of the same teacher, lets the rule, weights and temperature change
without a rebuild (``"mean_probs"`` depends on ``T``), and keeps each member's layers for
feature losses.
"""

from __future__ import annotations

import itertools
import math
from typing import Any, Iterable, Iterator, Sequence

import torch
from torch import nn

from ..outputs import Batch, Outputs
from .base import Teacher, missing_calls

#: The combining rules :func:`combine_logits` knows.
COMBINE_MODES = ("mean_logits", "mean_probs", "confidence")


def _check_mode(mode: str) -> None:
    if mode not in COMBINE_MODES:
        raise ValueError(f"combine must be one of {list(COMBINE_MODES)}, got {mode!r}")


def normalized_weights(weights: Sequence[float] | None, count: int) -> list[float]:
    """Fixed member weights normalised to sum to 1 (``None``: uniform).

    Raises:
        ValueError: not ``count`` weights, a negative or non-finite one, or all zero.
    """
    if weights is None:
        return [1.0 / count] * count
    w = [float(v) for v in weights]
    if len(w) != count:
        raise ValueError(f"weights has {len(w)} values for {count} teachers: give one weight per teacher")
    if any(not (math.isfinite(v) and v >= 0) for v in w) or sum(w) <= 0:
        raise ValueError(f"weights must be finite, >= 0 and not all 0, got {w}")
    return [v / sum(w) for v in w]


def confidence_weights(logits: Sequence[torch.Tensor], temperature: float = 1.0,
                       weights: Sequence[float] | None = None) -> torch.Tensor:
    """Per-sample member weights of the ``"confidence"`` rule.

    ``a_i(x) = w_i exp(-H_i(x)) / sum_j w_j exp(-H_j(x))``, ``H_i`` the entropy (nats) of
    ``softmax(z_i / T)`` over the last axis.

    Args:
        logits: ``M`` tensors ``(..., C)`` (``(B, C)`` or ``(B, T, V)``), one per member.
        temperature: ``T``.
        weights: ``M`` fixed prior weights (``None``: uniform).

    Returns:
        ``(M, ...)`` weights, summing to 1 over the first axis.
    """
    w = torch.tensor(normalized_weights(weights, len(logits)), dtype=torch.float32, device=logits[0].device)
    lp = torch.stack([torch.log_softmax(z.float() / temperature, dim=-1) for z in logits])  # (M, ..., C)
    neg_entropy = (lp.exp() * lp).sum(-1)  # (M, ...) = -H_i
    prior = w.log().view(-1, *([1] * (neg_entropy.dim() - 1)))
    return torch.softmax(neg_entropy + prior, dim=0)


def combine_logits(logits: Sequence[torch.Tensor], mode: str = "mean_probs", temperature: float = 1.0,
                   weights: Sequence[float] | None = None) -> torch.Tensor:
    """The ensemble's logits from its members' (formulas in the module docstring).

    Args:
        logits: ``M >= 1`` tensors of one shape ``(B, C)`` (or ``(B, T, V)``).
        mode: ``"mean_logits"``, ``"mean_probs"`` or ``"confidence"``.
        temperature: ``T`` of the distillation loss; ``"mean_probs"`` and ``"confidence"``
            return logits whose ``softmax(L / T)`` is the (weighted) mean of the members'
            ``softmax(z_i / T)``. Ignored by ``"mean_logits"``.
        weights: ``M`` fixed member weights, normalised to sum to 1 (``None``: uniform).

    Returns:
        ``(B, C)`` float32 logits (a mean of logits keeps the members' dtype).

    Raises:
        ValueError: an unknown mode, no logits, shapes that differ, a temperature that is
            not positive, or bad weights.
    """
    _check_mode(mode)
    if not logits:
        raise ValueError("combine_logits needs the logits of at least one teacher")
    shapes = {tuple(z.shape) for z in logits}
    if len(shapes) > 1:
        raise ValueError(f"the teachers' logits differ in shape: {[tuple(z.shape) for z in logits]}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a positive number, got {temperature}")
    if mode == "mean_logits":
        w = normalized_weights(weights, len(logits))
        return sum(wi * z for wi, z in zip(w, logits))
    # 1. the weight of each member for each sample: (M, ...)
    if mode == "confidence":
        a = confidence_weights(logits, temperature, weights)
    else:
        w = torch.tensor(normalized_weights(weights, len(logits)), dtype=torch.float32, device=logits[0].device)
        a = w.view(-1, *([1] * (logits[0].dim() - 1)))
    # 2. log of the weighted mean probability, in log space: (M, ..., C) -> (..., C)
    lp = torch.stack([torch.log_softmax(z.float() / temperature, dim=-1) for z in logits])
    log_mean = torch.logsumexp(lp + a.clamp_min(1e-30).log().unsqueeze(-1), dim=0)
    # 3. back to logits at T: softmax(L / T) = exp(log_mean)
    return temperature * log_mean


class EnsembleTeacher(Teacher):
    """Several teachers as one: logits combined by :func:`combine_logits`, layers by name.

    Features: the members' tapped layers come back in ``Outputs.features`` as
    ``"<name>/<layer>"`` (``"t0/conv2"``), so a feature loss with ``taps = {"teacher":
    "t1/conv2", ...}`` reads one member while a logit loss reads the combined logits.

    Temperature: :meth:`set_temperatures` (the Distiller's one call at ``compile``) gives
    the rule its ``T`` and passes the temperatures on to every member (a top-k cache
    member needs them). ``"mean_probs"`` and ``"confidence"`` are exact at one
    temperature, so losses at several temperatures are refused for them.

    Augmentation: every member sees the batch as :meth:`prepare` leaves it; a member
    cache with stored views replays them for all (two caches with views must have been
    built with the same views, augmentation and seed).

    Args:
        teachers: two or more members, each a teacher or an ``nn.Module`` (run as a
            :class:`~kdistill.teacher.LiveTeacher`).
        combine: ``"mean_probs"`` (default), ``"mean_logits"`` or ``"confidence"``.
        weights: one fixed weight per member (``None``: uniform).
        names: one name per member, used in feature keys and messages (default ``"t0"``,
            ``"t1"``, ...); without ``/``, distinct.
        device: where ``nn.Module`` members run (the Distiller passes its own).

    Raises:
        TypeError: a member that is neither an ``nn.Module`` nor a teacher.
        ValueError: fewer than two members, bad names, weights or mode.
    """

    def __init__(self, teachers: Sequence[Any], combine: str = "mean_probs", weights: Sequence[float] | None = None,
                 names: Sequence[str] | None = None, *, device: torch.device | str | None = None):
        from .live import LiveTeacher

        teachers = list(teachers)
        if len(teachers) < 2:
            raise ValueError(f"an ensemble needs at least 2 teachers, got {len(teachers)}; pass the one teacher "
                             "itself as teacher=")
        _check_mode(combine)
        names = [f"t{i}" for i in range(len(teachers))] if names is None else [str(n) for n in names]
        if len(names) != len(teachers):
            raise ValueError(f"names has {len(names)} entries for {len(teachers)} teachers: give one name per teacher")
        bad = [n for n in names if not n or "/" in n]
        if bad or len(set(names)) != len(names):
            raise ValueError(f"teacher names must be distinct, non-empty and without '/', got {names}")
        members: list[Teacher] = []
        for name, t in zip(names, teachers):
            if isinstance(t, nn.Module):
                t = LiveTeacher(t, device)
            elif missing_calls(t):
                raise TypeError(f"ensemble member {name!r} must be an nn.Module or a teacher (LiveTeacher, "
                                f"TeacherCache, a kdistill.teacher.Teacher subclass); got {type(t).__name__}, "
                                f"which lacks {missing_calls(t)}")
            members.append(t)
        self.members = members
        self.names = names
        self.combine = combine
        self.weights = normalized_weights(weights, len(members))
        self.temperature = 1.0
        self._check_views()

    # ------------------------------------------------------------------ protocol
    def set_temperatures(self, temperatures: Iterable[float]) -> None:
        """The losses' temperatures: ``T`` of the rule, and passed on to every member.

        Raises:
            ValueError: several temperatures with ``"mean_probs"`` or ``"confidence"``
                (exact at one only), or one that is not positive.
        """
        temps = sorted({float(t) for t in temperatures})
        if any(not (math.isfinite(t) and t > 0) for t in temps):
            raise ValueError(f"temperatures must be positive numbers, got {temps}")
        if len(temps) > 1 and self.combine != "mean_logits":
            raise ValueError(
                f"combine={self.combine!r} gives logits whose softmax at one temperature is the members' mean, but "
                f"the losses use {temps}: give them one temperature, or use combine='mean_logits'")
        self.temperature = temps[0] if temps else 1.0
        for member in self.members:
            member.set_temperatures(temps)

    def set_taps(self, paths: Iterable[str]) -> None:
        """Serve ``"<name>/<layer>"`` layers: each member is asked for its own.

        Raises:
            ValueError: a path without a member name, or with one the ensemble does not
                have (the message lists the names); a member's own error for its layer.
        """
        by_member: dict[str, list[str]] = {n: [] for n in self.names}
        for path in sorted(set(paths)):
            name, sep, layer = path.partition("/")
            if not sep or name not in by_member or not layer:
                raise ValueError(
                    f"teacher layer {path!r}: the teacher is an ensemble, so a teacher tap names the member first, "
                    f"'<member>/<layer>' with <member> one of {self.names} (e.g. '{self.names[0]}/{layer or path}')")
            by_member[name].append(layer)
        for name, member in zip(self.names, self.members):
            member.set_taps(by_member[name])

    def prepare(self, batch: Batch, epoch: int) -> Batch:
        """Each member's ``prepare`` in turn (a cache with views replays its view; the
        others then see the batch with its view set and leave it)."""
        for member in self.members:
            batch = member.prepare(batch, epoch)
        return batch

    def resolve_augment(self, augment: Any) -> Any:
        """``None`` when a member replays stored views (they replace ``fit``'s
        augmentation), else ``augment``; every member checks it as it would alone."""
        resolved = [m.resolve_augment(augment) for m in self.members]
        return None if any(r is None for r in resolved) else augment

    def parameters(self) -> Iterator[nn.Parameter]:
        """Every member's (frozen) parameters."""
        return itertools.chain.from_iterable(m.parameters() for m in self.members)

    def __call__(self, batch: Batch) -> Outputs:
        outs = self.member_outputs(batch)
        logits = combine_logits([o.logits for o in outs], self.combine, self.temperature, self.weights)
        features = {f"{name}/{k}": v for name, o in zip(self.names, outs) for k, v in o.features.items()}
        return Outputs(logits=logits, features=features)

    # ------------------------------------------------------------------ helpers
    def member_outputs(self, batch: Batch) -> list[Outputs]:
        """Every member's own outputs for ``batch`` (in member order).

        Raises:
            ValueError: members whose class counts differ (both named).
        """
        outs = [m(batch) for m in self.members]
        first = outs[0].shape
        for name, o in zip(self.names[1:], outs[1:]):
            if o.shape[-1] != first[-1]:
                raise ValueError(
                    f"ensemble members predict different class counts: {self.names[0]!r} ({self.members[0]!r}) "
                    f"{first[-1]} and {name!r} ({self.members[self.names.index(name)]!r}) {o.shape[-1]}. "
                    "Every teacher of an ensemble must score the same classes")
        return outs

    def _check_views(self) -> None:
        """Two member caches with views must replay the same augmented inputs."""
        with_views = [(n, m) for n, m in zip(self.names, self.members) if getattr(m, "views", 0)]
        if len(with_views) < 2:
            return
        (n0, m0), rest = with_views[0], with_views[1:]
        for n, m in rest:
            same = (m.views == m0.views and m.augment_config == m0.augment_config
                    and m.manifest.get("view_seed") == m0.manifest.get("view_seed"))
            if not same:
                raise ValueError(
                    f"ensemble members {n0!r} and {n!r} are caches with different augmented views ({m0.views} vs "
                    f"{m.views} views, augment {m0.augment_config} vs {m.augment_config}): the teachers must see the "
                    "same inputs. Build both with the same views=, augment= and seed=")

    def __repr__(self) -> str:
        members = ", ".join(f"{n}={m!r}" for n, m in zip(self.names, self.members))
        w = "" if len(set(self.weights)) == 1 else f", weights={[round(v, 4) for v in self.weights]}"
        return f"EnsembleTeacher({members}, combine={self.combine!r}{w})"


class EnsembleModule(nn.Module):
    """The ensemble as one network: ``forward(x) = combine_logits([m(x) for m in
    members], combine, temperature, weights)``.

    What measures the ensemble like any model (its accuracy, the size and latency of all
    members together), and the way to build *one* cache of the combined output
    (``TeacherCache.build(EnsembleModule(...), x, path)``), which fixes the rule, the
    weights and (for ``"mean_probs"`` and ``"confidence"``) the temperature at build time
    and serves no member's layers; a cache per member keeps all of them open.

    Args:
        members: the member networks.
        combine: the rule (:func:`combine_logits`).
        temperature: ``T`` of the rule; the predicted class of ``"mean_probs"`` depends on it.
        weights: fixed member weights (``None``: uniform).
    """

    def __init__(self, members: Sequence[nn.Module], combine: str = "mean_probs", temperature: float = 1.0,
                 weights: Sequence[float] | None = None):
        super().__init__()
        _check_mode(combine)
        self.members = nn.ModuleList(members)
        self.combine = combine
        self.temperature = float(temperature)
        self.weights = normalized_weights(weights, len(self.members))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return combine_logits([m(x) for m in self.members], self.combine, self.temperature, self.weights)
