"""The engine: ``Trainer`` (one loop for every model) and ``Distiller(Trainer)``.

The API is the shape of ``keras.Model`` and of the classic Keras ``Distiller`` example:
``compile`` then ``fit`` / ``evaluate`` / ``predict``, with ``train_step`` and
``test_step`` to override.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable, Iterable, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import distributed
from .callbacks import Callback, History, ProgressBar
from .data.loader import make_loader
from .errors import NonFiniteLossError
from .losses import DistillationLoss, SoftTargetLoss, WeightedSum, check_divergence
from .losses.logits import check_same_classes, check_temperature
from .losses.tokens import check_vocabularies
from .metrics import Metric, resolve_metrics
from .outputs import IGNORE_INDEX, UNLABELLED, Batch, Inputs, Outputs
from .runtime import get_device, seed_everything
from .taps import CheckedForward, FeatureTaps
from .teacher import EnsembleTeacher, LiveTeacher, Teacher
from .teacher.base import missing_calls

OptimizerSpec = torch.optim.Optimizer | str | Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]

#: Optimizers by name, with their default learning rate: ``compile(optimizer="adam")``
#: and a config's ``optimizer: {name: adam}`` both resolve names here.
OPTIMIZERS: dict[str, tuple[type[torch.optim.Optimizer], float]] = {
    "adam": (torch.optim.Adam, 1e-3),
    "adamw": (torch.optim.AdamW, 1e-3),
    "sgd": (torch.optim.SGD, 1e-2),
    "rmsprop": (torch.optim.RMSprop, 1e-3),
}

#: ``compile(precision=...)``: the dtype the model's forward autocasts to (``None``: float32).
PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def check_precision(precision: str, device: torch.device | str) -> torch.dtype | None:
    """The autocast dtype of ``precision`` on ``device``, or a clear refusal.

    Args:
        precision: ``"fp32"``, ``"bf16"`` (CPU and CUDA) or ``"fp16"`` (CUDA only).
        device: where the model trains.

    Returns:
        ``None`` for fp32, else ``torch.bfloat16`` or ``torch.float16``.

    Raises:
        ValueError: an unknown name, fp16 off CUDA, bf16 on a device without it.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")
    kind = torch.device(device).type
    if precision == "fp16" and kind != "cuda":
        raise ValueError(
            f"precision='fp16' needs a CUDA device (float16 autocast with a gradient scaler); this model trains "
            f"on {kind!r}. Use precision='bf16' for mixed precision on the CPU, or 'fp32'")
    if precision == "bf16":
        if kind not in ("cpu", "cuda"):
            raise ValueError(f"precision='bf16' runs on 'cpu' and 'cuda' devices; this model trains on {kind!r}. "
                             "Use precision='fp32'")
        if kind == "cuda" and not torch.cuda.is_bf16_supported():
            raise ValueError("precision='bf16' needs a GPU with bfloat16 support (Ampere or newer); "
                             "use precision='fp16' on this GPU")
    return PRECISIONS[precision]


class _MicroStep(NamedTuple):
    """Where a training step's batch sits in the accumulated batch of one optimizer step."""

    first: bool  # zero the gradients before its backward pass
    last: bool  # clip and step the optimizer after it
    samples: float  # its share of the accumulated batch's samples
    labelled: float  # its share of the accumulated batch's labelled samples


_WHOLE = _MicroStep(True, True, 1.0, 1.0)  # no accumulation: the batch is the whole step
_WHOLE_SHARES = ((1.0, 1.0),)  # Trainer._shares of one batch


class _EpochMeans:
    """Running means of the step logs, each weighted by the samples it was averaged over.

    In a multi-process fit (``shared`` given), each step's weighted sums are summed across
    the processes before they are added, so every process holds the means over all of
    them: the epoch's logs need no further reduction, and the sums a training state saves
    on rank 0 are the whole run's (a resume restores them on every process).
    """

    def __init__(self, shared: distributed.StepSums | None = None) -> None:
        self.sums: dict[str, float] = {}
        self.weights: dict[str, float] = {}
        self.shared = shared

    def update(self, logs: dict[str, float], weights: dict[str, float]) -> None:
        """Add one step's logs, ``weights[name]`` (or ``weights["*"]``) samples each."""
        if self.shared is None:  # straight in: the same sums as weigh-then-add, without the dicts between
            default = weights["*"]
            for k, v in logs.items():
                w = weights.get(k, default)
                if w > 0:
                    self.sums[k] = self.sums.get(k, 0.0) + v * w
                    self.weights[k] = self.weights.get(k, 0.0) + w
            return
        sums: dict[str, float] = {}
        counts: dict[str, float] = {}
        self.weigh(logs, weights, sums, counts)
        self.add(sums, counts)

    @staticmethod
    def weigh(logs: dict[str, float], weights: dict[str, float], sums: dict[str, float],
              counts: dict[str, float]) -> None:
        """Add ``logs`` times their weights into ``sums`` and the weights into ``counts``
        (the micro-batches of one accumulated step are gathered this way, then added once)."""
        for k, v in logs.items():
            w = weights.get(k, weights["*"])
            if w > 0:
                sums[k] = sums.get(k, 0.0) + v * w
                counts[k] = counts.get(k, 0.0) + w

    def add(self, sums: dict[str, float], counts: dict[str, float]) -> None:
        """Add weighted sums and their weights (from :meth:`weigh`); with ``shared``, first
        summed across the processes (a collective: every process, every call)."""
        if self.shared is not None:
            local = {f"s:{k}": v for k, v in sums.items()}
            local.update({f"w:{k}": w for k, w in counts.items()})
            total = self.shared(local)
            sums = {name[2:]: v for name, v in total.items() if name.startswith("s:")}
            counts = {name[2:]: w for name, w in total.items() if name.startswith("w:")}
        for k, w in counts.items():
            if w > 0:
                self.sums[k] = self.sums.get(k, 0.0) + sums[k]
                self.weights[k] = self.weights.get(k, 0.0) + w

    def result(self) -> dict[str, float]:
        return {k: self.sums[k] / self.weights[k] for k in self.sums}


_PLAIN = (bool, int, float, str, type(None))


def _plain(values: dict[str, Any]) -> dict[str, Any]:
    """The entries of ``values`` that are plain data (numbers, strings, and lists, tuples
    and string-keyed dicts of them); tensors, modules and callables are left out."""

    def plain(v: Any) -> bool:
        if isinstance(v, _PLAIN):
            return True
        if isinstance(v, (list, tuple)):
            return all(plain(x) for x in v)
        if isinstance(v, dict):
            return all(isinstance(k, str) and plain(x) for k, x in v.items())
        return False

    return {k: v for k, v in values.items() if plain(v)}


#: Module attributes that change as training goes, or are not settings.
_NOT_SETTINGS = frozenset({"training", "epoch", "global_step"})


def _module_settings(module: nn.Module) -> dict[str, Any]:
    """``{"class": ..., setting: value, child: {...}}``: the public attributes of ``module``
    that are plain data (a loss's temperature, weights, reduction), and its submodules'."""
    out = {"class": type(module).__qualname__}
    out.update(_plain({k: v for k, v in vars(module).items() if not k.startswith("_") and k not in _NOT_SETTINGS}))
    for name, child in module.named_children():
        out[name] = _module_settings(child)
    return out


def _describe(obj: Any) -> Any:
    """A description of a callable (a loss, an augmentation) that is the same in every
    process that built it alike: its settings, never its address in memory."""
    if obj is None:
        return None
    if callable(getattr(obj, "to_config", None)):
        return obj.to_config()
    if isinstance(obj, nn.Module):
        return _module_settings(obj)
    name = getattr(obj, "__qualname__", None) or type(obj).__qualname__
    return f"{getattr(obj, '__module__', None) or type(obj).__module__}.{name}"


def _to_floats(logs: dict[str, torch.Tensor | float]) -> dict[str, float]:
    """Step logs as Python floats (each read as float32, as logged), with at most one
    device synchronisation.

    Tensors on the CPU are read one by one: reading them synchronises nothing, and one
    ``item()`` costs less than the four operations of gathering them into one tensor.
    Tensors on an accelerator are stacked and read at once."""
    out: dict[str, float] = {}
    pending: dict[str, torch.Tensor] = {}
    for k, v in logs.items():
        if not isinstance(v, torch.Tensor):
            out[k] = float(v)  # a user's train_step may return floats
        elif v.is_cpu:
            out[k] = v.item() if v.dtype == torch.float32 else float(v.detach().float())
        else:
            pending[k] = v
    if not pending:
        return out
    values = torch.stack([v.detach().float().reshape(()) for v in pending.values()]).tolist()
    out.update(zip(pending, values))
    return {k: out[k] for k in logs}


class _Passes:
    """Draws batches from a loader pass after pass (a new shuffle each pass), and can save
    and restore its position: the shuffle generator's state at the start of the current
    pass and how many batches of it were drawn."""

    def __init__(self, loader: Iterable[Batch], generator: torch.Generator | None):
        self.loader = loader
        self.generator = generator
        self.iterator: Any = None
        self.pass_start: torch.Tensor | None = None
        self.consumed = 0

    def _new_pass(self) -> None:
        self.pass_start = None if self.generator is None else self.generator.get_state()
        self.iterator = iter(self.loader)
        self.consumed = 0

    def next(self) -> Batch:
        if self.iterator is None:
            self._new_pass()
        try:
            batch = next(self.iterator)
        except StopIteration:
            self._new_pass()
            batch = next(self.iterator)
        self.consumed += 1
        return batch

    def state(self) -> dict:
        if self.iterator is None or self.consumed >= len(self.loader):  # the next batch starts a pass
            return {"pass_start": None if self.generator is None else self.generator.get_state(), "consumed": 0}
        return {"pass_start": self.pass_start, "consumed": self.consumed}

    def restore(self, state: dict) -> None:
        if self.generator is not None and state["pass_start"] is not None:
            self.generator.set_state(state["pass_start"])
        self._new_pass()
        for _ in range(state["consumed"]):  # index slicing only: no model runs
            next(self.iterator)
        self.consumed = state["consumed"]


class Trainer:
    """Trains and evaluates one model: a teacher, or a student from scratch.

    Example::

        trainer = Trainer(build_model("classic_teacher"))
        trainer.compile(optimizer="adam", metrics=["accuracy"])
        history = trainer.fit(x_train, y_train, epochs=3, validation_data=(x_test, y_test))

    Args:
        model: the network; it maps a batch of inputs to ``(B, C)`` logits.
        device: where to train (default: :func:`kdistill.runtime.get_device`).
    """

    #: How the trained model is named in error messages.
    model_role: str = "model"
    #: Logs averaged over the labelled samples only (the rest over every sample).
    label_weighted_logs: tuple[str, ...] = ("loss",)

    def __init__(self, model: nn.Module, *, device: str | torch.device | None = None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        distributed.init()  # started by torchrun: join its process group (a no-op otherwise)
        self.device = get_device(device)
        self.model = model.to(self.device)
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler: Any = None
        self.scheduler_interval = "epoch"
        self.augment: Callable[[torch.Tensor], torch.Tensor] | None = None
        self.loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
        self.metrics: dict[str, Metric] = {}
        self.train_temperature = 1.0  # of the supervised softmax (compile(temperature=...))
        # the training step (compile(precision=, accumulate_steps=, max_grad_norm=))
        self.precision = "fp32"
        self._autocast: torch.dtype | None = None
        self.scaler: torch.amp.GradScaler | None = None  # fp16 only
        self.accumulate_steps = 1
        self.max_grad_norm: float | None = None
        self._micro: _MicroStep | None = None  # set by fit for each batch it trains on
        self._has_grads = False  # a backward pass ran since the gradients were zeroed
        self._calls_since_step = 0  # train_step calls outside fit since the last optimizer step
        self._grad_norm: torch.Tensor | None = None  # of the last optimizer step, when clipping
        # the logs the last train_step read (their tensors and values), so fit does not read them again
        self._step_values: tuple[dict[str, Any], dict[str, float]] | None = None
        self.stop_training = False
        self.history: History | None = None
        self.epoch = 0
        self.step_in_epoch = 0
        self.global_step = 0
        # explains a rejected input shape/dtype (checked again for each new one, so
        # evaluate/predict on other data still explains a rejection)
        self._checked_forward = CheckedForward(self.model_role)
        #: keyword arguments for DistributedDataParallel in a multi-process fit (e.g.
        #: ``{"find_unused_parameters": True}`` for a model with branches a step may skip)
        self.ddp_kwargs: dict[str, Any] = {}
        self._ddp: nn.Module | None = None
        self._shard: tuple[int, int] | None = None
        self._outside_ddp: list[nn.Parameter] = []

    # ------------------------------------------------------------------ set-up
    def compile(
        self,
        optimizer: OptimizerSpec = "adam",
        loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        metrics: Sequence[str | Metric] | None = None,
        *,
        temperature: float = 1.0,
        learning_rate: float | None = None,
        scheduler: Any = None,
        scheduler_interval: str = "epoch",
        precision: str = "fp32",
        accumulate_steps: int = 1,
        max_grad_norm: float | None = None,
    ) -> "Trainer":
        """Configure training.

        Args:
            optimizer: a ``torch.optim.Optimizer`` over the model's parameters, a name
                (``"adam"``, ``"adamw"``, ``"sgd"``, ``"rmsprop"``), or a callable that
                takes the parameters and returns an optimizer.
            loss: ``loss(logits, targets) -> scalar``, PyTorch's ``(input, target)`` order;
                default ``nn.CrossEntropyLoss()``. Samples with target ``-1`` are left out.
            metrics: names (``"accuracy"``, ``"top5"``) or callables ``(logits, targets)``.
            temperature: divide the logits by this before the loss. 1 is ordinary
                training; the classic distillation recipe may train the teacher with the
                same tempered softmax it will be distilled at.
            learning_rate: learning rate when ``optimizer`` is a name.
            scheduler: a learning-rate scheduler over the optimizer, or a callable
                ``optimizer -> scheduler`` (e.g. ``lambda opt:
                torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10)``).
            scheduler_interval: ``"epoch"`` (step the scheduler after each epoch) or
                ``"step"`` (after each optimizer step).
            precision: ``"fp32"`` (default); ``"bf16"``: the model's forward runs under
                ``torch.autocast`` in bfloat16 (CPU and CUDA); ``"fp16"``: in float16 with
                a ``torch.amp.GradScaler`` (CUDA only; refused on the CPU). The outputs
                come back as float32, so every loss computes in float32; weights and
                optimizer state stay float32. Applies to ``fit``, ``evaluate`` and
                ``predict``. A Distiller's teacher keeps its own precision
                (:class:`~kdistill.teacher.LiveTeacher`'s ``autocast=``).
            accumulate_steps: micro-batches per optimizer step (gradient accumulation).
                ``fit``'s ``batch_size`` is then the micro-batch; each optimizer step
                trains on ``accumulate_steps * batch_size`` samples, each micro-batch's
                mean loss weighted by its share of them (a short last micro-batch
                counts for its samples only), so the gradient is the one of the whole
                batch. Steps, schedules and checkpoints count optimizer steps (see
                :meth:`fit`).
            max_grad_norm: clip the gradients of every parameter the optimizer trains
                (adapters included) to this total L2 norm before each optimizer step
                (after unscaling, with fp16); the norm before clipping is logged as
                ``grad_norm``. ``None`` (default): no clipping.

        Returns:
            ``self``, so calls can be chained.

        Raises:
            ValueError: a precision the device cannot run (fp16 on the CPU: use bf16),
                ``accumulate_steps`` below 1, ``max_grad_norm`` not > 0.
        """
        self._autocast = check_precision(precision, self.device)
        if isinstance(accumulate_steps, bool) or not isinstance(accumulate_steps, int) or accumulate_steps < 1:
            raise ValueError(f"accumulate_steps must be an integer >= 1 (micro-batches per optimizer step), "
                             f"got {accumulate_steps!r}")
        if max_grad_norm is not None:
            try:
                norm = float(max_grad_norm)
            except (TypeError, ValueError):
                norm = math.nan
            if not (math.isfinite(norm) and norm > 0):
                raise ValueError(f"max_grad_norm must be a finite number > 0 or None (no clipping), got {max_grad_norm!r}")
            max_grad_norm = norm
        self.precision, self.accumulate_steps, self.max_grad_norm = precision, accumulate_steps, max_grad_norm
        self.scaler = torch.amp.GradScaler(self.device.type) if precision == "fp16" else None
        self._calls_since_step = 0
        self.train_temperature = check_temperature(temperature)
        self.loss_fn = nn.CrossEntropyLoss() if loss is None else loss
        if not callable(self.loss_fn):
            raise TypeError(f"loss must be callable (logits, targets) -> tensor, got {type(loss).__name__}")
        self.metrics = resolve_metrics(metrics)
        self.optimizer = self._build_optimizer(optimizer, learning_rate)
        self.scheduler, self.scheduler_interval = self._build_scheduler(scheduler, scheduler_interval)
        return self

    def _build_scheduler(self, spec: Any, interval: str) -> tuple[Any, str]:
        if interval not in ("epoch", "step"):
            raise ValueError(f"scheduler_interval must be 'epoch' or 'step', got {interval!r}")
        self._scheduler_factory = None
        if spec is None:
            return None, interval
        is_instance = hasattr(spec, "step") and hasattr(spec, "state_dict")
        sched = spec if is_instance else spec(self.optimizer)
        if not is_instance:
            self._scheduler_factory = spec
        if not (hasattr(sched, "step") and hasattr(sched, "state_dict")):
            raise TypeError(f"scheduler must be a torch.optim.lr_scheduler scheduler or a factory of one, got {type(sched).__name__}")
        if getattr(sched, "optimizer", self.optimizer) is not self.optimizer:
            raise ValueError("the scheduler was built over another optimizer; build it over the one given to compile()")
        return sched, interval

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters the optimizer must train (the Distiller adds adapters here)."""
        return [p for p in self.model.parameters() if p.requires_grad]

    def _build_optimizer(self, spec: OptimizerSpec, learning_rate: float | None) -> torch.optim.Optimizer:
        params = self.trainable_parameters()
        if isinstance(spec, torch.optim.Optimizer):
            if learning_rate is not None:
                raise ValueError("learning_rate is only used with an optimizer given by name")
            opt = spec
        elif isinstance(spec, str):
            key = spec.lower()
            if key not in OPTIMIZERS:
                raise ValueError(f"unknown optimizer {spec!r}: expected one of {sorted(OPTIMIZERS)} or a torch.optim.Optimizer")
            cls, default_lr = OPTIMIZERS[key]
            opt = cls(params, lr=default_lr if learning_rate is None else learning_rate)
        elif callable(spec):
            opt = spec(params)
            if not isinstance(opt, torch.optim.Optimizer):
                raise TypeError(f"the optimizer factory returned {type(opt).__name__}, not a torch.optim.Optimizer")
        else:
            raise TypeError(f"optimizer must be an Optimizer, a name or a factory, got {type(spec).__name__}")
        in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
        if not any(id(p) in in_opt for p in params):
            raise ValueError(
                f"the optimizer holds none of the parameters of the model being trained "
                f"({type(self.model).__name__}); build it over them, e.g. "
                "torch.optim.Adam(student.parameters())"
            )
        return opt

    def _require_compiled(self) -> None:
        if self.optimizer is None:
            raise RuntimeError(f"call {type(self).__name__}.compile(...) before fit/train_step")

    # ------------------------------------------------------------------ steps
    def forward(self, model: nn.Module, inputs: Inputs) -> torch.Tensor:
        """Run ``model`` on ``inputs`` (under autocast with ``precision`` bf16/fp16, the
        outputs then cast to float32); a rejected input shape or dtype is explained.

        ``inputs`` is a tensor (``model(x)``) or, for a language model, a dict passed as
        keyword arguments; a Hugging Face ``ModelOutput`` gives its ``logits``."""
        if self._autocast is None:
            checked = self._checked_forward
            if type(inputs) is torch.Tensor and (tuple(inputs.shape[1:]), inputs.dtype) in checked.plain:
                return model(inputs)  # explained once per shape: the plain call
            return checked(model, inputs)
        with torch.autocast(self.device.type, dtype=self._autocast):
            out = self._checked_forward(model, inputs)
        return out.float()

    def supervised_loss(self, logits: torch.Tensor, batch: Batch, *,
                        log_probs: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
        """The hard-label loss over the labelled samples of ``batch``.

        Args:
            logits: the model's scores.
            batch: the batch with its targets.
            log_probs: token batches: ``log_softmax(logits / train_temperature)`` when it is
                already computed, for the default cross-entropy to read (the same numbers).

        Returns:
            ``(loss, n_labelled)``; the loss is ``0`` (no gradient) when nothing is labelled.
        """
        if batch.targets is None:
            raise ValueError("training needs labels: pass y to fit, or a dataset that yields (inputs, targets)")
        if logits.dim() > 2 and batch.targets.dim() > 1:
            return self._token_loss(logits, batch, log_probs)
        if batch.mix is not None:  # mixup / cutmix: both labels, weighted by the mix
            both = (batch.targets != UNLABELLED) & (batch.mix.targets != UNLABELLED)
            n = int(both.sum())
            if n == 0:
                return self._no_loss(logits), 0
            z = logits[both] if self.train_temperature == 1.0 else logits[both] / self.train_temperature
            lam = batch.mix.lam
            return lam * self.loss_fn(z, batch.targets[both]) + (1 - lam) * self.loss_fn(z, batch.mix.targets[both]), n
        fn, t = self.loss_fn, self.train_temperature
        # An nn.CrossEntropyLoss without hooks of its own is called as nn.Module calls it, through its
        # forward, without the module-call machinery (~15 us in a small model's step; global module
        # hooks are not run for it). On the CPU it refuses a -1 target (IndexError), so a batch it
        # takes whole is all labelled: no look for unlabelled samples first (a reduction and a read).
        plain_ce = type(fn) is nn.CrossEntropyLoss and not (
            fn._forward_pre_hooks or fn._forward_hooks or fn._backward_pre_hooks or fn._backward_hooks)
        call = fn.forward if plain_ce else fn
        if plain_ce and not batch.labelled_known and fn.ignore_index != UNLABELLED and logits.is_cpu:
            try:
                loss = call(logits if t == 1.0 else logits / t, batch.targets)
            except IndexError:
                pass  # a -1 target, or a label out of range: see below
            else:
                batch.labelled = None
                return loss, logits.shape[0]
        mask = batch.labelled
        if mask is None:
            logits, targets, n = logits, batch.targets, len(batch)
        else:
            n = int(mask.sum())
            if n == 0:
                return self._no_loss(logits), 0
            logits, targets = logits[mask], batch.targets[mask]
        try:  # (x / 1 is x, bit for bit: the ordinary softmax needs no division)
            return call(logits if t == 1.0 else logits / t, targets), n
        except IndexError as e:  # a label outside [0, C)
            raise ValueError(
                f"labels must be class indices in [0, {logits.shape[-1]}) for a model with "
                f"{logits.shape[-1]} outputs, or -1 for unlabelled samples; this batch has labels "
                f"from {int(targets.min())} to {int(targets.max())}. Build the model with "
                f"num_classes=<number of classes> or fix the labels. ({e})"
            ) from e

    def _no_loss(self, logits: torch.Tensor) -> torch.Tensor:
        """The loss of a batch with nothing to learn from (no labelled sample, no trained-on
        token): 0. In a multi-process fit a 0 connected to the graph (zero gradients), so
        this process still joins DDP's gradient all-reduce with the others."""
        return logits.new_zeros(()) if self._ddp is None else logits.sum() * 0.0

    def _token_loss(self, logits: torch.Tensor, batch: Batch,
                    log_probs: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
        """A sequence model's hard-label loss: the mean over the trained-on token positions
        (``targets >= 0``) of ``loss_fn`` (cross-entropy by default, the next-token loss;
        from ``log_probs`` when given: ``nll_loss(log_softmax(z))`` is PyTorch's
        cross-entropy)."""
        targets = batch.targets
        if tuple(targets.shape) != tuple(logits.shape[:-1]):
            raise ValueError(
                f"the token targets have shape {tuple(targets.shape)} but the logits {tuple(logits.shape)}: "
                "a language model's batch needs one target per position, (batch, sequence)")
        mask = batch.labelled  # (B, T): targets >= 0
        n = int(mask.sum())
        if n == 0:
            return self._no_loss(logits), 0
        fn, t = self.loss_fn, self.train_temperature
        z = logits if t == 1.0 else logits / t
        vocab = logits.shape[-1]
        if type(fn) is nn.CrossEntropyLoss and fn.ignore_index == IGNORE_INDEX and fn.reduction == "mean":
            # (B, T, V) -> (B*T, V); the ignored positions drop out of the mean (no masked copy)
            flat = targets.reshape(-1)
            if int(flat.max()) >= vocab:
                raise ValueError(
                    f"a token target is {int(flat.max())} but the model scores {vocab} tokens: tokenise the data "
                    "with the model's own tokenizer (or build the model with vocab_size >= the tokenizer's)")
            if log_probs is not None and fn.weight is None and fn.label_smoothing == 0.0:
                return F.nll_loss(log_probs.reshape(-1, vocab), flat, ignore_index=IGNORE_INDEX), n
            return fn.forward(z.reshape(-1, vocab), flat), n
        return fn(z[mask], targets[mask]), n

    def compute_metrics(self, logits: torch.Tensor, batch: Batch) -> dict[str, torch.Tensor]:
        if not self.metrics or batch.targets is None:
            return {}
        mask = batch.labelled
        logits, targets = (logits, batch.targets) if mask is None else (logits[mask], batch.targets[mask])
        if targets.numel() == 0:
            return {}
        return {name: fn(logits, targets) for name, fn in self.metrics.items()}

    def check_finite(self, terms: dict[str, torch.Tensor]) -> dict[str, float]:
        """Raise :class:`NonFiniteLossError` naming the step and term if any is NaN/inf.

        Reads every term with one device synchronisation and returns them as floats.
        """
        values = _to_floats(terms)
        self._check_values(values, terms)
        return values

    def _check_values(self, values: dict[str, float], names: Iterable[str]) -> None:
        for name in names:
            value = values[name]
            if not math.isfinite(value):
                raise NonFiniteLossError(
                    f"loss term '{name}' is {value} at epoch {self.epoch + 1}, step "
                    f"{self.step_in_epoch + 1} (global step {self.global_step + 1}); training stopped "
                    "before the optimizer step, so the weights are the last finite ones. Common "
                    "causes: a learning rate too high, NaN/inf in the inputs, or a loss taking log(0)."
                )

    def _read_step_logs(self, logs: dict[str, torch.Tensor], terms: Iterable[str]) -> dict[str, float]:
        """Read a training step's logs (loss terms and metrics) with one device
        synchronisation, before its optimizer step, and raise
        :class:`NonFiniteLossError` if one of ``terms`` (names in ``logs``) is NaN/inf.

        ``fit`` then logs these values without reading the same tensors again: one read
        per step, which is what checking the loss for NaN costs anyway.

        Returns:
            ``logs`` as floats.
        """
        values = _to_floats(logs)
        for name in terms:
            if not math.isfinite(values[name]):
                self._check_values(values, terms)  # raises, naming the term
        self._step_values = (dict(logs), values)
        return values

    def _logged_values(self, logs: dict[str, Any]) -> dict[str, float]:
        """The floats of the logs a ``train_step`` returned: those it read already
        (:meth:`_read_step_logs`, the same tensors), the rest (``grad_norm``, or logs a
        subclass added or replaced) read now."""
        known, self._step_values = self._step_values, None
        if known is None:
            return _to_floats(logs)
        tensors, values = known
        if len(tensors) == len(logs):
            for k, v in logs.items():
                if tensors.get(k) is not v:
                    break
            else:  # the logs train_step read, unchanged
                return values
        rest = {k: v for k, v in logs.items() if tensors.get(k) is not v}
        read = _to_floats(rest)
        return {k: read[k] if k in rest else values[k] for k in logs}

    def micro_step(self) -> _MicroStep:
        """Where the batch being trained on sits in the optimizer step: ``first``,
        ``last``, and its ``samples`` and ``labelled`` shares of the accumulated batch
        (``(True, True, 1.0, 1.0)`` without accumulation).

        Within ``fit`` the shares are exact (from the micro-batches' sizes); a
        ``train_step`` called outside ``fit`` counts as ``1 / accumulate_steps``.
        """
        if self._micro is not None:
            return self._micro
        n = self.accumulate_steps
        if n == 1:
            return _WHOLE
        i = self._calls_since_step % n
        return _MicroStep(i == 0, i == n - 1, 1.0 / n, 1.0 / n)

    def optimize(self, loss: torch.Tensor, *, weight: float | None = None) -> torch.Tensor | None:
        """Backward pass; at the end of an optimizer step, clipping and the optimizer step.

        Without accumulation every call is an optimizer step. With ``accumulate_steps``
        N, the gradients are zeroed before the first micro-batch, summed over the N, and
        the optimizer steps after the last (then the scheduler, with interval
        ``"step"``). A loss without gradient adds nothing (the optimizer still steps on
        what the other micro-batches gave).

        Args:
            loss: the batch's loss, a mean over its samples.
            weight: what that mean counts for in the optimizer step's loss; default: the
                batch's share of the accumulated batch's samples (1 without accumulation).

        Returns:
            The total gradient norm before clipping (a 0-d tensor, read by nobody until
            the step's logs are) when this call stepped the optimizer with
            ``max_grad_norm`` set; else ``None``.
        """
        # (fit sets _micro for each batch; without accumulation every call is a whole step)
        micro = self._micro or (_WHOLE if self.accumulate_steps == 1 else self.micro_step())
        if micro.first:
            self.optimizer.zero_grad(set_to_none=True)
            self._has_grads = False
        if loss.requires_grad:
            w = micro.samples if weight is None else weight
            if w != 1.0:
                loss = loss * w
            # under DDP the student's gradients are averaged across processes here (last micro-batch only)
            (loss if self.scaler is None else self.scaler.scale(loss)).backward()
            self._has_grads = True
        if self._micro is None and self.accumulate_steps > 1:
            self._calls_since_step = (self._calls_since_step + 1) % self.accumulate_steps
        self._grad_norm = None
        if not micro.last:
            return None
        if self._has_grads:
            if self._outside_ddp:
                distributed.average_gradients(self._outside_ddp)
            if self.max_grad_norm is not None:
                if self.scaler is not None:
                    self.scaler.unscale_(self.optimizer)
                params = [p for g in self.optimizer.param_groups for p in g["params"]]
                self._grad_norm = nn.utils.clip_grad_norm_(params, self.max_grad_norm)
            if self.scaler is None:
                self.optimizer.step()
            else:  # skips the step if a gradient overflowed, and adapts the scale
                self.scaler.step(self.optimizer)
                self.scaler.update()
        if self.scheduler is not None and self.scheduler_interval == "step":
            self.scheduler.step()
        return self._grad_norm

    def train_step(self, batch: Batch) -> dict[str, torch.Tensor]:
        """One optimisation step on ``batch`` (one micro-batch of it, with
        ``accumulate_steps``); returns the loss and metrics (tensors), and ``grad_norm``
        when clipping."""
        logits = self.forward(self.training_model, batch.inputs)
        loss, _ = self.supervised_loss(logits, batch)
        logs = {"loss": loss.detach()}
        if self.metrics or type(self).compute_metrics is not Trainer.compute_metrics:
            logs.update(self.compute_metrics(logits.detach(), batch))
        self._read_step_logs(logs, ("loss",))  # one read: a NaN loss stops before the optimizer step
        norm = self.optimize(loss, weight=self.micro_step().labelled)  # a mean over the labelled samples
        if norm is not None:
            logs["grad_norm"] = norm
        return logs

    def test_step(self, batch: Batch) -> dict[str, torch.Tensor]:
        """Evaluate the model on ``batch`` (no gradients): loss and metrics."""
        logits = self.forward(self.model, batch.inputs)
        logs: dict[str, torch.Tensor] = {}
        if batch.targets is not None and (batch.labelled is None or bool(batch.labelled.any())):
            logs["loss"] = self.supervised_loss(logits, batch)[0]
        logs.update(self.compute_metrics(logits, batch))
        return logs

    # ------------------------------------------------------------------ loops
    def _step_weights(self, batch: Batch) -> dict[str, float]:
        """How much each log of a step counts in the epoch mean."""
        mask = batch.labelled
        if batch.is_tokens:  # a sequence model's logs are means over its trained-on tokens
            n = n_lab = float(mask.sum())
        else:
            n = float(len(batch))
            n_lab = 0.0 if batch.targets is None else n if mask is None else float(mask.sum())
        weights = dict.fromkeys((*self.metrics, *self.label_weighted_logs), n_lab)
        weights["*"] = n
        return weights

    @property
    def training_model(self) -> nn.Module:
        """What a training step runs: the model, wrapped in ``DistributedDataParallel``
        during a multi-process ``fit``."""
        return self.model if self._ddp is None else self._ddp

    def _train_loader(self, x: Any, y: Any, batch_size: int, shuffle: bool, generator: torch.Generator, **kw: Any):
        if kw:
            raise TypeError(f"fit() got unexpected keyword arguments {sorted(kw)}")
        return make_loader(x, y, batch_size=batch_size, shuffle=shuffle, generator=generator, shard=self._shard)

    def _wrap_for_processes(self) -> None:
        """Multi-process fit: the model into DDP (which starts every process from rank 0's
        weights); trainable parameters outside the model (a loss's adapters) copied from
        rank 0 too, and averaged after each backward pass."""
        if not distributed.is_distributed():
            return
        from torch.nn.parallel import DistributedDataParallel

        ids = {id(p) for p in self.model.parameters()}
        self._outside_ddp = [p for g in self.optimizer.param_groups for p in g["params"]
                             if p.requires_grad and id(p) not in ids]
        extra = [m for name, m in self._resumable_modules().items() if name != "model"]
        distributed.broadcast_tensors([t for m in extra for t in (*m.parameters(), *m.buffers())])
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        self._ddp = DistributedDataParallel(self.model, device_ids=device_ids, **self.ddp_kwargs)

    def _unwrap(self) -> None:
        self._ddp, self._outside_ddp = None, []

    def fit(
        self,
        x: Any,
        y: Any = None,
        *,
        epochs: int = 1,
        batch_size: int = 32,
        validation_data: Any = None,
        callbacks: Sequence[Callback] | None = None,
        shuffle: bool = True,
        verbose: int = 1,
        seed: int | None = None,
        initial_epoch: int = 0,
        steps_per_epoch: int | None = None,
        augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
        resume_from: str | Any | None = None,
        **loader_kwargs: Any,
    ) -> History:
        """Train for ``epochs`` epochs.

        Args:
            x: numpy array, tensor, ``Dataset`` or ``DataLoader`` of inputs (or of
                ``(inputs, targets)`` items).
            y: labels when ``x`` is an array or tensor; ``-1`` marks an unlabelled sample.
            epochs: epochs to train (the index of the last one, with ``initial_epoch``).
            batch_size: samples per batch (ignored for a ``DataLoader``); with
                ``compile(accumulate_steps=N)``, per micro-batch (an optimizer step then
                trains on ``N * batch_size`` samples).
            validation_data: ``(x_val, y_val)``, a Dataset or a DataLoader; evaluated after
                every epoch, logged with a ``val_`` prefix.
            callbacks: :class:`~kdistill.callbacks.Callback` instances.
            shuffle: reshuffle the training data every epoch.
            verbose: 0 silent, 1 progress bar, 2 one line per epoch.
            seed: seed every generator first; with the same initial weights the run is
                then repeatable bit for bit on the CPU.
            initial_epoch: the epoch to start at (for resuming).
            steps_per_epoch: optimizer steps per epoch; the data is cycled (reshuffled at
                each pass, continuing where the last epoch stopped) instead of making one
                pass. Used to give two runs the same number of steps on data of different
                sizes (e.g. a student trained from scratch on a labelled subset, against a
                distilled one that also sees unlabelled data). With accumulation each of
                them takes ``accumulate_steps`` batches.
            augment: ``augment(inputs) -> inputs``, or ``augment(batch) -> batch`` for a
                callable with ``on_batch = True`` (mixup and cutmix, which also mix the
                labels), applied once to each training batch on the device (a Distiller's
                teacher and student see the same augmented view).
            resume_from: a training state written by
                :class:`~kdistill.callbacks.TrainingCheckpoint` (path or dict): model,
                optimizer, scheduler, RNG states, data position and history are restored
                and training continues from the step after the one saved; pass the same
                data and arguments as the interrupted call.

        Returns:
            A :class:`~kdistill.callbacks.History` of per-epoch logs.

        With ``compile(accumulate_steps=N)`` a *step* is an optimizer step everywhere:
        ``global_step``, ``step_in_epoch``, ``steps_per_epoch``, a scheduler with
        interval ``"step"``, the callbacks' ``on_train_batch_end`` (called once per
        optimizer step, with the running means over every micro-batch so far) and
        therefore :class:`~kdistill.callbacks.TrainingCheckpoint`'s mid-epoch saves,
        which fall on optimizer-step boundaries only (a resume never starts inside an
        accumulated batch). Without ``steps_per_epoch`` an epoch is one pass: ``ceil(B /
        N)`` optimizer steps for ``B`` batches, the last one on the ``B mod N`` remaining
        batches (weighted by their samples, so it is an ordinary, smaller step). The
        logged means are over samples, as without accumulation; ``grad_norm`` (with
        ``max_grad_norm``) is the mean over optimizer steps.
        """
        # 1. set up: seeds, data, callbacks
        self._require_compiled()
        if not isinstance(epochs, int) or epochs < 1:
            raise ValueError(f"epochs must be a positive integer, got {epochs!r}")
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if steps_per_epoch is not None and (not isinstance(steps_per_epoch, int) or steps_per_epoch < 1):
            raise ValueError(f"steps_per_epoch must be a positive integer or None, got {steps_per_epoch!r}")
        if augment is not None and not callable(augment):
            raise TypeError(f"augment must be a callable inputs -> inputs, got {type(augment).__name__}")
        self.augment = augment
        world, rank = distributed.world_size(), distributed.rank()
        self._shard = (rank, world) if world > 1 else None
        if world > 1 and batch_size % world:
            raise ValueError(
                f"batch_size={batch_size} is the global batch of a {world}-process run and must split evenly: "
                f"use a multiple of {world} (each process then takes batch_size / {world} samples a step)")
        if seed is not None:
            seed_everything(seed + rank)  # each process its own random stream (augmentation, dropout)
        data_seed = seed if seed is not None else int(torch.randint(0, 2**62, (1,)))
        generator = torch.Generator()
        generator.manual_seed(distributed.broadcast_object(data_seed))  # one data order for every process
        train = self._train_loader(x, y, batch_size, shuffle, generator, **loader_kwargs)
        val = None
        if validation_data is not None:
            val = self._eval_loader(validation_data, batch_size=max(batch_size, 256), shard=self._shard)
        history = History()
        cbs: list[Callback] = [history] + list(callbacks or [])
        if verbose:
            cbs.append(ProgressBar(verbose))
        if not distributed.is_main():  # writers and printers run on rank 0 only
            cbs = [cb for cb in cbs if not getattr(cb, "main_process_only", False)]
        for cb in cbs:
            cb.set_trainer(self)
        self._callbacks = cbs
        self.history = history
        self.stop_training = False
        self._epochs = epochs
        # an epoch: optimizer steps, each on accumulate_steps batches (its last step on the rest)
        n = self.accumulate_steps
        self._steps_per_epoch = steps_per_epoch or -(-len(train) // n)
        self._batches_per_epoch = steps_per_epoch * n if steps_per_epoch else len(train)
        self._calls_since_step = 0
        self._passes = _Passes(train, generator)
        self._step_sums = distributed.StepSums() if world > 1 else None
        self._means = _EpochMeans(self._step_sums)
        self._epoch_done = False
        self.epoch, self.step_in_epoch = initial_epoch, 0
        self._fit_started, self._elapsed_before = time.perf_counter(), 0.0
        # a failure on one process (a mismatch, a bad state) fails every process, not a hang
        distributed.run_together("setting up the training", lambda: self._before_training(train, generator))
        if resume_from is not None:  # sets epoch, step, history, RNG, data position
            distributed.run_together("restoring the training state", lambda: self._restore_training_state(resume_from))
        if world > 1:  # processes set up differently would hang in a collective or train apart: fail now, together
            distributed.check_agreement("the training set-up (fit)", self._agreement_values(
                train, val, epochs=epochs, batch_size=batch_size, shuffle=shuffle, initial_epoch=initial_epoch))
        self._after_restore(train, generator)  # a loss's own pre-training stage, if it has not run
        start_epoch, start_step = self.epoch, self.step_in_epoch
        try:
            self._wrap_for_processes()
            self._train_epochs(cbs, val, epochs, start_epoch, start_step)
        finally:
            self._unwrap()
            self._after_training()
        return history

    def _augment_batch(self, batch: Batch) -> Batch:
        """A training batch as the model trains on it: augmented once (a Distiller's
        teacher and student see the same view)."""
        if self.augment is None:
            return batch
        if getattr(self.augment, "on_batch", False):
            return self.augment(batch)
        return Batch(self.augment(batch.inputs), batch.targets, batch.index)

    def _step_batches(self, group: list[Batch]) -> list[Batch]:
        """The micro-batches of one optimizer step as they are trained on, before each
        one's share of the step is counted (the Distiller's on-policy generation); here:
        as the loader gave them."""
        return group

    def _before_training(self, train: Any, generator: torch.Generator) -> None:
        """Called by :meth:`fit` once the data is ready, before a resume is restored."""

    def _after_training(self) -> None:
        """Called by :meth:`fit` when training ends, normally or not."""

    def _after_restore(self, train: Any, generator: torch.Generator) -> None:
        """Called by :meth:`fit` after a resume was restored (or where it would be)."""

    def _train_epochs(self, cbs: list, val: Any, epochs: int, start_epoch: int, start_step: int) -> None:
        # the callbacks with an on_train_batch_end of their own (the base one does nothing): the
        # epoch's running means are made for them only
        batch_cbs = [cb for cb in cbs if "on_train_batch_end" in getattr(cb, "__dict__", ())
                     or type(cb).on_train_batch_end is not Callback.on_train_batch_end]
        for cb in cbs:
            cb.on_train_begin()
        # 2. train, one epoch at a time
        for epoch in range(start_epoch, epochs):
            self.epoch = epoch
            self._epoch_done = False
            for cb in cbs:
                cb.on_epoch_begin(epoch)
            self.model.train()
            if epoch != start_epoch or start_step == 0:
                self._means = _EpochMeans(self._step_sums)
            for step in range(start_step if epoch == start_epoch else 0, self._steps_per_epoch):
                self.step_in_epoch = step
                self._optimizer_step(step)
                self.global_step += 1
                self.step_in_epoch = step + 1
                if batch_cbs:
                    running = self._means.result()
                    for cb in batch_cbs:
                        cb.on_train_batch_end(step, running)
            if self._step_sums is None:
                epoch_logs = distributed.reduce_weighted_means(self._means.sums, self._means.weights)
            else:  # summed across the processes step by step already
                epoch_logs = self._means.result()
            if val is not None:
                epoch_logs.update({f"val_{k}": v for k, v in self._run_eval(val, reduce=True).items()})
            if self.scheduler is not None and self.scheduler_interval == "epoch":
                self.scheduler.step()
            self._epoch_done = True
            for cb in cbs:
                cb.on_epoch_end(epoch, epoch_logs)
            if self.stop_training:
                break
        # 3. clean up
        self._elapsed_before, self._fit_started = self.elapsed_seconds, None
        for cb in cbs:
            cb.on_train_end()

    def _optimizer_step(self, step: int) -> None:
        """Train on the micro-batches of optimizer step ``step`` of the epoch (one batch
        without accumulation; fewer than ``accumulate_steps`` for an epoch's last step
        when its batches do not divide evenly), and add their logs to the epoch's means
        once (in a multi-process fit, one collective per optimizer step)."""
        n = min(self.accumulate_steps, self._batches_per_epoch - step * self.accumulate_steps)
        # (the batches as trained on, e.g. with generated completions, before their shares are counted)
        group = self._step_batches([self._passes.next() for _ in range(n)])
        shares = _WHOLE_SHARES if n == 1 else self._shares(group)
        if self._ddp is not None and group[0].is_tokens:
            shares = self._shares_across_processes(group, shares)
        sums: dict[str, float] = {}
        counts: dict[str, float] = {}
        self._last_batch_size = self._last_batch_tokens = 0
        try:
            for i, (batch, (samples, labelled)) in enumerate(zip(group, shares)):
                last = i == n - 1
                self._micro = _WHOLE if shares is _WHOLE_SHARES else _MicroStep(i == 0, last, samples, labelled)
                if batch.is_tokens:  # counted before the move: on the loader's CPU batch, no device synchronisation
                    self._last_batch_tokens += batch.items()
                batch = self._augment_batch(batch.to(self.device))
                self._last_batch_size += len(batch)
                self._step_values = None
                if self._ddp is not None and not last:  # DDP: no all-reduce before the last micro-batch
                    with self._ddp.no_sync():
                        logs = self.train_step(batch)
                else:
                    logs = self.train_step(batch)
                if last and self._grad_norm is not None and "grad_norm" not in logs:  # a train_step of one's own
                    logs["grad_norm"] = self._grad_norm
                logs = self._logged_values(logs)  # read by train_step already, but for grad_norm
                weights = self._step_weights(batch)
                if "grad_norm" in logs:  # one per optimizer step; none for a step fp16 skipped (overflow)
                    weights["grad_norm"] = 1.0 if math.isfinite(logs["grad_norm"]) else 0.0
                if n > 1:
                    _EpochMeans.weigh(logs, weights, sums, counts)
        finally:
            self._micro = None
        if n == 1:
            self._means.update(logs, weights)
        else:
            self._means.add(sums, counts)

    @staticmethod
    def _shares(group: list[Batch]) -> list[tuple[float, float]]:
        """Each micro-batch's share of the group's samples and of its labelled samples
        (counted on the batches as the loader gives them: no device synchronisation for
        data on the CPU)."""
        if len(group) == 1:
            return [(1.0, 1.0)]
        if group[0].is_tokens:  # tokens: every loss is a mean over the trained-on positions
            sizes = labelled = [float(b.items()) for b in group]
        else:
            sizes = [float(len(b)) for b in group]
            labelled = [0.0 if b.targets is None else float((b.targets != UNLABELLED).sum()) for b in group]
        total, total_labelled = sum(sizes), sum(labelled)
        return [(n / total, (k / total_labelled) if total_labelled else 0.0) for n, k in zip(sizes, labelled)]

    @staticmethod
    def _shares_across_processes(group: list[Batch], shares) -> list[tuple[float, float]]:
        """Token batches in a multi-process fit: each process's micro-batch shares scaled by
        ``world_size * local_tokens / all_tokens``, so that after DDP averages the gradients
        every trained-on token of the optimizer step counts the same, whichever process
        (and micro-batch) it fell in (one all-reduce of a count per optimizer step). Without
        it a process with fewer tokens would weigh each of its tokens more."""
        local = float(sum(b.items() for b in group))
        total = distributed.sum_floats({"tokens": local})["tokens"]
        if total <= 0:
            return list(shares)
        f = distributed.world_size() * local / total
        return [(s * f, l * f) for s, l in shares]

    def _agreement_values(self, train: Any, val: Any, **fit_args: Any) -> dict[str, Any]:
        """What must be equal on every process of a multi-process fit for them to train as
        one (compared by :func:`kdistill.distributed.check_agreement` when ``fit``
        starts, after a resume was restored). Cheap to build: settings, sizes and shapes,
        no data."""
        opt = self.optimizer
        return {
            "trainer": type(self).__qualname__,
            "fit": {
                **fit_args,
                "steps_per_epoch": self._steps_per_epoch,
                "training_samples": getattr(train, "num_samples", None),
                "validation_samples": None if val is None else getattr(val, "num_samples", None),
                "augment": _describe(self.augment),
                "start": {"epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "global_step": self.global_step},
            },
            "compile": {
                "train_temperature": self.train_temperature,
                "loss": _describe(self.loss_fn),
                "metrics": list(self.metrics),
                "optimizer": {
                    "class": type(opt).__qualname__,
                    "defaults": _plain(opt.defaults),
                    "param_groups": [{**_plain({k: v for k, v in g.items() if k != "params"}),
                                      "params": len(g["params"])} for g in opt.param_groups],
                },
                "scheduler": None if self.scheduler is None else type(self.scheduler).__qualname__,
                "scheduler_interval": self.scheduler_interval,
                "precision": self.precision,
                "accumulate_steps": self.accumulate_steps,
                "max_grad_norm": self.max_grad_norm,
            },
            "model": {
                "class": type(self.model).__qualname__,
                "parameters": sum(p.numel() for p in self.model.parameters()),
                "shapes": {name: list(p.shape) for name, p in self.model.named_parameters()},
            },
        }

    # ------------------------------------------------------------------ resuming
    def _resumable_modules(self) -> dict[str, nn.Module]:
        """Modules whose state a resumed run restores (the Distiller adds its loss)."""
        return {"model": self.model}

    def training_state(self) -> dict[str, Any]:
        """Everything :meth:`fit` needs to continue from this point (called by
        :class:`~kdistill.callbacks.TrainingCheckpoint` within ``fit``).

        In a multi-process fit the epoch's running means (``"means"``: weighted sums and
        weights of every log) are already summed over all processes, so the state rank 0
        writes holds the whole run's; a resume restores them on every process, with the
        same or another number of processes, and the interrupted epoch is logged as an
        uninterrupted run logs it. Not a collective: rank 0 may call it alone."""
        from .runtime import rng_state

        epoch, step = (self.epoch + 1, 0) if self._epoch_done else (self.epoch, self.step_in_epoch)
        return {
            "modules": {k: m.state_dict() for k, m in self._resumable_modules().items()},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": None if self.scheduler is None else self.scheduler.state_dict(),
            "precision": self.precision,
            "grad_scaler": None if self.scaler is None else self.scaler.state_dict(),
            "accumulate_steps": self.accumulate_steps,
            "epoch": epoch,
            "step_in_epoch": step,
            "global_step": self.global_step,
            "data": self._passes.state(),
            "means": {"sums": dict(self._means.sums), "weights": dict(self._means.weights)} if step else None,
            "history": self.history.to_dict(),
            "rng": rng_state(),
            "elapsed_seconds": self.elapsed_seconds,
            "callbacks": {key: cb.state_dict() for key, cb in self._stateful_callbacks().items()},
        }

    def _stateful_callbacks(self) -> dict[str, Callback]:
        """The fit's callbacks that keep state across a resume (``state_dict`` and
        ``load_state_dict``: an EMA, a tracker's run), keyed ``ClassName`` (``ClassName#1``
        for a second one of the class)."""
        out: dict[str, Callback] = {}
        for cb in getattr(self, "_callbacks", ()):
            if callable(getattr(cb, "state_dict", None)) and callable(getattr(cb, "load_state_dict", None)):
                name, i = type(cb).__qualname__, 1
                key = name
                while key in out:
                    key, i = f"{name}#{i}", i + 1
                out[key] = cb
        return out

    @property
    def elapsed_seconds(self) -> float:
        """Training time of the current (or last) ``fit``, including the time spent before
        an interruption it was resumed from."""
        started = getattr(self, "_fit_started", None)
        before = getattr(self, "_elapsed_before", 0.0)
        return before if started is None else before + time.perf_counter() - started

    def _restore_training_state(self, state: Any) -> None:
        from .checkpoint import read_training_state
        from .runtime import set_rng_state

        if not isinstance(state, dict):
            state = read_training_state(state, map_location=self.device)
        for key, default, mine in (("accumulate_steps", 1, self.accumulate_steps), ("precision", "fp32", self.precision)):
            saved = state.get(key, default)  # (a state written before the setting existed: its default)
            if saved != mine:
                raise ValueError(
                    f"the training state was saved with {key}={saved!r} but this {type(self).__name__} is compiled "
                    f"with {key}={mine!r}: a resumed run would not continue the saved one. Compile with "
                    f"{key}={saved!r} to resume it")
        modules = self._resumable_modules()
        if set(state["modules"]) != set(modules):
            raise ValueError(
                f"the training state holds {sorted(state['modules'])} but this {type(self).__name__} "
                f"has {sorted(modules)}: resume with the trainer the state was saved from"
            )
        for name, module in modules.items():
            module.load_state_dict(state["modules"][name])
        self.optimizer.load_state_dict(state["optimizer"])
        if (state["scheduler"] is None) != (self.scheduler is None):
            raise ValueError("the training state and this trainer differ in having a scheduler; compile as the saved run did")
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state.get("grad_scaler") is not None:
            self.scaler.load_state_dict(state["grad_scaler"])
        self.epoch, self.step_in_epoch, self.global_step = state["epoch"], state["step_in_epoch"], state["global_step"]
        restored = History.from_dict(state["history"])
        self.history.history, self.history.epoch = restored.history, restored.epoch
        if state["means"] is not None:
            self._means.sums, self._means.weights = dict(state["means"]["sums"]), dict(state["means"]["weights"])
        self._passes.restore(state["data"])
        self._elapsed_before = float(state.get("elapsed_seconds", 0.0))
        saved_callbacks = state.get("callbacks") or {}
        for key, cb in self._stateful_callbacks().items():
            if key in saved_callbacks:  # (a callback added on resume starts afresh)
                cb.load_state_dict(saved_callbacks[key])
        set_rng_state(state["rng"])  # last: restoring the data position draws nothing global
        if distributed.rank() > 0:  # rank 0's streams were saved: the others derive theirs from them
            seed_everything(int(torch.randint(0, 2**62, (1,))) + distributed.rank())

    def _eval_loader(self, data: Any, y: Any = None, *, batch_size: int, shard: tuple[int, int] | None = None):
        if isinstance(data, tuple) and y is None:
            if len(data) != 2:
                raise ValueError(f"validation_data must be (x, y), got a tuple of {len(data)}")
            data, y = data
        return make_loader(data, y, batch_size=batch_size, shuffle=False, shard=shard, pad=False)

    def _run_eval(self, loader: Iterable[Batch], *, reduce: bool = False) -> dict[str, float]:
        """Means over ``loader``; with ``reduce``, over every process's shard (a collective:
        every process must call it)."""
        was_training = self.model.training
        self.model.eval()
        means = _EpochMeans()
        with torch.inference_mode():
            for batch in loader:
                batch = batch.to(self.device)
                logs = _to_floats(self.test_step(batch))
                # every eval log is over the labelled samples (a sequence model's: trained-on tokens) only
                mask = batch.labelled
                means.update(logs, {"*": float(len(batch) if mask is None else mask.sum())})
        self.model.train(was_training)
        return distributed.reduce_weighted_means(means.sums, means.weights) if reduce else means.result()

    def evaluate(self, x: Any, y: Any = None, *, batch_size: int = 256, verbose: int = 0) -> dict[str, float]:
        """Evaluate on data; returns ``{"loss": ..., "accuracy": ...}`` (means over samples)."""
        if self.loss_fn is None:
            self.loss_fn = nn.CrossEntropyLoss()
        result = self._run_eval(self._eval_loader(x, y, batch_size=batch_size))
        if verbose:
            print(" - ".join(f"{k}: {v:.4f}" for k, v in result.items()), flush=True)
        return result

    def predict(self, x: Any, *, batch_size: int = 256) -> torch.Tensor:
        """Logits of the model on ``x`` (eval mode, no gradients), on the CPU.

        For a language model ``(N, T, V)``; with batches padded to different lengths,
        ``T`` is the longest and the positions beyond a batch's length are NaN."""
        loader = make_loader(x, None, batch_size=batch_size, shuffle=False) if not isinstance(x, tuple) else self._eval_loader(x, batch_size=batch_size)
        was_training = self.model.training
        self.model.eval()
        outs = []
        with torch.inference_mode():
            for batch in loader:
                outs.append(self.forward(self.model, batch.to(self.device).inputs).cpu())
        self.model.train(was_training)
        if outs and outs[0].dim() > 2 and len({o.shape[1] for o in outs}) > 1:
            # sequences padded per batch: NaN beyond each batch's length (no logits there)
            longest = max(o.shape[1] for o in outs)
            outs = [nn.functional.pad(o, (0, 0, 0, longest - o.shape[1]), value=float("nan")) for o in outs]
        return torch.cat(outs)


def tapped_layers(loss: DistillationLoss) -> dict[str, list[str]]:
    """``{"student": [paths], "teacher": [paths]}``: the layers a distillation loss (or each
    part of a :class:`~kdistill.losses.WeightedSum`) declares in its ``taps``.

    Raises:
        ValueError: a ``taps`` role other than ``"student"`` or ``"teacher"``.
    """
    out: dict[str, set[str]] = {"student": set(), "teacher": set()}
    for part in (loss.parts.values() if isinstance(loss, WeightedSum) else [loss]):
        for role, path in (part.taps or {}).items():
            if role not in out:
                raise ValueError(f"{part.name}.taps has role {role!r}; expected 'student' and/or 'teacher'")
            out[role].add(path)
    return {k: sorted(v) for k, v in out.items()}


def loss_temperatures(loss: DistillationLoss) -> list[float]:
    """The distinct temperatures at which a distillation loss (or the parts of a
    :class:`~kdistill.losses.WeightedSum`) softens logits; ``[]`` for feature losses."""
    parts = loss.parts.values() if isinstance(loss, WeightedSum) else [loss]
    return sorted({float(p.temperature) for p in parts if getattr(p, "temperature", None) is not None})


class Distiller(Trainer):
    """Trains a student to match a frozen teacher and the labels (Hinton et al., 2015).

    ``loss = alpha * student_loss(student_logits, y)
    + (1 - alpha) * distillation_loss(student, teacher)``.

    The teacher is frozen: ``requires_grad=False``, eval mode, forward under
    ``torch.inference_mode()``, never given to the optimizer; its weights are
    bit-identical after ``fit``. ``test_step`` evaluates the student alone.

    Args:
        student: the network to train.
        teacher: the trained network to learn from (run as a
            :class:`~kdistill.teacher.LiveTeacher`), or any teacher kind: a
            :class:`~kdistill.teacher.LiveTeacher` with speed options, a
            :class:`~kdistill.teacher.TeacherCache` built beforehand (it must hold the
            layers the losses tap), or your own :class:`~kdistill.teacher.Teacher`
            subclass. The Distiller only makes the protocol's calls
            (:mod:`kdistill.teacher.base`), whatever the kind. A list or tuple of
            teachers (modules or teacher kinds) is an ensemble: an
            :class:`~kdistill.teacher.EnsembleTeacher` with its defaults (the mean of the
            members' probabilities at the loss's temperature; members named ``t0``,
            ``t1``, ...); build the ``EnsembleTeacher`` yourself for another rule, weights
            or names.
        device: where to train (default: :func:`kdistill.runtime.get_device`).
    """

    label_weighted_logs = ("student_loss",)
    model_role = "student"

    def __init__(self, student: nn.Module, teacher: nn.Module | Teacher | Sequence[nn.Module | Teacher], *,
                 device: str | torch.device | None = None):
        super().__init__(student, device=device)
        if teacher is student or (isinstance(teacher, (list, tuple)) and any(t is student for t in teacher)):
            raise ValueError("teacher and student are the same module; distil into a separate student network")
        if isinstance(teacher, (list, tuple)):
            teacher = EnsembleTeacher(teacher, device=self.device)
        elif isinstance(teacher, nn.Module):
            teacher = LiveTeacher(teacher, self.device)
        elif missing_calls(teacher):
            raise TypeError(
                f"teacher must be an nn.Module or a teacher (kdistill.teacher.LiveTeacher, TeacherCache, or a "
                f"subclass of kdistill.teacher.Teacher); got {type(teacher).__name__}, which lacks "
                f"{missing_calls(teacher)}. Subclass kdistill.teacher.Teacher: it defines every call but __call__.")
        self.teacher: Teacher = teacher
        self.alpha = 0.1
        self.vocab_size: int | None = None  # compile(vocab_size=): compare the first N logits only
        self.label_loss_weight: float | None = None
        self.distillation_loss: DistillationLoss | None = None
        self._pair_checked = False
        self._losses_ready = False
        self._student_taps: FeatureTaps | None = None
        self._parts: list[tuple[str, DistillationLoss]] = []  # _named_parts() of _parts_of
        self._staged: list[tuple[str, DistillationLoss]] = []  # those of them that may be exclusive
        self._parts_of: DistillationLoss | None = None
        self.on_policy: Any = None  # compile(on_policy=OnPolicy(...)): generated completions

    @property
    def student(self) -> nn.Module:
        return self.model

    @property
    def temperature(self) -> float | None:
        """The distillation temperature: the distillation loss's own (``None`` before
        :meth:`compile`, or for a loss without one, e.g. a feature loss or a
        :class:`~kdistill.losses.WeightedSum`)."""
        loss = getattr(self, "distillation_loss", None)
        t = getattr(loss, "temperature", None)
        return None if t is None else float(t)

    def compile(
        self,
        optimizer: OptimizerSpec = "adam",
        metrics: Sequence[str | Metric] | None = None,
        student_loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        distillation_loss_fn: DistillationLoss | Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | str | None = None,
        alpha: float = 0.1,
        temperature: float | None = None,
        *,
        temperature_squared: bool = True,
        learning_rate: float | None = None,
        scheduler: Any = None,
        scheduler_interval: str = "epoch",
        label_loss_weight: float | None = None,
        precision: str = "fp32",
        accumulate_steps: int = 1,
        max_grad_norm: float | None = None,
        vocab_size: int | None = None,
        on_policy: Any = None,
    ) -> "Distiller":
        """Configure distillation, with the names and meanings of the Keras example.

        Args:
            optimizer: optimizer over the **student's** parameters (or a name/factory).
            metrics: metric names or callables, computed on the student.
            student_loss_fn: hard-label loss ``(student_logits, targets)``; default
                ``nn.CrossEntropyLoss()``.
            distillation_loss_fn: what compares student and teacher. One of:

                * ``None`` or ``"kl"``: the KL divergence between the softened
                  distributions (:func:`~kdistill.losses.kd_loss`);
                * a callable on **softened probability distributions** (as in the Keras
                  example), called as ``fn(student_probs, teacher_probs)`` where
                  ``*_probs = softmax(logits / temperature)``, e.g.
                  :class:`~kdistill.losses.KLDivergence` or ``nn.KLDivLoss`` (which is
                  given log-probabilities first, as it expects);
                * a :class:`~kdistill.losses.DistillationLoss` module (e.g. ``KDLoss``),
                  called on the full outputs; it uses its own hyper-parameters.

                A divergence that comes out negative (beyond rounding) or non-finite
                stops training with an error naming the loss.
            alpha: weight of the student's hard-label loss, in ``[0, 1]``; ``1 - alpha``
                weights the distillation loss.
            temperature: softening temperature ``T > 0`` of the built-in or Keras-style
                loss (default 3, the Keras example's). The distillation loss owns its
                temperature: with a :class:`~kdistill.losses.DistillationLoss` object, leave
                this out (the loss keeps its own) or give the same value; a different one
                is refused rather than silently ignored. Read it back as
                :attr:`temperature`.
            temperature_squared: multiply the distillation term by ``T**2`` (default,
                Hinton et al.: keeps the gradient scale independent of ``T``); ``False``
                reproduces the unscaled form.
            learning_rate: learning rate when ``optimizer`` is a name.
            scheduler, scheduler_interval: as for :meth:`Trainer.compile`.
            precision, accumulate_steps, max_grad_norm: the student's training step, as
                for :meth:`Trainer.compile` (the teacher keeps its own precision). With
                accumulation the hard-label term is weighted by each micro-batch's share
                of the labelled samples and the distillation term by its share of all
                samples.
            label_loss_weight: instead of ``alpha``, weigh the terms independently:
                ``loss = label_loss_weight * student_loss + distillation_loss`` (the
                distillation losses carry their own weights, e.g. in a
                :class:`~kdistill.losses.WeightedSum`). This is the research toolkits'
                convention (RepDistiller's ``-r``, mdistiller's ``CE_WEIGHT``), which
                the published recipes are given in; ``alpha`` is then ignored. (Keras 3's
                ``student_loss_weight``, in ``[0, 1]``, is ``alpha`` here.)
            vocab_size: language models sharing one tokenizer whose output heads differ in
                size (one padded, e.g. Qwen2.5's 151,936 vs 152,064 rows): compare only the
                first ``vocab_size`` logits of each (the tokenizer's vocabulary) in the
                distillation losses. The student's own next-token loss keeps its whole
                head. Left out, heads of different sizes are refused with both sizes named.
            on_policy: a :class:`~kdistill.on_policy.OnPolicy` (language models, live
                teacher): each training batch's completions are, with its probability
                ``lmbda``, replaced by the student's own samples (GKD, Agarwal et al.
                2024), or with ``seq_kd=True`` otherwise by the teacher's (sequence-level
                KD, Kim & Rush 2016), before the batch is trained on (all micro-batches
                of an optimizer step first, so accumulation weighs each by the tokens it
                trains on). The seconds spent generating per optimizer step are logged
                as ``generate_seconds``. ``None``: the dataset's sequences, as they are.

        Returns:
            ``self``.
        """
        a = float(alpha)
        if not 0.0 <= a <= 1.0 or math.isnan(a):
            raise ValueError(
                f"alpha must be in [0, 1], got {alpha}: it weights the hard-label loss and "
                "1 - alpha the distillation loss (the Keras example uses 0.1)"
            )
        if temperature is not None:
            check_temperature(temperature)
        own = getattr(distillation_loss_fn, "temperature", None) if isinstance(distillation_loss_fn, DistillationLoss) else None
        if temperature is not None and own is not None and float(own) != float(temperature):
            raise ValueError(
                f"compile(temperature={temperature:g}) conflicts with the temperature of the loss given, "
                f"{type(distillation_loss_fn).__name__}(temperature={float(own):g}): the loss owns its temperature. "
                f"Leave temperature= out, or build the loss with temperature={temperature:g}")
        super().compile(optimizer, loss=student_loss_fn, metrics=metrics, learning_rate=learning_rate,
                        scheduler=scheduler, scheduler_interval=scheduler_interval, precision=precision,
                        accumulate_steps=accumulate_steps, max_grad_norm=max_grad_norm)
        teacher_params = {id(p) for p in self.teacher.parameters()}
        if any(id(p) in teacher_params for g in self.optimizer.param_groups for p in g["params"]):
            self.optimizer = None  # not compiled: a later fit must not use this optimizer
            raise ValueError(
                "the optimizer holds teacher parameters; the teacher is frozen. Build the "
                "optimizer over the student only: torch.optim.Adam(student.parameters())"
            )
        self.alpha = a
        if vocab_size is not None and (isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 2):
            raise ValueError(f"vocab_size must be an integer >= 2 (the tokenizer's vocabulary size), got {vocab_size!r}")
        self.vocab_size = vocab_size
        if label_loss_weight is not None and not float(label_loss_weight) >= 0:
            raise ValueError(f"label_loss_weight must be >= 0, got {label_loss_weight}")
        self.label_loss_weight = None if label_loss_weight is None else float(label_loss_weight)
        if isinstance(distillation_loss_fn, DistillationLoss):
            self.distillation_loss = distillation_loss_fn
        else:
            self.distillation_loss = SoftTargetLoss(
                "kl" if distillation_loss_fn is None else distillation_loss_fn,
                3.0 if temperature is None else temperature,
                temperature_squared=temperature_squared,
            )
        self.distillation_loss.to(self.device)
        self._losses_ready = False
        self.tapped_layers()  # a malformed taps declaration fails at compile
        # the one place a teacher learns the losses' temperature (a top-k cache serves logits exact at it)
        self.teacher.set_temperatures(loss_temperatures(self.distillation_loss))
        if on_policy is not None and not callable(getattr(on_policy, "transform", None)):
            raise TypeError(f"on_policy must be a kdistill.OnPolicy, got {type(on_policy).__name__}")
        if on_policy is not None and "Cache" in type(self.teacher).__name__:  # TeacherCache, TokenCache
            raise ValueError("on-policy distillation needs the teacher's outputs on sequences generated during training; "
                             f"a {type(self.teacher).__name__} holds them for the dataset's sequences only: distil from "
                             "the live teacher")
        if (on_policy is not None and getattr(on_policy, "seq_kd", False)
                and not isinstance(getattr(self.teacher, "module", None), nn.Module)):
            raise ValueError(f"OnPolicy(seq_kd=True) generates with the teacher's model; a {type(self.teacher).__name__} "
                             "has none to generate with: use a live teacher (an nn.Module or kdistill.LiveTeacher)")
        self.on_policy = on_policy
        return self

    def _same_vocabulary(self, student: Outputs, teacher: Outputs) -> tuple[Outputs, Outputs]:
        """With ``compile(vocab_size=N)``: both outputs' logits cut to their first ``N``
        entries (the tokenizer's vocabulary; the rest is a head's padding)."""
        n = self.vocab_size
        for role, out in (("student", student), ("teacher", teacher)):
            if out.shape[-1] < n:
                raise ValueError(
                    f"compile(vocab_size={n}) but the {role} scores only {out.shape[-1]} tokens: "
                    "vocab_size must be at most the smaller head (the tokenizer's vocabulary size)")
        # (a sparse teacher is cut through its dense logits: its ids may lie in the padding)
        cut = lambda o: o if o.shape[-1] == n else Outputs(o.logits[..., :n], o.features)  # noqa: E731
        return cut(student), cut(teacher)

    def _check_pair(self, student: Outputs, teacher: Outputs) -> None:
        """Once per fit: teacher and student must score the same classes."""
        # (shapes only: a sparse teacher's dense logits are never built for this)
        s, t = student.shape[-1], teacher.shape[-1]
        if s != t and len(student.shape) > 2:
            check_vocabularies(student, teacher)  # raises, naming both vocabularies
        if s != t:
            raise ValueError(
                f"teacher and student class counts differ: {self.teacher!r} "
                f"predicts {t} classes and the student ({type(self.student).__name__}) {s}. "
                f"Build the student with num_classes={t}."
            )
        check_same_classes(student, teacher)
        self._pair_checked = True

    def train_step(self, batch: Batch) -> dict[str, torch.Tensor]:
        """One distillation step; returns ``loss``, ``student_loss``,
        ``distillation_loss`` and the metrics."""
        if self.optimizer is None:
            self._require_compiled()
        if not self._losses_ready:
            self.setup(batch)  # your own loop: set up on the first batch
        distill = self.distillation_loss
        distill.set_progress(self.epoch, self.global_step)
        # 1. the frozen teacher's outputs (no graph, no grad), with its tapped layers
        teacher_out = self.teacher(batch)
        # 2. the student's forward, with its tapped layers
        student_out = Outputs(self.forward(self.model if self._ddp is None else self._ddp, batch.inputs),
                              {} if self._student_taps is None else self._student_taps.pop())
        full_student = student_out.logits  # the student's own loss keeps its whole head
        if self.vocab_size is not None:
            student_out, teacher_out = self._same_vocabulary(student_out, teacher_out)
        # a sparse teacher (a token cache): the student's log-probabilities computed once, here
        # (with their graph, even when the label loss below runs without), for the label loss
        # and a token loss at the same temperature
        log_probs = None
        if (teacher_out.topk is not None and student_out.logits is full_student and batch.targets is not None
                and full_student.dim() > 2):
            log_probs = student_out.log_probs(self.train_temperature)
        if not self._pair_checked:
            self._check_pair(student_out, teacher_out)
        # 3. the two loss terms; unlabelled samples add only the distillation term
        if batch.targets is None:  # unlabelled data only: distillation alone
            student_loss = full_student.new_zeros(())
        elif (self.alpha if self.label_loss_weight is None else self.label_loss_weight) == 0.0:
            with torch.no_grad():  # weighted 0: logged, never back-propagated (GKD-style distillation alone)
                student_loss, _ = self.supervised_loss(full_student, batch, log_probs=log_probs)
        else:
            student_loss, _ = self.supervised_loss(full_student, batch, log_probs=log_probs)
        # every loss reports its terms (one, or several: DKD's tckd/nckd, a WeightedSum's parts); they sum to it
        parts = distill.named_terms(student_out, teacher_out, batch)
        if len(parts) == 1:
            (distillation_loss,) = parts.values()
        else:
            distillation_loss = sum(parts.values())
        terms = {"student_loss": student_loss, "distillation_loss": distillation_loss}
        if len(parts) > 1:
            terms.update({f"distillation/{k}": v for k, v in parts.items()})
        if self._parts_of is not distill:
            self._named_parts()
        staged = self._staged  # the parts that may train alone (FitNets' hint stage): asked each step
        solo = [name for name, part in staged if part.exclusive] if staged else staged
        if solo:  # a staged method's first stage (FitNets' hints): its terms alone train
            if isinstance(distill, WeightedSum):
                loss = sum(v for k, v in parts.items() if k.split("/", 1)[0] in solo)
            else:
                loss = distillation_loss
            if self._ddp is not None:  # DDP waits for a gradient of every parameter: give the idle ones zeros
                loss = loss + 0.0 * student_out.logits.sum()
        elif self.label_loss_weight is None:
            loss = self.alpha * student_loss + (1.0 - self.alpha) * distillation_loss
        else:
            loss = self.label_loss_weight * student_loss + distillation_loss
        logs = {"loss": loss.detach(), "student_loss": student_loss.detach(),
                "distillation_loss": distillation_loss.detach()}
        if len(terms) > 2:
            logs.update({k: v.detach() for k, v in terms.items()})
        if self.metrics or type(self).compute_metrics is not Trainer.compute_metrics:
            logs.update(self.compute_metrics(full_student.detach(), batch))  # as evaluate sees the student
        if self.on_policy is not None:  # the time generating this optimizer step's batches took (0: the dataset's)
            logs["generate_seconds"] = getattr(self, "_generate_seconds", 0.0) if self._micro is not None else 0.0
        # one read of every log (one device sync): a NaN/inf term stops training before the optimizer step
        values = self._read_step_logs(logs, terms)
        if distill.nonnegative and values["distillation_loss"] < 0:  # (beyond rounding: check_divergence says)
            check_divergence(distill.name, values["distillation_loss"])
        # 4. update the student; accumulating, each term counts for this micro-batch's share of
        #    the samples it is a mean over (the hard-label term: the labelled ones)
        micro = self._micro or (_WHOLE if self.accumulate_steps == 1 else self.micro_step())
        if solo or micro.labelled == micro.samples:
            norm = self.optimize(loss)
        else:
            hard, soft = ((self.alpha, 1.0 - self.alpha) if self.label_loss_weight is None
                          else (self.label_loss_weight, 1.0))
            norm = self.optimize(hard * micro.labelled * student_loss + soft * micro.samples * distillation_loss,
                                 weight=1.0)
        if norm is not None:
            logs["grad_norm"] = norm
        return logs

    def test_step(self, batch: Batch) -> dict[str, torch.Tensor]:
        """Evaluate the student alone: ``student_loss`` (also as ``loss``) and metrics."""
        logs = super().test_step(batch)
        self._pop_student_features()  # not needed for evaluation
        if "loss" in logs:
            logs["student_loss"] = logs["loss"]
        return logs

    def _resumable_modules(self) -> dict[str, nn.Module]:
        return {"model": self.model, "distillation_loss": self.distillation_loss}

    def _agreement_values(self, train: Any, val: Any, **fit_args: Any) -> dict[str, Any]:
        values = super()._agreement_values(train, val, **fit_args)
        values["distil"] = {
            "alpha": self.alpha,
            "vocab_size": self.vocab_size,
            "label_loss_weight": self.label_loss_weight,
            "distillation_loss": _module_settings(self.distillation_loss),
            "teacher": type(self.teacher).__qualname__,
            "on_policy": None if self.on_policy is None else self.on_policy.settings(),
        }
        return values

    # ------------------------------------------------------------------ taps and set-up
    def loss_parts(self) -> list[DistillationLoss]:
        """The distillation losses (the parts of a :class:`WeightedSum`, or the one loss)."""
        loss = self.distillation_loss
        return list(loss.parts.values()) if isinstance(loss, WeightedSum) else [loss]

    def _named_parts(self) -> list[tuple[str, DistillationLoss]]:
        loss = self.distillation_loss
        if self._parts_of is not loss:  # once per loss, not per step
            self._parts = list(loss.parts.items()) if isinstance(loss, WeightedSum) else [(loss.name, loss)]
            # the parts that may train alone at some point (their class defines `exclusive`)
            self._staged = [(name, part) for name, part in self._parts
                            if type(part).exclusive is not DistillationLoss.exclusive]
            self._parts_of = loss
        return self._parts

    def tapped_layers(self) -> dict[str, list[str]]:
        """``{"student": [paths], "teacher": [paths]}`` the losses read."""
        return tapped_layers(self.distillation_loss)

    def _install_taps(self) -> None:
        layers = self.tapped_layers()
        if self._student_taps is None and layers["student"]:
            self._student_taps = FeatureTaps(self.model, layers["student"], role="student").install()
        self.teacher.set_taps(layers["teacher"])

    def _before_training(self, train: Any, generator: torch.Generator) -> None:
        # 1. hooks on the layers the losses read
        self._install_taps()
        # 2. once: a dry run on one batch builds the losses' shape-dependent parts (adapters)
        if not self._losses_ready:
            from .runtime import rng_state, set_rng_state

            saved_gen, saved_rng = generator.get_state(), rng_state()  # the peek must not shift the data order
            batch = next(iter(train))
            generator.set_state(saved_gen)
            set_rng_state(saved_rng)
            self.setup(batch)

    def _augment_batch(self, batch: Batch) -> Batch:
        # fit's augmentation (if the teacher allows one), then what the teacher needs (a cached view replayed)
        return self.teacher.prepare(batch if self.augment is None else super()._augment_batch(batch), self.epoch)

    def _step_batches(self, group: list[Batch]) -> list[Batch]:
        # compile(on_policy=): each micro-batch's completions generated by the student or the teacher (or
        # kept), all before any is trained on, so accumulation weighs each by the tokens it trains on
        self._generate_seconds = 0.0
        if self.on_policy is None:
            return group
        teacher = getattr(self.teacher, "module", None)
        out = []
        for batch in group:
            out.append(self.on_policy.transform(batch.to(self.device), self.model, teacher))
            self._generate_seconds += self.on_policy.last_seconds
        return out

    def _stateful_callbacks(self) -> dict[str, Callback]:
        # the on-policy generator's state is saved and restored with the training state
        out = super()._stateful_callbacks()
        if self.on_policy is not None:
            out["OnPolicy"] = self.on_policy
        return out

    def _after_restore(self, train: Any, generator: torch.Generator) -> None:
        """Run the pre-training stage of every loss that has one and has not run it
        (factor transfer's paraphraser), over the training data as the teacher sees it.
        Neither the data order nor the global RNG of the distillation that follows moves."""
        pending = [p for p in self.loss_parts() if p.needs_pretraining]
        if not pending:
            return
        from .runtime import rng_state, set_rng_state

        saved_gen, saved_rng = generator.get_state(), rng_state()
        for part in pending:
            optimizer = part.pretrain_optimizer()
            part.train()
            for epoch in range(part.pretrain_epochs):
                for batch in train:
                    batch = self.teacher.prepare(batch.to(self.device), epoch)
                    loss = part.pretrain_loss(self.teacher(batch), batch)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
            part.finish_pretraining()
        self._pop_student_features()
        generator.set_state(saved_gen)
        set_rng_state(saved_rng)

    def _after_training(self) -> None:
        if self._student_taps is not None:
            self._student_taps.remove()
            self._student_taps = None
        self.teacher.set_taps([])

    def setup(self, batch: Batch | torch.Tensor) -> None:
        """Set the losses up on one batch: run teacher and student (eval mode, no
        gradients), call every loss's ``setup`` (which builds adapters and other parts
        whose shapes depend on the models), and add the parameters created to the
        optimizer (a new param group with the optimizer's defaults; a scheduler built from
        a factory is rebuilt, an instance learns the group's learning rate).

        ``fit`` does this on its first batch; call it yourself only to use
        :meth:`train_step` in your own loop (``train_step`` otherwise does it on the first
        batch it gets).
        """
        self._require_compiled()
        batch = batch if isinstance(batch, Batch) else Batch(batch)
        batch = self.teacher.prepare(batch.to(self.device), self.epoch)
        self._install_taps()
        was_training = self.model.training
        self.model.eval()
        with torch.no_grad():
            teacher_out = self.teacher(batch)
            student_out = Outputs(self.forward(self.model, batch.inputs), self._pop_student_features())
        self.model.train(was_training)
        if self.vocab_size is not None:
            student_out, teacher_out = self._same_vocabulary(student_out, teacher_out)
        self._check_pair(student_out, teacher_out)
        self.distillation_loss.setup(student_out, teacher_out)
        self.distillation_loss.to(self.device)
        in_optimizer = {id(p) for g in self.optimizer.param_groups for p in g["params"]}
        new = [p for p in self.distillation_loss.parameters() if p.requires_grad and id(p) not in in_optimizer]
        if new:
            self.optimizer.add_param_group({"params": new})
            self._refresh_scheduler()
        self._losses_ready = True

    def _refresh_scheduler(self) -> None:
        """A scheduler made before the adapters existed learns about their param group."""
        if self.scheduler is None:
            return
        if self._scheduler_factory is not None:
            self.scheduler = self._scheduler_factory(self.optimizer)
            return
        group = self.optimizer.param_groups[-1]
        group.setdefault("initial_lr", group["lr"])
        if hasattr(self.scheduler, "base_lrs"):
            self.scheduler.base_lrs.append(group["initial_lr"])

    def _pop_student_features(self) -> dict[str, torch.Tensor]:
        return {} if self._student_taps is None else self._student_taps.pop()

    def _train_loader(self, x: Any, y: Any, batch_size: int, shuffle: bool, generator: torch.Generator, unlabelled: Any = None, **kw: Any):
        if kw:
            raise TypeError(f"fit() got unexpected keyword arguments {sorted(kw)}")
        return make_loader(x, y, batch_size=batch_size, shuffle=shuffle, generator=generator, unlabelled=unlabelled,
                           shard=self._shard)

    def fit(self, x: Any, y: Any = None, *, unlabelled: Any = None, **kwargs: Any) -> History:
        """Distil into the student; arguments as :meth:`Trainer.fit`, plus:

        Args:
            unlabelled: extra inputs without labels (array or tensor). They are shuffled in
                with the labelled data and contribute the distillation loss only, as do
                samples whose target is ``-1``.
        """
        self._pair_checked = False
        kwargs["augment"] = self.teacher.resolve_augment(kwargs.get("augment"))  # e.g. a cache replays its own views
        return super().fit(x, y, unlabelled=unlabelled, **kwargs)
