"""Born-again networks (self-distillation in generations).

Furlanello, Lipton, Tschannen, Itti & Anandkumar (2018), "Born-Again Neural Networks",
ICML, arXiv:1805.04770: a student of the *same* architecture as its teacher is distilled
from it; that student is the next generation's teacher, and so on. Generation 1 learns
from the trained teacher (generation 0), generation ``k + 1`` from generation ``k``.

Decisions (named so they can be checked):

* Every generation is a fresh network from ``model_fn()`` (new initial weights), trained
  with the same settings (a :class:`~kdistill.Distiller` with ``compile``'s and ``fit``'s
  arguments as given).
* ``ensemble=True``: the *last* generation's teacher is the ensemble of every earlier
  generation, the original teacher (generation 0) included, combined by
  :class:`~kdistill.teacher.EnsembleTeacher` as the mean of their softened probabilities
  at the loss's temperature (``"mean_probs"``). The earlier generations distil from their
  predecessor as without it.
"""

from __future__ import annotations

from typing import Any, Callable

from torch import nn

from .distiller import Distiller
from .teacher import EnsembleTeacher


def born_again(model_fn: Callable[[], nn.Module], teacher: nn.Module, x: Any, y: Any = None, *,
               generations: int = 2, ensemble: bool = False, optimizer: Any = "adam",
               learning_rate: float | None = None, metrics: Any = ("accuracy",), alpha: float = 0.1,
               temperature: float = 4.0, **fit_kwargs: Any) -> list[Distiller]:
    """Distil ``generations`` generations of the teacher's architecture, each from the last.

    Example::

        gens = born_again(lambda: build_model("classic_teacher"), teacher, x_train, y_train,
                          generations=3, epochs=5, validation_data=(x_test, y_test), seed=0)
        [g.evaluate(x_test, y_test)["accuracy"] for g in gens]   # generation 1, 2, 3

    Args:
        model_fn: builds one untrained network of the teacher's architecture (called once
            per generation; seed inside it for repeatable initial weights).
        teacher: the trained teacher (generation 0).
        x, y: the training data, as :meth:`kdistill.Trainer.fit` takes it.
        generations: how many generations to distil (``>= 1``).
        ensemble: the last generation distils from the ensemble of all earlier ones
            (the teacher included); needs ``generations >= 1``.
        optimizer: a name (with ``learning_rate``) or a factory ``params -> Optimizer``,
            used for every generation (an optimizer instance would serve one only).
        metrics, alpha, temperature: :meth:`kdistill.Distiller.compile`'s.
        **fit_kwargs: :meth:`kdistill.Distiller.fit`'s (``epochs``, ``batch_size``,
            ``validation_data``, ``seed``, ``callbacks``, ...), for every generation.

    Returns:
        One fitted Distiller per generation, in order; ``[k - 1].student`` is generation
        ``k`` and ``[k - 1].history`` its training.

    Raises:
        ValueError: ``generations`` below 1, an optimizer instance, a generation whose
            network is the teacher or an earlier generation.
    """
    if isinstance(generations, bool) or not isinstance(generations, int) or generations < 1:
        raise ValueError(f"generations must be an integer >= 1, got {generations!r}")
    if not callable(model_fn) or isinstance(model_fn, nn.Module):
        raise TypeError("model_fn must be a function that builds a new network (e.g. lambda: "
                        "build_model('classic_teacher')), not a network")
    if not (isinstance(optimizer, str) or callable(optimizer)):
        raise ValueError("optimizer must be a name or a factory params -> Optimizer: each generation trains a new "
                         f"network with its own optimizer, got {type(optimizer).__name__}")
    earlier: list[nn.Module] = [teacher]
    out: list[Distiller] = []
    for k in range(1, generations + 1):
        # 1. a new network of the teacher's architecture
        student = model_fn()
        if any(student is m for m in earlier):
            raise ValueError(f"model_fn returned the network of an earlier generation for generation {k}: it must "
                             "build a new one on every call")
        # 2. its teacher: the last generation, or (the last, with ensemble) all earlier ones
        source: Any = earlier[-1]
        if ensemble and k == generations and len(earlier) >= 2:
            source = EnsembleTeacher(earlier, combine="mean_probs", names=[f"gen{i}" for i in range(len(earlier))])
        # 3. distil
        dist = Distiller(student=student, teacher=source)
        dist.compile(optimizer=optimizer, learning_rate=learning_rate, metrics=list(metrics), alpha=alpha,
                     temperature=temperature)
        dist.fit(x, y, **fit_kwargs)
        out.append(dist)
        earlier.append(student)
    return out
