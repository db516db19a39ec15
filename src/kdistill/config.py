"""Experiment configs: YAML -> validated objects (pydantic), ``_component_`` dotted paths.

One YAML file describes an experiment (data, teacher, student, the stages that train them,
their optimizers, schedules and losses); :func:`load_config` reads it, applies dotted
``--set`` overrides and validates everything **before** anything runs: an unknown key, a
wrong type, a value out of range, a ``_component_`` that does not import, or keyword
arguments its callable does not take all raise :class:`~kdistill.errors.ConfigError`
naming the file, the key path and what was expected.

A *component* (a model, a loss, an optimizer, a schedule, an augmentation, a callback) is
either a built-in name or a user's own callable by dotted path::

    student: {name: classic_student}                  # kdistill.models.MODELS
    losses:
      - {name: kd, weight: 1.0}                       # kdistill.losses: KDLoss
      - {_component_: my_losses.CosineLogits, weight: 0.5, scale: 2.0}

Every other key of a component is a keyword argument of its callable. Built-in loss names
resolve through ``kdistill.losses.__all__``: a class name (``KDLoss``) or its short form
(``kd``: lower case, without the ``Loss`` suffix). No registry, no import side effects.

Paths in a config (``data.data_dir``, ``teacher.checkpoint``, ``output_dir``) are relative
to the working directory the command runs in.
"""

from __future__ import annotations

import copy
import difflib
import functools
import importlib
import inspect
import math
import os
import re
from pathlib import Path
from typing import Any, Callable, Literal, Mapping, Sequence

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import ConfigError

__all__ = [
    "ComponentSpec",
    "DataConfig",
    "ExperimentConfig",
    "OptimizerSpec",
    "ScheduleSpec",
    "apply_overrides",
    "dump_config",
    "load_config",
    "resolve_callable",
    "validate_config",
    "yaml_load",
]

#: Built-in learning-rate schedules: name -> {keyword: default}. ``None`` is worked out from
#: the stage (multistep's ``milestones``: ``[epochs // 2]``). Validated here, built by
#: :func:`kdistill.experiment.build_schedule`.
SCHEDULES: dict[str, dict[str, Any]] = {
    "constant": {},
    "cosine": {"warmup_epochs": 0, "eta_min": 0.0},
    "step": {"step_size": 30, "gamma": 0.1},
    "multistep": {"milestones": None, "gamma": 0.1},
}
AUGMENTATIONS = {"random_crop": "kdistill.data.augment.RandomCrop",
                 "horizontal_flip": "kdistill.data.augment.RandomHorizontalFlip",
                 "gaussian_noise": "kdistill.data.augment.GaussianNoise",
                 "mixup": "kdistill.data.augment.Mixup",
                 "cutmix": "kdistill.data.augment.CutMix"}
CALLBACKS = {"early_stopping": "kdistill.callbacks.EarlyStopping",
             "tensorboard": "kdistill.trackers.TensorBoardLogger",
             "mlflow": "kdistill.trackers.MLflowLogger"}
#: The shipped config that error messages point to.
EXAMPLE_CONFIG = "configs/fashion_mnist/kd/classic_cnn.yaml"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# --------------------------------------------------------------------------- components
def resolve_callable(path: str) -> Callable[..., Any]:
    """Import ``package.module.Name`` and return ``Name``.

    Raises:
        ValueError: the module or the name does not exist (with what was tried).
    """
    if not isinstance(path, str) or "." not in path:
        raise ValueError(f"a _component_ must be a dotted path like 'my_package.module.Class', got {path!r}")
    module_name, _, attr = path.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(
            f"cannot import module '{module_name}' of _component_ '{path}' ({e}); check the spelling "
            "and that the package is installed or on PYTHONPATH"
        ) from e
    try:
        obj = getattr(module, attr)
    except AttributeError:
        names = [n for n in dir(module) if not n.startswith("_")]
        close = difflib.get_close_matches(attr, names, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"module '{module_name}' has no attribute '{attr}'{hint}") from None
    if not callable(obj):
        raise ValueError(f"_component_ '{path}' is a {type(obj).__name__}, not a class or function")
    return obj


def check_kwargs(fn: Callable[..., Any], kwargs: Mapping[str, Any], *, provided: Sequence[str] = ()) -> None:
    """Raise ``ValueError`` when ``fn`` does not take one of ``kwargs``.

    Args:
        provided: arguments the runner passes itself (e.g. ``num_classes`` of a model);
            the config may not set them.
    """
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):  # builtins without a signature: cannot check
        return
    params = sig.parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    accepted = [n for n, p in params.items() if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)]
    for key in kwargs:
        if key in provided:
            raise ValueError(f"'{key}' is set by kdistill itself and cannot be given here")
        if not takes_any and key not in params:
            close = difflib.get_close_matches(key, accepted, n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ValueError(
                f"{getattr(fn, '__qualname__', fn)} takes no argument '{key}'{hint}; it takes: "
                f"{', '.join(a for a in accepted if a not in ('self', *provided)) or 'nothing'}"
            )


class ComponentSpec(BaseModel):
    """A built-in ``name`` or a ``_component_`` dotted path, plus keyword arguments.

    The extra keys of the mapping are the keyword arguments.
    """

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    name: str | None = None
    component: str | None = Field(default=None, alias="_component_")

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, value: Any) -> Any:
        return {"name": value} if isinstance(value, str) else value

    @model_validator(mode="after")
    def _one_of(self) -> "ComponentSpec":
        if (self.name is None) == (self.component is None):
            raise ValueError("give exactly one of 'name' (a built-in) or '_component_' (a dotted path)")
        if self.component is not None:
            resolve_callable(self.component)  # fails at load, not after the teacher trained
        return self

    @property
    def kwargs(self) -> dict[str, Any]:
        reserved = self.reserved_keys()
        return {k: v for k, v in (self.model_extra or {}).items() if k not in reserved}

    def reserved_keys(self) -> tuple[str, ...]:
        return ()

    def label(self) -> str:
        return self.name if self.name is not None else self.component.rpartition(".")[2]

    def dump(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name} if self.name is not None else {"_component_": self.component}
        for field in type(self).model_fields:
            if field not in ("name", "component"):
                out[field] = getattr(self, field)
        out.update(self.model_extra or {})
        return out


def _builtin(kind: str, name: str, table: Mapping[str, str]) -> Callable[..., Any]:
    if name not in table:
        close = difflib.get_close_matches(name, table, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ValueError(f"unknown {kind} '{name}'{hint}: expected one of {sorted(table)}, or a _component_ dotted path")
    return resolve_callable(table[name])


def _snake(name: str) -> str:
    """``LogitStandardKD`` -> ``logit_standard_kd``, ``JSDivergence`` -> ``js_divergence``."""
    import re

    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", name).lower()


def builtin_losses() -> dict[str, str]:
    """``{name: dotted path}`` of the losses ``kdistill.losses`` exports: the class name
    (``DKDLoss``), its short form in snake case (``dkd``, ``logit_standard_kd``) and the
    aliases a class declares (``HintLoss.aliases = ("fitnets",)``)."""
    from . import losses
    from .losses.base import DistillationLoss, WeightedSum

    table: dict[str, str] = {}
    for attr in losses.__all__:
        obj = getattr(losses, attr)
        if not (inspect.isclass(obj) and issubclass(obj, DistillationLoss)) or obj in (DistillationLoss, WeightedSum):
            continue
        path = f"kdistill.losses.{attr}"
        table[attr] = path
        short = attr[:-4] if attr.endswith("Loss") and len(attr) > 4 else attr
        table.setdefault(_snake(short), path)
        for alias in getattr(obj, "aliases", ()):
            table.setdefault(alias, path)
    return table


class ModelSpec(ComponentSpec):
    """A model: a builder of :data:`kdistill.models.MODELS` (``name``; for a language-model
    run, ``causal_lm`` of :data:`kdistill.models.LANGUAGE_MODELS`) or a ``_component_``
    callable returning an ``nn.Module``; extra keys are its keyword arguments. The runner
    passes ``num_classes``, ``in_channels`` and ``input_size`` to built-in builders (and to a
    ``_component_`` that accepts them). ``checkpoint`` (teacher only): trained weights to
    load instead of training."""

    checkpoint: str | None = None

    @model_validator(mode="after")
    def _check(self) -> "ModelSpec":
        fn = self.resolve()
        # the runner passes these to a built-in, and to a _component_ that takes them
        check_kwargs(fn, self.kwargs, provided=("num_classes", "in_channels", "input_size"))
        return self

    def reserved_keys(self) -> tuple[str, ...]:
        return ("checkpoint",)

    def resolve(self) -> Callable[..., Any]:
        if self.name is not None:
            from .models import LANGUAGE_MODELS, MODELS

            return _builtin("model", self.name, {k: f"kdistill.models.{v.__module__.rpartition('.')[2]}.{v.__name__}"
                                                 for k, v in {**MODELS, **LANGUAGE_MODELS}.items()})
        return resolve_callable(self.component)


class LossSpec(ComponentSpec):
    """A distillation loss with its weight in the sum of distillation terms."""

    weight: float = Field(default=1.0, ge=0.0)

    @model_validator(mode="after")
    def _check(self) -> "LossSpec":
        from .losses.base import DistillationLoss

        cls = self.resolve()
        if not (inspect.isclass(cls) and issubclass(cls, DistillationLoss)):
            raise ValueError(
                f"loss {self.component or self.name} is not a kdistill.losses.DistillationLoss subclass: a loss is a "
                "class with forward(student: Outputs, teacher: Outputs, batch: Batch) -> Tensor")
        check_kwargs(cls, self.kwargs)
        return self

    def reserved_keys(self) -> tuple[str, ...]:
        return ("weight",)

    def resolve(self) -> Callable[..., Any]:
        return _builtin("loss", self.name, builtin_losses()) if self.name is not None else resolve_callable(self.component)


class OptimizerSpec(ComponentSpec):
    """``{name: adam|adamw|sgd|rmsprop, lr: ..., <kwargs>}`` or a ``_component_`` optimizer class.

    Names resolve through :data:`kdistill.distiller.OPTIMIZERS`, as ``compile(optimizer=
    "adam")`` does; without ``lr`` a named optimizer gets that table's default."""

    @model_validator(mode="after")
    def _check(self) -> "OptimizerSpec":
        check_kwargs(self.resolve(), self.kwargs, provided=("params",))
        lr = self.kwargs.get("lr")
        if lr is not None and (not isinstance(lr, (int, float)) or lr <= 0):
            raise ValueError(f"lr must be a number > 0, got {lr!r}")
        return self

    def resolve(self) -> Callable[..., Any]:
        if self.component is not None:
            return resolve_callable(self.component)
        from .distiller import OPTIMIZERS

        return _builtin("optimizer", self.name, {k: f"{cls.__module__}.{cls.__qualname__}" for k, (cls, _) in OPTIMIZERS.items()})

    def default_lr(self) -> float | None:
        """The learning rate of a named optimizer whose ``lr`` is not given (else ``None``)."""
        if self.name is None or "lr" in self.kwargs:
            return None
        from .distiller import OPTIMIZERS

        return OPTIMIZERS[self.name][1]


class ScheduleSpec(ComponentSpec):
    """A learning-rate schedule.

    Built-in names: ``constant``; ``cosine`` (cosine decay to ``eta_min`` over the whole
    stage, stepped every optimizer step, after ``warmup_epochs`` of linear warm-up);
    ``step`` (``step_size`` epochs, ``gamma``); ``multistep`` (``milestones`` epochs,
    ``gamma``). Or a ``_component_`` ``torch.optim.lr_scheduler`` class with its kwargs and
    ``interval: epoch|step``.
    """

    interval: Literal["epoch", "step"] = "epoch"

    @model_validator(mode="after")
    def _check(self) -> "ScheduleSpec":
        if self.name is not None:
            allowed = {name: set(kwargs) for name, kwargs in SCHEDULES.items()}
            if self.name not in allowed:
                close = difflib.get_close_matches(self.name, allowed, n=2)
                hint = f" (did you mean {', '.join(close)}?)" if close else ""
                raise ValueError(f"unknown schedule '{self.name}'{hint}: expected one of {sorted(allowed)} or a _component_")
            extra = set(self.kwargs) - allowed[self.name]
            if extra:
                raise ValueError(f"schedule '{self.name}' takes no {sorted(extra)}; it takes {sorted(allowed[self.name]) or 'nothing'}")
        else:
            check_kwargs(self.resolve(), self.kwargs, provided=("optimizer",))
        return self

    def reserved_keys(self) -> tuple[str, ...]:
        return ("interval",)

    def resolve(self) -> Callable[..., Any]:
        return resolve_callable(self.component)


class AugmentSpec(ComponentSpec):
    """A batched augmentation: ``random_crop`` (``padding``), ``horizontal_flip`` (``p``),
    ``gaussian_noise`` (``std``), ``mixup`` / ``cutmix`` (``alpha``), or a ``_component_``
    callable class whose instances map a ``(B, ...)`` tensor to a tensor (or, with
    ``on_batch = True``, a Batch to a Batch)."""

    @model_validator(mode="after")
    def _check(self) -> "AugmentSpec":
        check_kwargs(self.resolve(), self.kwargs)
        return self

    def resolve(self) -> Callable[..., Any]:
        return _builtin("augmentation", self.name, AUGMENTATIONS) if self.name is not None else resolve_callable(self.component)


class ReaderSpec(ComponentSpec):
    """A data reader: a ``_component_`` function returning :class:`kdistill.data.DatasetSplits`
    (its other keys, e.g. ``path``, are its keyword arguments)."""

    @model_validator(mode="after")
    def _check(self) -> "ReaderSpec":
        if self.name is not None:
            raise ValueError("data.reader takes a _component_ dotted path (a function returning DatasetSplits); "
                             "for a built-in dataset use data.dataset")
        check_kwargs(self.resolve(), self.kwargs)
        return self

    def resolve(self) -> Callable[..., Any]:
        return resolve_callable(self.component)


class CallbackSpec(ComponentSpec):
    """A :class:`~kdistill.callbacks.Callback`: ``early_stopping`` or a ``_component_``."""

    @model_validator(mode="after")
    def _check(self) -> "CallbackSpec":
        check_kwargs(self.resolve(), self.kwargs)
        return self

    def resolve(self) -> Callable[..., Any]:
        return _builtin("callback", self.name, CALLBACKS) if self.name is not None else resolve_callable(self.component)


# --------------------------------------------------------------------------- sections
class TextDataConfig(_Strict):
    """A language-model run's text (:mod:`kdistill.data.text`): the corpus, the tokenizer
    and the blocks trained on. Setting ``data.text`` makes the run a language-model run
    (teacher, scratch and distilled causal LMs; held-out perplexity in the report)."""

    corpus: Literal["python_source"] | None = Field(
        default="python_source", description="python_source: this Python's standard-library sources (PSF License); "
        "null with files or jsonl")
    files: list[str] | None = Field(default=None, description="plain-text files (UTF-8), packed into blocks")
    jsonl: str | None = Field(default=None, description="a JSONL file of prompt/completion or messages records")
    max_bytes: int | None = Field(default=None, ge=1, description="read at most this many bytes of the corpus")
    held_out: float = Field(default=0.05, gt=0, lt=1, description="share held out for evaluation (by file, or by record)")
    tokenizer: str | None = Field(default=None, description="a saved tokenizer's directory; null trains a byte-level "
                                  "BPE on the training text (saved as RUN_DIR/tokenizer)")
    vocab_size: int = Field(default=2048, ge=260, description="vocabulary of the trained tokenizer")
    block_size: int = Field(default=128, ge=8, description="tokens per training sequence (packed text); the "
                            "longest sequence kept for jsonl")

    @model_validator(mode="after")
    def _one_source(self) -> "TextDataConfig":
        if self.files is not None or self.jsonl is not None:
            self.__dict__["corpus"] = None  # files/jsonl replace the built-in corpus
        given = [k for k in ("corpus", "files", "jsonl") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"data.text takes one of corpus, files or jsonl; got {given or 'none'}")
        return self


class DataConfig(_Strict):
    """Where the data comes from and how it is batched."""

    dataset: str | None = Field(default="fashion_mnist", description="fashion_mnist, mnist, kmnist, digits, cifar10 or cifar100")
    reader: ReaderSpec | None = Field(
        default=None, description="_component_ returning a kdistill.data.DatasetSplits (instead of dataset)")
    text: TextDataConfig | None = Field(default=None, description="text for language models (instead of dataset)")
    data_dir: str | None = None
    subset: int | None = Field(default=None, ge=1, description="labelled training samples (text: sequences) the students see")
    unlabelled: bool = Field(default=False, description="the rest of the training set joins distillation unlabelled")
    augment: list[AugmentSpec] = Field(default_factory=list)
    normalize: bool = Field(default=False, description="standardise each channel with the training set's mean and std")
    batch_size: int = Field(default=64, ge=1)
    eval_batch_size: int = Field(default=256, ge=1)

    @model_validator(mode="after")
    def _check(self) -> "DataConfig":
        if self.reader is not None or self.text is not None:
            self.__dict__["dataset"] = None  # the reader (or the text) replaces the built-in dataset
        if self.dataset is None and self.reader is None and self.text is None:
            raise ValueError("give data.dataset (a built-in name), data.reader (a _component_) or data.text")
        if self.text is not None and (self.unlabelled or self.augment or self.normalize or self.reader is not None):
            raise ValueError("data.text takes none of unlabelled, augment, normalize or reader (they are for images)")
        if self.unlabelled and self.subset is None:
            raise ValueError("data.unlabelled needs data.subset: the samples beyond the first `subset` labelled ones are the unlabelled data")
        return self

    @field_validator("dataset")
    @classmethod
    def _known(cls, value: str | None) -> str | None:
        from .data.datasets import _canonical_name

        return None if value is None else _canonical_name(value)


class StageConfig(_Strict):
    """What every training stage (teacher, scratch, assistant, distil) sets: its epochs,
    optimizer, schedule, batch and training step (see
    :meth:`kdistill.Trainer.compile` for ``precision``, ``accumulate_steps`` and
    ``max_grad_norm``; :class:`kdistill.callbacks.EMA` for ``ema_decay``)."""

    epochs: int = Field(default=1, ge=1)
    optimizer: OptimizerSpec = Field(default_factory=lambda: OptimizerSpec(name="adam", lr=1e-3))
    schedule: ScheduleSpec = Field(default_factory=lambda: ScheduleSpec(name="constant"))
    batch_size: int | None = Field(default=None, ge=1, description="overrides data.batch_size for this stage")
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        default="fp32", description="the trained model's forward: fp32, bf16 (CPU and CUDA) or fp16 (CUDA only)")
    accumulate_steps: int = Field(
        default=1, ge=1, description="batches per optimizer step (gradient accumulation); the batch size is per batch")
    max_grad_norm: float | None = Field(
        default=None, gt=0, description="clip the gradients to this total norm before each optimizer step")
    ema_decay: float | None = Field(
        default=None, ge=0, lt=1,
        description="keep an exponential moving average of the weights with this decay per optimizer step "
                    "(kdistill.callbacks.EMA, e.g. 0.999); the stage ends with, evaluates and exports the average")

    @field_validator("max_grad_norm")
    @classmethod
    def _finite(cls, value: float | None) -> float | None:
        if value is not None and not math.isfinite(value):
            raise ValueError(f"max_grad_norm must be a finite number > 0 or null (no clipping), got {value}")
        return value


class TeacherStage(StageConfig):
    """Training of the teacher. ``epochs`` defaults to 1, or to 0 when ``teacher.checkpoint``
    is given: a teacher you already have is then used as it is (measured in the report,
    not trained). ``epochs >= 1`` with a checkpoint fine-tunes it from those weights."""

    epochs: int | None = Field(default=None, ge=0, description="0: use teacher.checkpoint as is (default with a checkpoint, else 1)")
    temperature: float = Field(default=1.0, gt=0, description="softmax temperature the teacher trains with")


class ScratchStage(StageConfig):
    epochs: int = Field(default=2, ge=1)
    enabled: bool = True
    match_steps: bool = Field(
        default=True, description="with unlabelled data, give the scratch student as many steps as the distilled one")


class TeacherCacheConfig(_Strict):
    """Distil from an offline cache of the teacher's outputs (one teacher pass, then every
    distillation epoch costs about what plain student training costs).

    The cache is built over the distil stage's training data (labelled, then unlabelled)
    with the layers the losses tap, or opened if it exists and matches; top-k caches store
    the tail at the stage's temperature, so the softened top-k distribution is exact.
    With ``data.augment`` the cache must hold ``views`` augmented views per sample (epoch
    ``e`` trains on view ``e mod views``).

    In a language-model run (``data.text``) it is a top-k token cache
    (:class:`kdistill.teacher.TokenCache`) of the teacher over the distil stage's training
    sequences: ``mode`` is ``topk`` (the default there), ``k`` defaults to 64, ``tail``
    chooses how the mass outside the top k is served, ``value_bits`` stores the
    log-probabilities as short codes, or ``curve`` those past the top ``exact_k`` as the
    coefficients of a rank curve (e.g. ``curve: 6, exact_k: 8`` where storage matters),
    ``batch_size`` counts sequences (default 16) and ``views`` does not apply.
    """

    mode: Literal["full", "topk"] = Field(
        default="full", description="full logits, or the top k and a tail bucket (language models: topk only, "
        "the default there)")
    k: int | None = Field(default=None, ge=1, description="classes (language models: tokens) kept per sample "
                          "(mode: topk; language models default to 64)")
    dtype: Literal["float16", "bfloat16", "float32"] = Field(
        default="float16", description="storage type of the stored values (bfloat16: language-model caches only)")
    views: int = Field(default=0, ge=0, description="augmented views per sample; needed with data.augment")
    value_bits: int | None = Field(
        default=None, ge=1, le=16, description="language models: store each log-probability as a code of this "
        "many bits on its position's own linear grid (e.g. 4), dtype then holding each grid's ends and the tail; "
        "null: in dtype")
    curve: int | None = Field(
        default=None, ge=1, le=7, description="language models: store the log-probabilities past the top exact_k "
        "as this many coefficients (in dtype) of a curve in their rank (e.g. 6); not with value_bits; null: in dtype")
    exact_k: int | None = Field(
        default=None, ge=1, description="language models, with value_bits or curve: the top log-probabilities kept "
        "in dtype, at most k (e.g. 8); null: TokenCache.build's min(4, k)")
    tail: Literal["bucket", "renormalize", "uniform"] | None = Field(
        default=None, description="language models: how the mass outside the top k is served (bucket: shared "
        "equally by the other tokens; renormalize: none; uniform: spread over every token); default bucket")
    path: str | None = Field(
        default=None, description="cache directory (built there if missing); default: teacher_caches/ beside the "
        "stage store, or RUN_DIR/teacher_cache without a store")
    batch_size: int = Field(default=256, ge=1, description="samples per teacher forward while building "
                            "(language models: sequences, default 16)")


class OnPolicyConfig(_Strict):
    """On-policy distillation of a language model (:class:`kdistill.OnPolicy`, GKD): with
    probability ``lmbda`` per batch the student generates the completions of the batch's
    prompts; with ``seq_kd`` the teacher generates the others (sequence-level KD)."""

    lmbda: float = Field(default=0.5, ge=0.0, le=1.0, description="share of batches whose completions the student generates")
    max_new_tokens: int = Field(default=64, ge=1, description="tokens generated per completion")
    temperature: float = Field(default=1.0, gt=0, description="sampling temperature of the generation (not the loss's)")
    top_p: float = Field(default=1.0, gt=0, le=1.0, description="nucleus sampling of the generation")
    seq_kd: bool = Field(default=False, description="the other batches' completions generated by the teacher")
    seed: int = Field(default=0, ge=0, description="seed of the per-batch draws and of the sampling")


class DistilStage(StageConfig):
    epochs: int = Field(default=2, ge=1)
    alpha: float = Field(default=0.1, ge=0.0, le=1.0, description="weight of the hard-label loss")
    label_loss_weight: float | None = Field(
        default=None, ge=0.0, description="instead of alpha: loss = this * hard-label loss + the weighted "
        "distillation losses (the research toolkits' convention)")
    temperature: float = Field(default=4.0, gt=0)
    temperature_squared: bool = True
    losses: list[LossSpec] = Field(default_factory=lambda: [LossSpec(name="kd")], min_length=1)
    teacher_cache: TeacherCacheConfig | None = Field(
        default=None, description="distil from an offline cache of the teacher's outputs (true: the defaults)")
    vocab_size: int | None = Field(
        default=None, ge=2, description="language models whose heads differ in size (one padded): compare the first "
        "vocab_size logits (the tokenizer's vocabulary)")
    on_policy: OnPolicyConfig | None = Field(
        default=None, description="language models: on-policy distillation (student-generated completions, GKD)")
    shard_teacher: bool = Field(
        default=False, description="distil stage of a language-model run under torchrun: shard the teacher's "
        "parameters across the processes for distillation (kdistill.teacher.ShardedTeacher, FSDP2); a single "
        "process refuses it")

    @field_validator("teacher_cache", mode="before")
    @classmethod
    def _cache_flag(cls, value: Any) -> Any:
        if value is True:
            return {}
        return None if value is False else value


class AssistantStage(DistilStage):
    """Teacher-assistant distillation (TAKD; Mirzadeh et al. 2020, "Improved Knowledge
    Distillation via Teacher Assistant", arXiv:1902.03393): a model of intermediate size
    (``model``) is distilled from the teacher on the distil stage's data, then serves as
    the distilled student's teacher. Every other key is a distil-stage key and applies to
    the assistant's own distillation; ``teacher_cache`` caches the teacher for it (the
    distil stage's ``teacher_cache`` then caches the assistant)."""

    model: ModelSpec = Field(description="the assistant's architecture (a builder name or _component_)")

    @model_validator(mode="after")
    def _no_checkpoint(self) -> "AssistantStage":
        if self.model.checkpoint is not None:
            raise ValueError("stages.assistant.model.checkpoint is not supported: the assistant is trained by "
                             "distillation from the teacher; to distil from a model you have, make it the teacher")
        return self


class BornAgainStage(DistilStage):
    """Born-again networks (Furlanello et al. 2018, "Born-Again Neural Networks",
    arXiv:1805.04770): ``generations`` networks of the *teacher's* architecture, each
    distilled on the distil stage's data from the one before; generation 1 from the
    trained teacher. Each generation is a stage of its own (``stages/born_again_<k>``,
    stored and resumable), and the report gives each one's test accuracy beside the
    teacher's. With ``ensemble: true`` the last generation distils from the ensemble of
    every earlier generation, the teacher included (the mean of their softened
    probabilities, :class:`kdistill.teacher.EnsembleTeacher`). Every other key is a
    distil-stage key and applies to every generation; generation ``k`` starts from the
    weights the teacher's builder gives under seed ``seed + k``."""

    generations: int = Field(ge=1, description="generations to distil, each from the last (generation 1 from the "
                             "teacher)")
    ensemble: bool = Field(default=False, description="the last generation distils from the mean of the softened "
                           "probabilities of every earlier generation and the teacher")


class MutualStage(StageConfig):
    """Deep mutual learning (Zhang et al. 2018, "Deep Mutual Learning", arXiv:1706.00384;
    :class:`kdistill.MutualLearning`): ``peers`` networks trained together on the labelled
    data, each distilling from the others' current predictions; no teacher. ``peers`` is a
    count (that many copies of the student's architecture) or a list of model specs. Peer
    ``k`` (from 1) starts from the weights its builder gives under seed ``seed + k - 1``
    (peer 1 thus as the scratch student). One stage (``stages/mutual``) holds every peer,
    and the report gives each peer's test accuracy beside the scratch student's (the
    student trained alone: give the scratch stage the same epochs and optimizer for a fair
    comparison). ``alpha`` weighs the hard-label loss, ``1 - alpha`` the mimicry term."""

    epochs: int = Field(default=2, ge=1)
    peers: int | list[ModelSpec] = Field(
        default=2, description="a count of student copies (>= 2), or a list of >= 2 model specs")
    alpha: float = Field(default=0.5, ge=0.0, le=1.0, description="weight of the hard-label loss (0.5, T=1: the "
                         "paper's loss, halved)")
    temperature: float = Field(default=1.0, gt=0, description="softening temperature of the mimicry term")
    target: Literal["peers", "ensemble"] = Field(
        default="peers", description="peers: mean of the KLs to each other peer (the paper); ensemble: KL to the mean "
        "of the other peers' distributions")

    @model_validator(mode="after")
    def _check_peers(self) -> "MutualStage":
        if isinstance(self.peers, int) and not isinstance(self.peers, bool) and self.peers < 2:
            raise ValueError(f"stages.mutual.peers is {self.peers}: mutual learning needs at least 2 peers (a count "
                             "of student copies, or a list of model specs)")
        if isinstance(self.peers, list):
            if len(self.peers) < 2:
                raise ValueError(f"stages.mutual.peers lists {len(self.peers)} model(s): give at least 2")
            if any(p.checkpoint is not None for p in self.peers):
                raise ValueError("stages.mutual.peers: a checkpoint is not supported, the peers are trained together "
                                 "from new weights; remove checkpoint")
        if self.max_grad_norm is not None:
            raise ValueError("stages.mutual.max_grad_norm is not supported (one norm over all peers would couple "
                             "them): remove it")
        if self.ema_decay is not None:
            raise ValueError("stages.mutual.ema_decay is not supported: remove it")
        return self


class Stages(_Strict):
    teacher: TeacherStage = Field(default_factory=TeacherStage)
    scratch: ScratchStage = Field(default_factory=ScratchStage)
    assistant: AssistantStage | None = Field(
        default=None, description="teacher-assistant distillation: teacher -> assistant -> distilled student")
    distil: DistilStage = Field(default_factory=DistilStage)
    born_again: BornAgainStage | None = Field(
        default=None, description="born-again networks: generations of the teacher's architecture, each distilled "
        "from the last")
    mutual: MutualStage | None = Field(
        default=None, description="deep mutual learning: peers trained together, each distilling from the others")


class CheckpointConfig(_Strict):
    every_steps: int | None = Field(default=None, ge=1, description="mid-epoch resume points, in optimizer steps")
    every_seconds: float | None = Field(default=60.0, gt=0, description="mid-epoch resume points, in seconds")


class ReportConfig(_Strict):
    latency_batch: int = Field(default=1, ge=1)
    throughput_batch: int = Field(default=256, ge=1)
    repeats: int = Field(default=50, ge=3)
    samples: int = Field(default=3, ge=0, description="language models: generated samples per model (prompts are "
                         "the starts of held-out sequences)")
    prompt_tokens: int = Field(default=24, ge=1, description="language models: tokens of each sample's prompt")
    new_tokens: int = Field(default=48, ge=1, description="language models: tokens generated per sample, and per "
                            "timed generation (greedy, batch 1)")


class EnsembleMember(ModelSpec):
    """One teacher of an ensemble: a model (``name`` or ``_component_``, its keyword
    arguments, ``checkpoint``) and where it differs from the others: ``tag`` (its name
    in feature taps, ``"<tag>/<layer>"``, and in the report; default ``t0``, ``t1``,
    ...), ``seed`` (its initial weights and data order; default the run's seed plus its
    position, so members differ) and ``epochs`` (default ``stages.teacher.epochs``)."""

    tag: str | None = Field(default=None, description="the member's name in teacher taps (<tag>/<layer>), its "
                            "stage (teacher-<tag>) and the report; null: t0, t1, ...")
    seed: int | None = Field(default=None, ge=0, description="seed of its initial weights and data order; null: "
                             "the run's seed + its position")
    epochs: int | None = Field(default=None, ge=0, description="its training epochs (0: use checkpoint as it is); "
                               "null: stages.teacher.epochs")

    def model_dump_spec(self) -> dict[str, Any]:
        """The member as a plain teacher spec (what a single-teacher run's ``teacher``
        would dump): its stage fingerprint is a single teacher's with the same model."""
        return {k: v for k, v in self.dump().items() if k not in ("tag", "seed", "epochs")}


class EnsembleConfig(_Strict):
    """Distil from several teachers at once (:class:`kdistill.teacher.EnsembleTeacher`):
    each member is trained (or loaded) in its own teacher stage, ``stages/teacher-<tag>``
    with ``stages.teacher``'s settings, and the distil stage learns from their combination."""

    teachers: list[EnsembleMember] = Field(min_length=2, description="the members, two or more")
    combine: Literal["mean_probs", "mean_logits", "confidence"] = Field(
        default="mean_probs", description="mean_probs: mean of the members' probabilities at the distillation "
        "temperature; mean_logits: mean of their logits; confidence: per-sample weights from each member's "
        "entropy")
    weights: list[float] | None = Field(default=None, description="one fixed weight per member (null: equal)")

    @model_validator(mode="after")
    def _check(self) -> "EnsembleConfig":
        for i, member in enumerate(self.teachers):
            if member.tag is None:
                member.__dict__["tag"] = f"t{i}"
        labels = [m.tag for m in self.teachers]
        if len(set(labels)) != len(labels) or any(not lab or "/" in lab for lab in labels):
            raise ValueError(f"ensemble.teachers tags must be distinct, non-empty and without '/', got {labels}")
        if self.weights is not None:
            if len(self.weights) != len(self.teachers):
                raise ValueError(f"ensemble.weights has {len(self.weights)} values for {len(self.teachers)} teachers: "
                                 "give one weight per teacher")
            if any(w < 0 for w in self.weights) or sum(self.weights) <= 0:
                raise ValueError(f"ensemble.weights must be >= 0 and not all 0, got {self.weights}")
        return self


class ExperimentConfig(_Strict):
    """A whole experiment: teacher -> student from scratch -> distilled student -> report."""

    name: str = "experiment"
    seed: int = Field(default=0, ge=0)
    output_dir: str | None = Field(default=None, description="run directory (default runs/<name>)")
    device: str | None = Field(default=None, description="cpu, cuda, cuda:1, mps; default: $KDISTILL_DEVICE or the best available")
    threads: int | None = Field(default=None, ge=1)
    teacher_store: str | None = Field(
        default="auto", description="folder of finished teacher/scratch stages shared by runs; 'auto' = $KDISTILL_CACHE/stages "
        "(default ~/.cache/kdistill/stages), null = no sharing")
    data: DataConfig = Field(default_factory=DataConfig)
    teacher: ModelSpec = Field(default_factory=lambda: ModelSpec(name="classic_teacher"))
    student: ModelSpec = Field(default_factory=lambda: ModelSpec(name="classic_student"))
    ensemble: EnsembleConfig | None = Field(
        default=None, description="several teachers instead of `teacher`: their combination is the distil stage's "
        "teacher (image runs)")
    stages: Stages = Field(default_factory=Stages)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    report: ReportConfig = Field(default_factory=ReportConfig)
    callbacks: list[CallbackSpec] = Field(default_factory=list)

    @model_validator(mode="after")
    def _check(self) -> "ExperimentConfig":
        if self.student.checkpoint is not None:
            raise ValueError("student.checkpoint is not supported: the students are what the run trains")
        if self.ensemble is not None:
            self._check_ensemble(self.ensemble)
        ts = self.stages.teacher
        if ts.epochs is None:  # resolved here, so the dumped config and every fingerprint hold a number
            ts.__dict__["epochs"] = 0 if self.teacher.checkpoint is not None else 1
        elif (ts.epochs == 0 and self.teacher.checkpoint is None and "path" not in self.teacher.kwargs
              and self.ensemble is None):
            raise ValueError(
                "stages.teacher.epochs is 0 (use the teacher as it is), but no teacher.checkpoint is given: set "
                "teacher.checkpoint to a file of trained weights (kdistill checkpoint, PyTorch state_dict or "
                ".safetensors), or epochs >= 1 to train the teacher")
        self._check_new_stages()
        for where in ("distil", "assistant"):
            stage = getattr(self.stages, where)
            if stage is not None and stage.teacher_cache is not None:
                self._check_cache(stage.teacher_cache, where)
            if stage is not None and stage.on_policy is not None and self.data.text is None:
                raise ValueError(f"stages.{where}.on_policy generates completions with a language model: it needs "
                                 "data.text (a language-model run)")
            if stage is not None and stage.on_policy is not None and stage.teacher_cache is not None:
                raise ValueError(
                    f"stages.{where}.teacher_cache cannot serve stages.{where}.on_policy: the cache holds the teacher's "
                    "outputs on the dataset's sequences, and on-policy batches are generated during training (they "
                    f"have no index into the cache). Remove stages.{where}.teacher_cache to distil from the live "
                    f"teacher, or remove stages.{where}.on_policy to distil from the cache")
            if stage is not None and stage.shard_teacher:
                self._check_sharding(stage, where)
        return self

    def _check_ensemble(self, ensemble: EnsembleConfig) -> None:
        # (a dumped config holds the default teacher beside the ensemble: that one is fine)
        default_teacher = {"name": "classic_teacher", "checkpoint": None}
        if "teacher" in self.model_fields_set and self.teacher.dump() != default_teacher:
            raise ValueError("give either teacher (one teacher) or ensemble.teachers (several), not both: move the "
                             "teacher into ensemble.teachers")
        if self.data.text is not None:
            raise ValueError("ensemble is for image runs; a language-model run (data.text) distils from one teacher")
        if self.stages.assistant is not None:
            raise ValueError("ensemble with stages.assistant is not supported: distil from the ensemble directly, or "
                             "from one teacher through an assistant")
        if self.stages.distil.teacher_cache is not None:
            raise ValueError("stages.distil.teacher_cache with ensemble is not supported in a config run: the distil "
                             "stage runs the members live. In Python, EnsembleTeacher takes a TeacherCache per member")
        epochs = self.stages.teacher.epochs
        for i, member in enumerate(ensemble.teachers):
            if member.seed is None:
                member.__dict__["seed"] = self.seed + i
            if member.epochs is None:
                member.__dict__["epochs"] = epochs if epochs is not None else (0 if member.checkpoint else 1)
            if member.epochs == 0 and member.checkpoint is None:
                raise ValueError(f"ensemble.teachers[{i}] ({member.tag}) has epochs 0 (use it as it is) but no "
                                 "checkpoint: give it a checkpoint of trained weights, or epochs >= 1")

    def _check_new_stages(self) -> None:
        """stages.born_again and stages.mutual: image runs, live teachers."""
        for where in ("born_again", "mutual"):
            if getattr(self.stages, where) is not None and self.data.text is not None:
                raise ValueError(f"stages.{where} is for image classification runs; this run has data.text (a "
                                 f"language-model run): remove stages.{where}")
        ba = self.stages.born_again
        if ba is None:
            return
        for key, off in (("teacher_cache", None), ("on_policy", None), ("shard_teacher", False)):
            if getattr(ba, key) != off:
                raise ValueError(f"stages.born_again.{key} is not supported: each generation distils from the live "
                                 f"previous generation; remove {key}")

    def _check_sharding(self, stage: "DistilStage", where: str) -> None:
        key = f"stages.{where}.shard_teacher"
        if where != "distil" or self.data.text is None:
            raise ValueError(f"{key} is for the distil stage of a language-model run (data.text): it shards a "
                             "causal LM teacher block by block; remove it")
        if stage.teacher_cache is not None:
            raise ValueError(f"{key} with stages.distil.teacher_cache: the cache replaces the teacher during "
                             "distillation, so there is nothing to shard; remove one of them")

    def _check_cache(self, cache: "TeacherCacheConfig", where: str) -> None:
        key = f"stages.{where}.teacher_cache"
        if self.data.text is not None:
            self._check_token_cache(cache, key)
            return
        if cache.mode == "topk" and cache.k is None:
            raise ValueError(f"{key}: mode: topk needs k, the classes kept per sample (e.g. k: 5)")
        if cache.mode == "full" and cache.k is not None:
            raise ValueError(f"{key}: k is only used with mode: topk")
        if cache.dtype == "bfloat16":
            raise ValueError(f"{key}.dtype: bfloat16 is for language-model token caches; an image run's cache "
                             "stores float16 or float32")
        if cache.tail is not None:
            raise ValueError(f"{key}.tail is for language-model token caches (data.text); an image run's top-k "
                             "cache always serves its tail as a bucket: remove it")
        if cache.value_bits is not None:
            raise ValueError(f"{key}.value_bits is for language-model token caches (data.text); an image run's "
                             "cache stores float16 or float32 values: remove it")
        for name in ("curve", "exact_k"):
            if getattr(cache, name) is not None:
                raise ValueError(f"{key}.{name} is for language-model token caches (data.text); an image run's "
                                 "cache stores float16 or float32 values: remove it")
        if self.data.augment and not cache.views:
            raise ValueError(
                f"{key} with data.augment needs teacher_cache.views >= 1: a cache of the "
                "un-augmented samples cannot serve augmented inputs (the teacher never saw them). Set views "
                "(e.g. 8: epoch e trains on view e mod 8), or drop the cache to distil from the live teacher")
        if cache.views and not self.data.augment:
            raise ValueError(f"{key}.views needs data.augment, the augmentation the views are made with")
        for spec in self.data.augment:
            if not callable(getattr(spec.resolve(), "seeded", None)):
                raise ValueError(
                    f"data.augment {spec.label()} cannot make per-sample views for {key} "
                    "(mixup and cutmix mix samples of a batch; a custom class needs seeded(x, seeds) and "
                    "to_config()); drop the cache to distil from the live teacher")

    @staticmethod
    def _check_token_cache(cache: "TeacherCacheConfig", key: str) -> None:
        """A language-model run's cache: a top-k token cache; its defaults resolved here, so
        the dumped config and the stage's fingerprint hold them."""
        if cache.mode == "full" and "mode" in cache.model_fields_set:
            raise ValueError(
                f"{key}.mode: full is not available for language models (a full cache would store every "
                "vocabulary entry at every position): use mode: topk with k tokens per position (e.g. k: 64), "
                "or leave mode out (topk is the default for data.text)")
        if cache.views:
            raise ValueError(f"{key}.views is for image runs with data.augment; a language-model run's token "
                             "cache has no augmented views: remove it")
        cache.__dict__["mode"] = "topk"
        if cache.k is None:
            cache.__dict__["k"] = 64
        if cache.tail is None:
            cache.__dict__["tail"] = "bucket"
        if "batch_size" not in cache.model_fields_set:
            cache.__dict__["batch_size"] = 16
        if cache.value_bits is not None and cache.curve is not None:
            raise ValueError(f"{key}: value_bits and curve are two encodings of the same log-probabilities: "
                             "set one of them")
        if cache.exact_k is not None:
            if cache.value_bits is None and cache.curve is None:
                raise ValueError(f"{key}.exact_k applies to value_bits or curve (the top log-probabilities kept in "
                                 "dtype, the rest encoded): set one of them too, or remove exact_k")
            if cache.exact_k > cache.k:
                raise ValueError(f"{key}.exact_k: {cache.exact_k} is more than k ({cache.k}), the log-probabilities "
                                 "stored per position: set exact_k <= k")

    def run_dir(self) -> Path:
        return Path(self.output_dir if self.output_dir is not None else Path("runs") / self.name)


# --------------------------------------------------------------------------- loading
#: Floats as YAML 1.2 (and every ML config) writes them, that YAML 1.1 (PyYAML) reads as
#: strings: an exponent without a dot or without a sign (``1e-3``, ``1E5``, ``1.0e5``), and
#: a signed number starting with a dot (``-.5``). YAML 1.1's own float forms (``0.5``,
#: ``.5``, ``5.``, ``-2.5e+4``, ``.inf``, ``.nan``) already resolve; this pattern is only
#: consulted after them and after the int pattern, so ints (``3``, ``0x10``) stay ints, and
#: it is anchored, so ``1e-3abc``, ``e5``, ``1.2.3`` and bare ``inf``/``nan`` stay strings.
_YAML12_FLOAT = re.compile(r"""^[-+]?(?:
      (?:[0-9]+\.[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?   # 1.5, 5., .5, 1.0e5
    | [0-9]+[eE][-+]?[0-9]+                              # 1e-3, 1E5, 2e0
    )$""", re.X)
_FLOAT_TAG = "tag:yaml.org,2002:float"


@functools.lru_cache(maxsize=None)
def _yaml_classes() -> tuple[type, type]:
    """A SafeLoader and a SafeDumper that both know :data:`_YAML12_FLOAT` (the dumper, so a
    string like ``"1e3"`` is written quoted and reads back as a string)."""
    import yaml

    class ConfigLoader(yaml.SafeLoader):
        """``yaml.SafeLoader`` that also reads YAML 1.2 floats (``1e-3``) as floats."""

    class ConfigDumper(yaml.SafeDumper):
        """``yaml.SafeDumper`` that quotes the strings ``ConfigLoader`` would read as floats."""

    # add_implicit_resolver copies the inherited table first: yaml.SafeLoader is unchanged
    for cls in (ConfigLoader, ConfigDumper):
        cls.add_implicit_resolver(_FLOAT_TAG, _YAML12_FLOAT, list("-+0123456789."))
    return ConfigLoader, ConfigDumper


def yaml_load(text: str) -> Any:
    """Parse YAML like ``yaml.safe_load``, but with YAML 1.2 floats: ``1e-3``, ``1E5``,
    ``-.5`` are floats (PyYAML follows YAML 1.1, where they are strings). Used for config
    files and ``--set`` values; use it wherever a user's value is parsed as YAML."""
    import yaml

    return yaml.load(text, Loader=_yaml_classes()[0])


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``key.path=value`` overrides (values parsed as YAML by :func:`yaml_load`: ``3``,
    ``0.5``, ``1e-3``, ``true``, ``[1, 2]``, ``null``); list items by index
    (``stages.distil.losses.0.weight=0.5``).

    Raises:
        ConfigError: an override without ``=`` or through a value that is not a mapping/list.
    """
    import yaml

    out = copy.deepcopy(raw)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} must look like key.path=value, e.g. stages.distil.epochs=3")
        try:
            value = yaml_load(text) if text.strip() else None
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: the value {text!r} is not valid YAML ({e}); quote "
                              "strings with special characters, e.g. key='a: b'") from None
        node: Any = out
        parts = key.strip().split(".")
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            where = ".".join(parts[: i + 1])
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise ConfigError(f"override {item!r}: '{where}' is not an index of a list of {len(node)} items")
                if last:
                    node[int(part)] = value
                else:
                    node = node[int(part)]
            elif isinstance(node, dict):
                if last:
                    node[part] = value
                else:
                    if not isinstance(node.get(part), (dict, list)):
                        node[part] = {} if node.get(part) is None else node[part]
                        if not isinstance(node[part], (dict, list)):
                            raise ConfigError(f"override {item!r}: '{where}' is {node[part]!r}, not a section with keys")
                    node = node[part]
            else:
                raise ConfigError(f"override {item!r}: cannot go into '{'.'.join(parts[:i])}', which is a value")
    return out


def _format_errors(source: str, error: ValidationError, raw: Mapping[str, Any]) -> str:
    lines = [f"{source}: invalid experiment config ({error.error_count()} problem(s)):"]
    for e in error.errors():
        loc = ".".join(str(p) for p in e["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            parent = loc.rpartition(".")[0]
            known = _known_keys(parent)
            close = difflib.get_close_matches(loc.rpartition(".")[2], known, n=2)
            msg = "unknown key" + (f" (did you mean {', '.join(close)}?)" if close else "") + (
                f"; this section takes: {', '.join(known)}" if known else "")
        got = ""
        if e["type"] != "extra_forbidden" and "input" in e and not isinstance(e["input"], (dict, list)):
            got = f" (got {e['input']!r})"
        lines.append(f"  {loc or '<top level>'}: {msg}{got}")
    return "\n".join(lines)


def _known_keys(dotted: str) -> list[str]:
    model: Any = ExperimentConfig
    for part in [p for p in dotted.split(".") if p]:
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return []
        ann = field.annotation
        args = [a for a in getattr(ann, "__args__", ()) if isinstance(a, type) and issubclass(a, BaseModel)]
        model = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else (args[0] if args else None)
        if model is None:
            return []
    return list(getattr(model, "model_fields", {}))


def validate_config(raw: Mapping[str, Any], *, source: str = "<config>") -> ExperimentConfig:
    """Validate a config mapping; raises :class:`ConfigError` with every problem found."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{source}: an experiment config is a mapping of sections (data, teacher, ...), got {type(raw).__name__}")
    try:
        return ExperimentConfig.model_validate(dict(raw))
    except ValidationError as e:
        raise ConfigError(_format_errors(source, e, raw)) from None


def load_config(path: str | os.PathLike, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """Read a YAML experiment file, apply ``key.path=value`` overrides, and validate it.

    Numbers are read as YAML 1.2 writes them (``lr: 1e-3`` is a float; see
    :func:`yaml_load`). A file with nothing in it (empty, or only comments) is refused
    rather than run as the default experiment; ``{}`` asks for every default on purpose.

    Raises:
        ConfigError: missing or empty file, YAML syntax error, or an invalid config (every
            problem listed with its key path).
    """
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"no config file at {path}; the shipped ones are under configs/ (e.g. {EXAMPLE_CONFIG})")
    try:
        raw = yaml_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if raw is None:
        raise ConfigError(
            f"{path} is empty (no settings, only blank lines or comments), so it describes no experiment; "
            f"write the experiment into it, starting from a shipped example such as {EXAMPLE_CONFIG} "
            "(or write {} to run every default on purpose)")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: an experiment config is a mapping of sections (data, teacher, ...), got {type(raw).__name__}")
    source = str(path) + (f" with --set {' '.join(overrides)}" if overrides else "")
    return validate_config(apply_overrides(raw, overrides), source=source)


def dump_config(config: ExperimentConfig) -> str:
    """The resolved config as YAML (every default filled in), as saved in a run directory."""
    import yaml

    return yaml.dump(config_dict(config), Dumper=_yaml_classes()[1], sort_keys=False)


def config_dict(config: BaseModel) -> dict[str, Any]:
    """A config as plain data, components in their YAML form."""
    out: dict[str, Any] = {}
    for name in type(config).model_fields:
        out[name] = _plain(getattr(config, name))
    return out


def _plain(value: Any) -> Any:
    if isinstance(value, ComponentSpec):
        return value.dump()
    if isinstance(value, BaseModel):
        return config_dict(value)
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value
