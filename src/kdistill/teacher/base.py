"""The teacher protocol: the calls the Distiller makes on any kind of teacher.

The Distiller never asks what kind of teacher it holds. Per fit, and per batch, it calls:

1. ``teacher.set_taps(paths)`` once before training: the teacher layers the losses read
   (``[]``: none; after training, ``[]`` again);
2. ``teacher.set_temperatures(temps)`` at ``compile``: the temperatures of the
   distillation losses (a cache of top-k logits serves logits exact at one of them);
3. ``teacher.resolve_augment(augment)`` at ``fit``: the augmentation ``fit`` should apply
   to each batch before the teacher sees it (a cache with stored views replays its own and
   returns ``None``; one without views refuses any);
4. ``teacher.prepare(batch, epoch) -> batch`` on every training batch: what the teacher
   needs done to the batch that the student then sees too (a cached view's augmentation
   replayed from its seed);
5. ``teacher(batch) -> Outputs`` on every training batch: logits and tapped features,
   without a graph (losses may keep them for the student's backward);
6. ``teacher.parameters()``: the frozen parameters, so that ``compile`` can refuse an
   optimizer that holds one.

:class:`Teacher` gives every call a default (no taps, no temperature, no augmentation of
its own, no parameters); a teacher kind overrides what it needs. Subclass it for a kind of
your own (a remote teacher, an ensemble): nothing else in the package changes.
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator

from torch import nn

from ..outputs import Batch, Outputs


class Teacher:
    """Base class of every teacher kind (see the module docstring for the protocol)."""

    def __call__(self, batch: Batch) -> Outputs:
        """The teacher's outputs for ``batch``: ``Outputs(logits, features)``.

        Args:
            batch: a prepared batch (:meth:`prepare`) on the training device.

        Returns:
            ``logits`` ``(B, C)`` (or ``(B, T, V)``) and ``features`` for each layer named
            in :meth:`set_taps`; tensors outside inference mode, without a graph.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement __call__(batch) -> Outputs")

    def prepare(self, batch: Batch, epoch: int) -> Batch:
        """The training batch as teacher and student both see it in ``epoch``.

        Default: the batch unchanged. A batch prepared once is returned as it is.
        """
        return batch

    def set_taps(self, paths: Iterable[str]) -> None:
        """Serve these teacher layers in ``Outputs.features`` (``[]``: none).

        Raises:
            ValueError: (default) any layer at all: this teacher serves logits only.
        """
        paths = sorted(set(paths))
        if paths:
            raise ValueError(f"{self!r} serves logits only; the losses read its layers {paths}")

    def set_temperatures(self, temperatures: Iterable[float]) -> None:
        """Told at ``compile``: the temperatures at which the losses soften the logits.

        Default: ignored (logits are exact at every temperature).
        """

    def resolve_augment(self, augment: Any) -> Any:
        """The augmentation ``fit`` applies before :meth:`prepare`, given the one it was
        passed (``None``: none). Default: ``augment`` unchanged."""
        return augment

    def parameters(self) -> Iterator[nn.Parameter]:
        """The teacher's (frozen) parameters; default none."""
        return iter(())

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


#: The calls the Distiller makes; an object with all of them is accepted as a teacher.
PROTOCOL = ("__call__", "prepare", "set_taps", "set_temperatures", "resolve_augment", "parameters")


def missing_calls(obj: Any) -> list[str]:
    """The protocol calls ``obj`` lacks (``[]``: it can serve as a teacher)."""
    return [name for name in PROTOCOL if not callable(getattr(obj, name, None))]
