"""The two records that flow through the engine: a :class:`Batch` in, :class:`Outputs` out.

Both are small dataclasses of tensors, so losses, teachers and callbacks agree on names
instead of on tuple positions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Union

import torch

#: Target value of a sample that has no label: it contributes the distillation loss only.
UNLABELLED = -1

#: Target value of a token position that is not trained on (padding, a prompt, the last
#: position of a sequence): PyTorch's and Hugging Face's ignore index.
IGNORE_INDEX = -100

#: What a batch's inputs are: one tensor, or a dict of tensors passed to the model as
#: keyword arguments (``input_ids``, ``attention_mask``, ...).
Inputs = Union[torch.Tensor, dict[str, torch.Tensor]]


def next_token_targets(labels: torch.Tensor) -> torch.Tensor:
    """Hugging Face causal-LM ``labels`` -> the target of each logits position.

    A causal LM's logits at position ``t`` predict token ``t + 1``; Hugging Face models
    take ``labels`` aligned with ``input_ids`` and shift inside their loss. kdistill shifts
    once, when a batch is made, so every loss (cross-entropy, token KL, ...) compares
    position ``t`` of the logits with position ``t`` of :attr:`Batch.targets`, and masks
    with ``targets >= 0``.

    Args:
        labels: ``(B, T)`` token ids, :data:`IGNORE_INDEX` (-100) where not trained on.

    Returns:
        ``(B, T)``: ``labels[:, 1:]`` followed by one :data:`IGNORE_INDEX` column.
    """
    if labels.dim() != 2:
        raise ValueError(f"labels must be (batch, sequence) token ids, got shape {tuple(labels.shape)}")
    pad = labels.new_full((labels.shape[0], 1), IGNORE_INDEX)
    return torch.cat([labels[:, 1:], pad], dim=1)


def batch_size_of(inputs: Inputs) -> int:
    """The number of samples (sequences) in a batch's inputs."""
    if isinstance(inputs, torch.Tensor):
        return int(inputs.shape[0])
    first = inputs.get("input_ids")
    if first is None:
        first = next(iter(inputs.values()))
    return int(first.shape[0])


def inputs_device(inputs: Inputs) -> torch.device:
    """Where a batch's inputs are."""
    if isinstance(inputs, torch.Tensor):
        return inputs.device
    return next(iter(inputs.values())).device

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
        inputs: model inputs, e.g. ``(B, C, H, W)`` images or ``(B, D)`` vectors; or, for
            a language model, a dict passed as keyword arguments (``input_ids``,
            ``attention_mask``, each ``(B, T)``).
        targets: ``(B,)`` integer class labels; :data:`UNLABELLED` (``-1``) marks a sample
            without a label, or ``None`` when the data has no labels at all (``predict``).
            For a language model ``(B, T)``: the token each logits position should
            predict (:func:`next_token_targets`), :data:`IGNORE_INDEX` where none.
        index: ``(B,)`` position of each sample in its dataset, so per-sample state (an
            offline teacher cache, a contrastive memory bank) can be looked up; ``None``
            when the source cannot tell.
        mix: for a batch mixed by mixup/cutmix, the other samples' labels and the mixing
            weight (the hard-label loss is ``lam * CE(y) + (1 - lam) * CE(y_mix)``).
        view: for a batch augmented as one of a teacher cache's stored views
            (:meth:`~kdistill.teacher.TeacherCache.prepare`), which view; the cache
            serves the teacher's outputs for that view. ``None`` otherwise.
    """

    inputs: Inputs
    targets: torch.Tensor | None = None
    index: torch.Tensor | None = None
    mix: Mix | None = None
    view: int | None = None
    _labelled: Any = field(default=_UNKNOWN, init=False, repr=False, compare=False)

    def __len__(self) -> int:
        inputs = self.inputs
        return int(inputs.shape[0]) if isinstance(inputs, torch.Tensor) else batch_size_of(inputs)

    @property
    def is_tokens(self) -> bool:
        """Whether the targets are per position (``(B, T)``, a sequence model's)."""
        return self.targets is not None and self.targets.dim() > 1

    @property
    def token_mask(self) -> torch.Tensor | None:
        """``(B, T)`` boolean mask of the token positions trained on (``targets >= 0``),
        or ``None`` for a batch without per-position targets."""
        if not self.is_tokens:
            return None
        return self.targets >= 0

    def items(self) -> int:
        """How many items the batch's losses average over: its samples, or for a token
        batch its trained-on tokens (one reduction and read)."""
        if self.is_tokens:
            return int((self.targets >= 0).sum())
        return len(self)

    def to(self, device: torch.device | str) -> "Batch":
        """Return the batch on ``device`` (non-blocking where that is safe): the batch
        itself when every tensor is there already (no copies, and what was computed
        about it, such as :attr:`labelled`, is kept)."""
        if not isinstance(device, torch.device):
            device = torch.device(device)
        if not isinstance(self.inputs, torch.Tensor):
            return self._dict_to(device)
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

    def _dict_to(self, device: torch.device) -> "Batch":
        inputs = self.inputs
        if (all(v.device == device for v in inputs.values())
                and (self.targets is None or self.targets.device == device)
                and (self.index is None or self.index.device == device)):
            return self
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return Batch({k: move(v) for k, v in inputs.items()}, move(self.targets), move(self.index), None, self.view)

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
        if targets.dim() > 1:  # tokens: a position is trained on where its target is >= 0
            return targets >= 0
        # labels are classes >= 0 (or an ignore index < 0, e.g. -100 for tokens): one reduction
        # and one read tell the usual case, every sample labelled
        if targets.numel() == 0 or int(targets.min()) >= 0:
            return None
        mask = targets != UNLABELLED
        return None if bool(mask.all()) else mask


@dataclass(eq=False)
class TopKLogits:
    """A teacher's next-token scores at some token positions, given sparsely.

    At each of the ``P`` positions where ``positions`` is true (in row-major order), the
    ``k`` tokens ``ids[p]`` have the logits ``values[p]`` and every other token of the
    ``vocab_size`` has the one logit ``fill[p]``: the form of a top-k cache's rebuilt
    distribution (:class:`kdistill.teacher.TokenCache`), which token losses read without
    building the ``(B, T, V)`` tensor (:mod:`kdistill.losses.tokens`). :meth:`dense` builds
    it, for every other loss.

    Attributes:
        ids: ``(P, k)`` int64 token ids, distinct within a row.
        values: ``(P, k)`` float32 logits of those tokens.
        fill: ``(P,)`` float32 logit of each of the other ``vocab_size - k`` tokens.
        positions: ``(B, T)`` bool, the positions the rows belong to; no scores elsewhere.
        vocab_size: ``V``.
    """

    ids: torch.Tensor
    values: torch.Tensor
    fill: torch.Tensor
    positions: torch.Tensor
    vocab_size: int

    @property
    def shape(self) -> torch.Size:
        """The shape of the dense logits, ``(B, T, V)``."""
        return torch.Size((*self.positions.shape, self.vocab_size))

    @property
    def k(self) -> int:
        return int(self.ids.shape[-1])

    def dense(self) -> torch.Tensor:
        """``(B, T, V)`` float32 logits: the rows at ``positions``, zeros elsewhere."""
        flat = self.positions.reshape(-1)
        where = torch.nonzero(flat).squeeze(1)
        fills = self.fill.new_zeros(flat.numel())
        fills[where] = self.fill
        logits = fills.unsqueeze(1).expand(flat.numel(), self.vocab_size).clone()
        logits[where.unsqueeze(1), self.ids] = self.values
        return logits.view(*self.shape)

    def rows_of(self, flat_positions: torch.Tensor | None) -> torch.Tensor | None:
        """The rows holding the given flat positions (indices into ``positions.reshape(-1)``);
        ``None`` for all positions when they are exactly the stored ones.

        Raises:
            ValueError: a position that holds no row (the teacher gave no scores there).
        """
        flat = self.positions.reshape(-1)
        if flat_positions is None:
            if bool(flat.all()):
                return None
            raise ValueError(
                f"the teacher's top-k scores cover {int(flat.sum())} of the batch's {flat.numel()} positions, and "
                "the loss counts all of them; give the loss the batch (its mask: targets >= 0)")
        if flat_positions.numel() == int(flat.sum()) and bool(flat[flat_positions].all()):
            return None
        if not bool(flat[flat_positions].all()):
            raise ValueError(
                "the loss counts token positions where the teacher's top-k scores hold no row (a cache stores "
                "the trained-on positions only, targets >= 0); mask the loss to those positions")
        return (torch.cumsum(flat.long(), 0) - 1)[flat_positions]


class Outputs:
    """What a model (student or teacher) produced for a batch.

    Attributes:
        logits: ``(B, C)`` for classifiers, ``(B, T, V)`` for sequence models; losses
            reduce over the last axis. Given a sparse ``topk`` instead, it is built from it
            on first use (and kept).
        features: intermediate outputs captured by taps, by module path.
        topk: a teacher's scores in sparse form (:class:`TopKLogits`), or ``None``; token
            losses read it instead of ``logits``.
    """

    __slots__ = ("_logits", "features", "topk", "_log_probs")

    def __init__(self, logits: torch.Tensor | None = None, features: dict[str, torch.Tensor] | None = None, *,
                 topk: TopKLogits | None = None):
        if logits is None and topk is None:
            raise TypeError("Outputs needs logits (a tensor) or topk (a TopKLogits)")
        self._logits = logits
        self.features = {} if features is None else features
        self.topk = topk
        self._log_probs: tuple[float, bool, torch.Tensor] | None = None

    @property
    def logits(self) -> torch.Tensor:
        if self._logits is None:
            self._logits = self.topk.dense()  # type: ignore[union-attr]
        return self._logits

    @property
    def shape(self) -> torch.Size:
        """The logits' shape, without building dense logits from ``topk``."""
        return self._logits.shape if self._logits is not None else self.topk.shape  # type: ignore[union-attr]

    def log_probs(self, temperature: float = 1.0) -> torch.Tensor:
        """``log_softmax(logits / temperature)`` over the last axis, computed once and kept
        (one temperature; recomputed when asked with another, or with gradients enabled
        after a computation without), so a hard-label loss and a distillation loss at the
        same temperature share it."""
        kept = self.kept_log_probs(temperature)
        if kept is not None:
            return kept
        z = self.logits
        lp = torch.log_softmax(z if temperature == 1.0 else z / temperature, dim=-1)
        self._log_probs = (temperature, lp.requires_grad, lp)
        return lp

    def kept_log_probs(self, temperature: float = 1.0) -> torch.Tensor | None:
        """The log-probabilities :meth:`log_probs` kept at ``temperature`` (with their graph
        when gradients are enabled), or ``None``."""
        memo = self._log_probs
        if memo is None or memo[0] != temperature:
            return None
        needs_graph = torch.is_grad_enabled() and self.logits.requires_grad
        return memo[2] if memo[1] or not needs_graph else None

    def __repr__(self) -> str:
        shape = tuple(self.shape)
        kind = "topk" if self._logits is None else "logits"
        return f"Outputs({kind}={shape}, features={list(self.features)})"
