"""Hidden-state distillation for language models: a student's transformer blocks are
pulled towards the teacher's, position by position.

A student layer ``i`` is paired with a teacher layer ``j`` (:func:`layer_mapping`), and
:class:`HiddenStateLoss` compares the two blocks' outputs ``(B, T, D)`` at every
non-padding position, through a learned linear projection where the widths differ
(TinyBERT's ``L_hidn = MSE(H_S W_h, H_T)``, Jiao et al., Findings of EMNLP 2020,
arXiv:1909.10351), or by their cosine (DistilBERT's cosine embedding loss on hidden
states, Sanh et al. 2019, arXiv:1910.01108). :func:`decoder_layer_paths` finds a Hugging
Face causal LM's blocks, and :func:`hidden_state_losses` builds one loss per mapped pair,
ready for a :class:`~kdistill.losses.WeightedSum` beside a logit loss.

Why a file of its own rather than ``features.py``: the feature family there compares one
tapped pair of image features (maps or vectors) with CRD's CIFAR-100 weights; hidden-state
distillation is a method on sequence models that comes with what only sequence models
need: finding the transformer blocks of a model, mapping a shallow stack onto a deep one,
and masking token positions (padding) out of the mean. Those belong together, and nothing
here is shared with the image feature losses but the adapter idea (here always a
``nn.Linear`` on the hidden axis, built in :meth:`HiddenStateLoss.setup`).

What a decoder layer gives: in the installed transformers (5.x) a Llama/Qwen2/GPT-2
decoder layer returns the hidden state tensor ``(B, T, D)`` itself; older versions return
a tuple whose first element is that tensor. The taps keep the first tensor of a tuple
(:class:`kdistill.taps.FeatureTaps`), so the paths work with both. The tapped output of
the last block is the residual stream *before* the model's final norm (Hugging Face's
``hidden_states[-1]`` is after it).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import ClassVar, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..adapters import make_adapter
from ..outputs import Batch, Outputs
from .base import DistillationLoss, check_same_batch, check_weight, compute_dtype

#: The ways :func:`layer_mapping` pairs layers by name.
MAPPINGS = ("uniform", "all", "last")

#: ``mapping`` as :func:`layer_mapping` takes it: a name of :data:`MAPPINGS`, or explicit
#: ``(student_layer, teacher_layer)`` pairs (a list of pairs or a ``{student: teacher}`` dict).
LayerMapping = Union[str, Iterable[tuple[int, int]], Mapping[int, int]]

#: The distances :func:`hidden_state_loss` measures.
DISTANCES = ("mse", "cosine")


# --------------------------------------------------------------------------- the layers


def decoder_layer_paths(model: nn.Module, num_layers: int | None = None) -> list[str]:
    """The module paths of a causal LM's transformer blocks, first to last.

    The blocks are the ``nn.ModuleList`` whose length is ``model.config.num_hidden_layers``
    (``model.layers`` of Llama, Qwen2, Mistral, ...; ``transformer.h`` of GPT-2). Where
    several lists have that length, the one whose items are all of one class and which
    holds the most parameters is taken (the blocks hold nearly all of a model's weights).

    Example::

        decoder_layer_paths(llama)  # ['model.layers.0', 'model.layers.1', ...]
        decoder_layer_paths(gpt2)   # ['transformer.h.0', 'transformer.h.1', ...]

    Args:
        model: a Hugging Face causal LM (or any model whose blocks sit in one
            ``nn.ModuleList``), as given to the Distiller: the paths are relative to it.
        num_layers: the number of blocks, for a model without ``config.num_hidden_layers``.

    Returns:
        ``["<list path>.0", "<list path>.1", ...]``, one path per block.

    Raises:
        ValueError: the model does not say how many layers it has, or no ``nn.ModuleList``
            of that length exists (the message lists the lists it has, with their lengths).
    """
    if num_layers is None:
        num_layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
        if num_layers is None:
            raise ValueError(
                f"{type(model).__name__} has no config.num_hidden_layers, so its transformer blocks cannot be "
                "told apart from other module lists: pass decoder_layer_paths(model, num_layers=N), or name "
                "the layers yourself (kdistill.taps.list_layers(model, x) lists every path)")
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
        raise ValueError(f"num_layers must be an integer >= 1, got {num_layers!r}")
    lists = [(path, m) for path, m in model.named_modules() if isinstance(m, nn.ModuleList)]
    candidates = [(path, m) for path, m in lists if len(m) == num_layers]
    uniform = [(path, m) for path, m in candidates if len({type(block) for block in m}) == 1]
    candidates = uniform or candidates
    if not candidates:
        found = ", ".join(f"'{path}' ({len(m)})" for path, m in lists) or "none"
        raise ValueError(
            f"{type(model).__name__} has no nn.ModuleList of {num_layers} layers (its config's num_hidden_layers) "
            f"to take as its transformer blocks; its module lists (length): {found}. Pass num_layers= if the "
            "config is wrong, or name the layers yourself (kdistill.taps.list_layers(model, x) lists every path)")
    path, blocks = max(candidates, key=lambda c: sum(p.numel() for p in c[1].parameters()))
    prefix = f"{path}." if path else ""
    return [f"{prefix}{i}" for i in range(len(blocks))]


def _check_layer_count(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1 (a number of transformer layers), got {value!r}")
    return value


def layer_mapping(student_layers: int, teacher_layers: int, mapping: LayerMapping = "uniform") -> dict[int, int]:
    """Which teacher layer each distilled student layer learns from (0-based indices).

    * ``"uniform"`` (or its synonym ``"all"``): every student layer ``i`` is paired with
      teacher layer ``round((i + 1) * L_t / L_s) - 1``. This is TinyBERT's *uniform
      strategy* (Jiao et al. 2020: student layer ``m`` learns from teacher layer
      ``m * L_t / L_s``, 1-based; with ``L_t = k * L_s`` it is every k-th teacher layer,
      the selection DistilBERT initialises its student from with ``k = 2``): the
      student's last layer meets the teacher's last, and the others are spread evenly
      below it. Halves round up (computed in integers, so ``(4, 6)``
      gives ``{0: 1, 1: 2, 2: 4, 3: 5}``); a student deeper than its teacher pairs its
      lowest layers with teacher layer 0 (a result below 0 is raised to 0).
    * ``"last"``: the student's last layer with the teacher's last.
    * explicit pairs: ``[(0, 1), (1, 3)]`` or ``{0: 1, 1: 3}``; each index must be within
      its model's layers and each student layer may appear once.

    Example::

        layer_mapping(2, 4)    # {0: 1, 1: 3}
        layer_mapping(3, 12)   # {0: 3, 1: 7, 2: 11}
        layer_mapping(2, 4, "last")  # {1: 3}

    Args:
        student_layers: the student's number of transformer layers ``L_s >= 1``.
        teacher_layers: the teacher's ``L_t >= 1``.
        mapping: ``"uniform"``, ``"all"``, ``"last"``, or explicit pairs.

    Returns:
        ``{student_layer: teacher_layer}``, in the order of the student's layers for the
        named strategies, in the given order for explicit pairs.

    Raises:
        ValueError: a layer count that is not a positive integer, an unknown name, a pair
            that is not two integers, an index out of range (the valid ranges are named)
            or a student layer listed twice.
    """
    ls = _check_layer_count("student_layers", student_layers)
    lt = _check_layer_count("teacher_layers", teacher_layers)
    if isinstance(mapping, str):
        if mapping in ("uniform", "all"):
            # round((i + 1) * lt / ls) with halves up, in integers: floor((2 (i + 1) lt + ls) / (2 ls))
            return {i: max(0, (2 * (i + 1) * lt + ls) // (2 * ls) - 1) for i in range(ls)}
        if mapping == "last":
            return {ls - 1: lt - 1}
        raise ValueError(
            f"mapping must be one of {list(MAPPINGS)} or a list of (student_layer, teacher_layer) pairs, "
            f"got {mapping!r}")
    pairs = list(mapping.items()) if isinstance(mapping, Mapping) else list(mapping)
    if not pairs:
        raise ValueError("mapping lists no (student_layer, teacher_layer) pairs; give at least one, e.g. [(1, 3)]")
    ranges = f"student layers 0..{ls - 1}, teacher layers 0..{lt - 1}"
    out: dict[int, int] = {}
    for pair in pairs:
        try:
            s, t = pair
        except (TypeError, ValueError):
            raise ValueError(
                f"each mapping entry must be a (student_layer, teacher_layer) pair, got {pair!r}") from None
        for value in (s, t):
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"layer indices must be integers, got {pair!r} (valid: {ranges})")
        if not (0 <= s < ls and 0 <= t < lt):
            raise ValueError(f"layer pair {(s, t)} is out of range: the valid indices are {ranges}")
        if s in out:
            raise ValueError(
                f"student layer {s} is mapped twice (to teacher layers {out[s]} and {t}); "
                "each student layer learns from one teacher layer")
        out[s] = t
    return out


# --------------------------------------------------------------------------- the loss


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
    return value


def hidden_state_loss(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    distance: str = "mse",
    normalize: bool = False,
) -> torch.Tensor:
    """Distance between two models' hidden states, averaged over the valid positions.

    * ``distance="mse"`` (TinyBERT, Jiao et al. 2020): ``sum_{(b,t) valid} sum_d
      (h_s - h_t)^2 / (N * D)``, the squared error averaged over the ``N`` valid positions
      and the ``D`` hidden units (``nn.MSELoss``'s mean, restricted to the valid positions);
    * ``distance="cosine"`` (DistilBERT, Sanh et al. 2019): ``sum_{(b,t) valid}
      (1 - cos(h_s, h_t)) / N``.

    With ``normalize=True`` both sides first go through a layer norm without parameters
    over the hidden axis (zero mean, unit variance at each position): the normalisation a
    pre-norm transformer applies before a block reads the residual stream, which removes
    the scale of the residual stream (it grows with depth and differs between models) so
    that MSE compares the states' shapes. NVIDIA Model Optimizer's Megatron distillation
    recommends comparing LayerNorm outputs for its hidden-state loss for the same reason.

    Invalid positions (``mask`` false: padding) never reach the value nor the gradient,
    whatever they hold: they are set to zero before any other operation. No valid position
    at all gives 0.

    Args:
        student_hidden: ``(B, T, D)``, already projected onto the teacher's width.
        teacher_hidden: ``(B, T, D)``; a fixed target (detached).
        mask: ``(B, T)`` boolean (or 0/1) mask of the positions to compare; ``None``: all.
        distance: ``"mse"`` or ``"cosine"``.
        normalize: layer-normalise both sides before comparing.

    Returns:
        A scalar, in float32 (float64 for float64 inputs).

    Raises:
        ValueError: shapes that differ, a mask that is not ``(B, T)``, or an unknown
            ``distance``.
    """
    _check_choice("distance", distance, DISTANCES)
    if student_hidden.shape != teacher_hidden.shape or student_hidden.dim() != 3:
        raise ValueError(
            f"hidden_state_loss compares (B, T, D) hidden states of one shape, got the student's "
            f"{tuple(student_hidden.shape)} and the teacher's {tuple(teacher_hidden.shape)}: project the student's "
            "onto the teacher's width first (HiddenStateLoss does this with a learned nn.Linear), and give both "
            "models the same tokens")
    dtype = torch.promote_types(compute_dtype(student_hidden), compute_dtype(teacher_hidden))
    s, t = student_hidden.to(dtype), teacher_hidden.detach().to(dtype)
    if mask is not None:
        if tuple(mask.shape) != tuple(s.shape[:2]):
            raise ValueError(
                f"mask must be (B, T) = {tuple(s.shape[:2])} like the hidden states' first two axes, "
                f"got shape {tuple(mask.shape)}")
        mask = mask.to(torch.bool)
        keep = mask.unsqueeze(-1)  # (B, T) -> (B, T, 1)
        # 1. padding to zero before anything else: its values reach neither the value nor the gradient
        zero = s.new_zeros(())
        s, t = torch.where(keep, s, zero), torch.where(keep, t, zero)
        count = mask.sum()
    else:
        count = s.shape[0] * s.shape[1]
    # 2. optional layer norm over the hidden axis (a zeroed position stays zero)
    if normalize:
        s, t = F.layer_norm(s, s.shape[-1:]), F.layer_norm(t, t.shape[-1:])
    # 3. the distance, summed over the valid positions, divided by their count
    if distance == "mse":
        total = (s - t).pow(2).sum() / s.shape[-1]  # zeroed positions add nothing
    else:
        per_position = 1.0 - F.cosine_similarity(s, t, dim=-1)  # (B, T, D) -> (B, T)
        if mask is not None:
            per_position = torch.where(mask, per_position, per_position.new_zeros(()))
        total = per_position.sum()
    if isinstance(count, torch.Tensor):
        return total / count.clamp_min(1).to(total.dtype)
    return total / max(count, 1)


def hidden_state_mask(batch: Batch | None, shape: tuple[int, int]) -> torch.Tensor | None:
    """The positions whose hidden states are compared: ``(B, T)`` boolean, or ``None`` for all.

    The batch's ``attention_mask`` when its inputs hold one of shape ``(B, T)``: hidden
    states exist at every non-padding position, prompt tokens included (they are not
    trained on as next-token targets, yet the teacher's states there are as informative).
    Otherwise the batch's :attr:`~kdistill.outputs.Batch.token_mask` (the trained-on
    positions), and without either, every position.

    Args:
        batch: the batch the states were computed on (or ``None``).
        shape: ``(B, T)`` of the hidden states.
    """
    if batch is None:
        return None
    inputs = batch.inputs
    if isinstance(inputs, dict):
        attention = inputs.get("attention_mask")
        if isinstance(attention, torch.Tensor) and tuple(attention.shape) == tuple(shape):
            return attention.to(torch.bool)
    tokens = batch.token_mask
    if tokens is not None and tuple(tokens.shape) == tuple(shape):
        return tokens
    return None


class HiddenStateLoss(DistillationLoss):
    """One student layer's hidden states pulled towards one teacher layer's:
    ``hidden_state_loss(proj(h_s), h_t, mask)`` (see :func:`hidden_state_loss`).

    ``proj`` is a learned ``nn.Linear(D_s, D_t)`` (TinyBERT's ``W_h``) built in
    :meth:`setup` from one batch's widths and trained with the student (the Distiller adds
    it to the optimizer and saves it in checkpoints; it is never exported). With equal
    widths there is none, unless ``projection=True``. The mask is the batch's attention
    mask (:func:`hidden_state_mask`), so padding never counts; the value is a mean over the
    valid positions (and, for MSE, the hidden units), so with gradient accumulation the
    engine's weighting of micro-batches by their tokens keeps the scale.

    Example::

        HiddenStateLoss("model.layers.1", "model.layers.3")  # YAML: {name: hidden_states, ...}

    Args:
        student_layer: module path of the student's block, e.g. ``"model.layers.1"``
            (:func:`decoder_layer_paths` lists them).
        teacher_layer: module path of the teacher's block, e.g. ``"model.layers.3"``.
        distance: ``"mse"`` (default, TinyBERT) or ``"cosine"`` (``1 - cos``, DistilBERT).
        projection: ``None`` (default): a projection exactly when the widths differ;
            ``True``: always one (also between equal widths); ``False``: never (the widths
            must match).
        normalize: layer-normalise both sides (no parameters) before comparing.

    Raises:
        ValueError: an unknown ``distance``; from :meth:`setup`, widths that differ with
            ``projection=False`` or states that are not ``(B, T, D)``.
    """

    nonnegative: ClassVar[bool] = True
    aliases: ClassVar[tuple[str, ...]] = ("hidden_states", "hidden")

    def __init__(self, student_layer: str, teacher_layer: str, *, distance: str = "mse",
                 projection: bool | None = None, normalize: bool = False):
        super().__init__()
        for name, value in (("student_layer", student_layer), ("teacher_layer", teacher_layer)):
            if not isinstance(value, str) or not value:
                raise ValueError(f"{name} must be a module path such as 'model.layers.1', got {value!r}")
        if projection is not None and not isinstance(projection, bool):
            raise ValueError(
                f"projection must be true, false or null (a projection when the widths differ), got {projection!r}")
        self.taps = {"student": student_layer, "teacher": teacher_layer}
        self.distance = _check_choice("distance", distance, DISTANCES)
        self.projection_option = projection
        self.normalize = bool(normalize)
        self.projection: nn.Module | None = None
        self._widths: tuple[int, int] | None = None

    def _states(self, student: Outputs, teacher: Outputs) -> tuple[torch.Tensor, torch.Tensor]:
        s, t = self.features(student, teacher)
        for role, x in (("student", s), ("teacher", t)):
            if x.dim() != 3:
                raise ValueError(
                    f"{self.name} compares hidden states of shape (B, T, D), but the {role}'s "
                    f"'{self.taps[role]}' gives shape {tuple(x.shape)}: tap a transformer block "
                    "(kdistill.losses.decoder_layer_paths(model) lists them)")
        check_same_batch(self.name, s, t)
        if s.shape[1] != t.shape[1]:
            raise ValueError(
                f"{self.name}: the student's states cover {s.shape[1]} positions and the teacher's {t.shape[1]}; "
                "both models must read the same tokens (one tokenizer)")
        return s, t

    def setup(self, student: Outputs, teacher: Outputs) -> None:
        """Build the projection from one batch's widths (kept if the widths are unchanged).

        Raises:
            KeyError: a tapped layer is missing from the outputs.
            ValueError: states that are not ``(B, T, D)``, or widths that differ with
                ``projection=False``.
        """
        s, t = self._states(student, teacher)
        widths = (int(s.shape[-1]), int(t.shape[-1]))
        if self.projection is not None and widths == self._widths:
            return  # already built (e.g. before a resume loads its weights)
        ds, dt = widths
        project = self.projection_option if self.projection_option is not None else ds != dt
        if not project and ds != dt:
            raise ValueError(
                f"{self.name} compares the student's {ds}-wide states with the teacher's {dt}-wide states "
                "with projection=False: allow a learned projection (projection=None or True), or pair layers "
                "of equal width")
        dtype = compute_dtype(s)
        # the adapters' owner builds it ((B, T, Ds) -> (B, T, Dt): a Linear on the last axis); equal widths
        # with projection=True still get a learned one
        adapter = make_adapter(s.shape, t.shape) if ds != dt else nn.Linear(ds, dt) if project else nn.Identity()
        self.projection = adapter.to(device=s.device, dtype=dtype)
        self._widths = widths

    def forward(self, student: Outputs, teacher: Outputs, batch: Batch | None = None) -> torch.Tensor:
        s, t = self._states(student, teacher)
        if self.projection is None:
            raise RuntimeError(
                f"{self.name} has no projection yet: call loss.setup(student_outputs, teacher_outputs) with one "
                "batch's outputs (features included) before using it; the Distiller does this before training, "
                "so the projection is trained with the student")
        weight = getattr(self.projection, "weight", None)
        if weight is not None and s.dtype != weight.dtype:
            s = s.to(weight.dtype)
        # (B, T, D_s) -> (B, T, D_t)
        return hidden_state_loss(self.projection(s), t, hidden_state_mask(batch, tuple(s.shape[:2])),
                                 distance=self.distance, normalize=self.normalize)

    def extra_repr(self) -> str:
        return (f"taps={self.taps}, distance={self.distance!r}, projection={self.projection_option}, "
                f"normalize={self.normalize}")


def hidden_state_losses(
    student: nn.Module,
    teacher: nn.Module,
    mapping: LayerMapping = "uniform",
    weight: float = 1.0,
    **kwargs,
) -> dict[str, tuple[HiddenStateLoss, float]]:
    """One :class:`HiddenStateLoss` per mapped pair of transformer blocks, for a
    :class:`~kdistill.losses.WeightedSum`::

        loss = WeightedSum({"kd": (KDLoss(1.0), 1.0), **hidden_state_losses(student, teacher)})

    The blocks are found with :func:`decoder_layer_paths` and paired with
    :func:`layer_mapping`. Each pair is named ``hidden_s{i}_t{j}`` (its 0-based student and
    teacher layer), which is also the name its term is logged under
    (``distillation/hidden_s0_t1``). Pairs are summed, as TinyBERT sums its layers: to keep
    the total's scale when the number of pairs changes, give ``weight=1 / len(pairs)``.

    Args:
        student: the student, as given to the Distiller.
        teacher: the teacher module (a :class:`~kdistill.teacher.LiveTeacher`'s
            ``module`` is taken).
        mapping: as for :func:`layer_mapping`.
        weight: each pair's weight in the sum, ``>= 0``.
        **kwargs: :class:`HiddenStateLoss`'s options (``distance``, ``projection``,
            ``normalize``).

    Returns:
        ``{name: (HiddenStateLoss, weight)}`` in the student's layer order.

    Raises:
        ValueError: as :func:`decoder_layer_paths` and :func:`layer_mapping`; a negative
            weight.
    """
    w = check_weight("weight", weight)
    if not isinstance(teacher, nn.Module) and isinstance(getattr(teacher, "module", None), nn.Module):
        teacher = teacher.module
    s_paths, t_paths = decoder_layer_paths(student), decoder_layer_paths(teacher)
    pairs = layer_mapping(len(s_paths), len(t_paths), mapping)
    return {f"hidden_s{i}_t{j}": (HiddenStateLoss(s_paths[i], t_paths[j], **kwargs), w) for i, j in pairs.items()}
