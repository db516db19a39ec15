"""The experiment runner behind ``kdistill run``: a validated config -> a run directory.

A run trains, in order, the **teacher** (or loads ``teacher.checkpoint``), the student
**from scratch** (the baseline; ``stages.scratch.enabled: false`` skips it) and the
**distilled** student, then measures all three and writes the report::

    RUN_DIR/
      config.yaml             the resolved config (every default filled in)
      run.json                status (running / finished), config fingerprint, times
      stages/<stage>/         teacher, scratch, distil
        checkpoint.pt           final weights (kdistill checkpoint)
        last.pt                 resumable training state, rewritten atomically during
                                training (model, adapters, optimizer, scheduler, RNG
                                states, epoch, step, data position, history)
        history.jsonl           one JSON object per epoch (train and val_ terms)
        stage.json, done.json   fingerprint of the stage; done.json marks it finished and
                                records the SHA-256 of checkpoint.pt (checked at every load)
      .lock                   held (flock) by the process running in the directory
      run.log                 what the runner did and when (trained, reused, resumed)
      metrics.json            every number of the report, and the machine
      figures/*.png           learning curves, confusion matrix, accuracy per epoch
      report.md, report.html  the report (HTML self-contained)
      student.onnx, ...       written by ``kdistill export``

Nothing is lost on a crash: every file is written atomically; a run killed at any moment
(SIGKILL included) continues from its last training state with ``kdistill run --resume
RUN_DIR`` and ends with the same metrics as an uninterrupted run with the same seed (on
the CPU with the same thread count: bit for bit).

One process at a time runs in a run directory: ``run_experiment`` holds an exclusive lock
on ``RUN_DIR/.lock`` throughout, and a second run into the same directory is refused with
the holder's pid, host and start time. (A lock left by a killed process is released by
the kernel and taken over.) A continued run first removes the temporary files of atomic
writes a kill interrupted.

A stage checkpoint whose bytes changed after it was written (its SHA-256 differs from the
one in ``done.json``) is never used: the runner trains that stage again, and
:func:`load_stage_model` refuses it.

Finished teacher and scratch stages are also published to a *stage store*
(``teacher_store``, default ``~/.cache/kdistill/stages``): any later run whose stage has
the same fingerprint (same config of that stage, same data, same seed) copies it instead
of training again, and says so. That is what makes sweeps and method comparisons cheap.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from . import distributed
from .atomic import atomic_write_text
from .checkpoint import load_checkpoint, load_weights
from .config import SCHEDULES, ExperimentConfig, config_dict, dump_config
from .data import load_dataset, split_labelled
from .data.augment import Compose
from .data.datasets import DatasetSplits
from .distiller import Distiller, Trainer, check_precision, loss_temperatures, tapped_layers
from .errors import ConfigError, KDistillError, RunDirectoryError
from .losses.base import DistillationLoss, WeightedSum
from .mutual import MutualLearning, PeerStack
from .run.directory import (lock_run_dir, prepare_run_dir, read_json, read_run_config, remove_stale_temp_files,
                            tee, verify_stage_checkpoint, write_run_json)
from .run.fingerprints import data_fingerprint, fingerprint, stage_settings, step_settings
from .run.measure import StageClock, finish_run, measure
from .run.store import StageContext, default_store, run_stage
from .runtime import get_device, seed_everything, set_threads

STAGES = ("teacher", "scratch", "assistant", "distil")


# --------------------------------------------------------------------------- building
def _takes(fn: Callable[..., Any], name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def build_model(spec, data: DatasetSplits) -> nn.Module:
    """A model from its spec; built-ins get the data's classes, channels and input size."""
    from .models import build_model as build_named

    shape = data.input_shape
    size = {"num_classes": data.num_classes, "in_channels": shape[0], "input_size": shape[-1]}
    if spec.name is not None:
        return build_named(spec.name, **size, **spec.kwargs)
    fn = spec.resolve()
    model = fn(**{k: v for k, v in size.items() if _takes(fn, k)}, **spec.kwargs)
    if not isinstance(model, nn.Module):
        raise ConfigError(f"_component_ {spec.component} returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def build_optimizer(spec, params) -> torch.optim.Optimizer:
    """The optimizer of a config's spec (a named one without ``lr`` gets the default
    learning rate of :data:`kdistill.distiller.OPTIMIZERS`, as ``compile`` gives it)."""
    lr = spec.default_lr()
    return spec.resolve()(params, **spec.kwargs, **({} if lr is None else {"lr": lr}))


def build_schedule(spec, epochs: int, steps_per_epoch: int):
    """``(factory(optimizer) -> scheduler or None, interval)``.

    Args:
        spec: the stage's schedule; a built-in's keywords default to
            :data:`kdistill.config.SCHEDULES`.
        epochs: the stage's epochs.
        steps_per_epoch: optimizer steps per epoch (with gradient accumulation, fewer
            than batches), what a schedule stepped every step counts.
    """
    interval = spec.interval
    if spec.component is not None:
        cls = spec.resolve()
        return (lambda opt: cls(opt, **spec.kwargs)), interval
    kw = {**SCHEDULES[spec.name], **spec.kwargs}
    sched = torch.optim.lr_scheduler
    if spec.name == "constant":
        return None, "epoch"
    if spec.name == "step":
        return (lambda opt: sched.StepLR(opt, step_size=kw["step_size"], gamma=kw["gamma"])), "epoch"
    if spec.name == "multistep":
        milestones = kw["milestones"] if kw["milestones"] is not None else [epochs // 2]
        return (lambda opt: sched.MultiStepLR(opt, milestones=milestones, gamma=kw["gamma"])), "epoch"
    # cosine over every optimizer step of the stage, after an optional linear warm-up
    total = epochs * steps_per_epoch
    warm = int(round(kw["warmup_epochs"] * steps_per_epoch))

    def cosine(opt):
        decay = sched.CosineAnnealingLR(opt, T_max=max(1, total - warm), eta_min=kw["eta_min"])
        if warm <= 0:
            return decay
        return sched.SequentialLR(opt, [sched.LinearLR(opt, start_factor=1e-3, total_iters=warm), decay], milestones=[warm])

    return cosine, "step"


def build_losses(stage) -> DistillationLoss:
    """The distil stage's losses; each one that takes a ``temperature`` (or
    ``temperature_squared``) and does not set it gets the stage's."""
    built: dict[str, tuple[DistillationLoss, float]] = {}
    for spec in stage.losses:
        cls = spec.resolve()
        kwargs = dict(spec.kwargs)
        for key in ("temperature", "temperature_squared"):
            if key not in kwargs and _takes(cls, key):
                kwargs[key] = getattr(stage, key)
        loss = cls(**kwargs)
        if not isinstance(loss, DistillationLoss):
            raise ConfigError(
                f"loss {spec.label()} built a {type(loss).__name__}, not a kdistill.losses.DistillationLoss "
                "(forward(student: Outputs, teacher: Outputs, batch: Batch) -> Tensor)")
        name = spec.label()
        while name in built:
            name += "_"
        built[name] = (loss, spec.weight)
    if len(built) == 1:
        (loss, weight), = built.values()
        if weight == 1.0:
            return loss
    return WeightedSum(built)


def steps_per_epoch(n_samples: int, batch: int, accumulate: int = 1) -> int:
    """Optimizer steps per epoch: one per ``accumulate`` batches (the last on the rest)."""
    return -(-(-(-n_samples // batch)) // accumulate)


# --------------------------------------------------------------------------- the run


def load_data(config: ExperimentConfig) -> DatasetSplits:
    """The config's dataset (built-in or from its reader), normalised if asked."""
    d = config.data
    if d.reader is not None:
        try:
            data = d.reader.resolve()(**d.reader.kwargs)
        except ValueError as e:  # DatasetSplits refuses images and labels of different lengths, ...
            raise ConfigError(f"data.reader {d.reader.component}: {e}") from e
        if not isinstance(data, DatasetSplits):
            raise ConfigError(f"data.reader {d.reader.component} returned {type(data).__name__}, not kdistill.data.DatasetSplits")
    else:
        data = load_dataset(d.dataset, d.data_dir)
    return normalize_channels(data) if d.normalize else data


def normalize_channels(data: DatasetSplits) -> DatasetSplits:
    """Standardise each channel with the training set's mean and std (both splits)."""
    x = data.x_train
    axes = (0, *range(2, x.ndim))  # every axis but the channel's
    mean = x.mean(axis=axes, keepdims=True, dtype=np.float64)
    std = x.std(axis=axes, keepdims=True, dtype=np.float64) + 1e-8
    norm = lambda a: ((a - mean) / std).astype(np.float32)  # noqa: E731
    return DatasetSplits(data.name, norm(data.x_train), data.y_train, norm(data.x_test), data.y_test, data.classes,
                         source=data.source)


def student_rows(config: ExperimentConfig, data: DatasetSplits) -> tuple[np.ndarray, np.ndarray | None]:
    """``(labelled rows, unlabelled rows or None)``: the training-set rows the students
    train on (``data.subset`` class-balanced labelled samples, the rest unlabelled with
    ``data.unlabelled``), each part in the training set's order."""
    d = config.data
    n = len(data.y_train)
    if d.subset is None:
        return np.arange(n), None
    il, _, ir, _ = split_labelled(np.arange(n), data.y_train, d.subset, seed=config.seed)
    return il, (ir if d.unlabelled else None)


def student_data(config: ExperimentConfig, data: DatasetSplits) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(x_labelled, y_labelled, x_unlabelled or None)``: what the students train on
    (:func:`student_rows` of the training set)."""
    il, ir = student_rows(config, data)
    x, y = torch.from_numpy(data.x_train), torch.from_numpy(data.y_train)
    return x[il], y[il], (None if ir is None else x[ir])


def distil_rows(config: ExperimentConfig, data: DatasetSplits) -> np.ndarray:
    """The training-set rows of the distil stage's data in the order ``fit`` indexes them
    (labelled, then unlabelled)."""
    il, ir = student_rows(config, data)
    return il if ir is None else np.concatenate([il, ir])


def distil_inputs(config: ExperimentConfig, data: DatasetSplits) -> torch.Tensor:
    """What a run's teacher cache is built over: the distil stage's training samples in
    the training set's order. Every labelled subset of the same samples (``data.subset``
    with ``data.unlabelled``, or no subset) shares one cache; the run serves it through
    :meth:`~kdistill.teacher.TeacherCache.reindexed` in ``fit``'s order."""
    return torch.from_numpy(data.x_train)[np.sort(distil_rows(config, data))]


def build_augment(config: ExperimentConfig) -> Compose | None:
    """The config's training augmentation (``data.augment``), or ``None``."""
    specs = config.data.augment
    return Compose([spec.resolve()(**spec.kwargs) for spec in specs]) if specs else None


def _stage(config: ExperimentConfig, stage: str):
    spec = getattr(config.stages, stage)
    if spec is None:
        raise ConfigError(f"the config has no stages.{stage}")
    return spec


def cache_settings(config: ExperimentConfig, loss: DistillationLoss, stage: str = "distil") -> dict[str, Any]:
    """The :meth:`TeacherCache.build` keyword arguments ``stages.<stage>.teacher_cache`` asks
    for, given the stage's losses: the teacher layers they read, and (top-k) the tail at
    their temperature, so that the rebuilt logits are exact there."""
    tc = _stage(config, stage).teacher_cache
    return dict(mode=tc.mode, k=tc.k, dtype=tc.dtype, features=tapped_layers(loss)["teacher"], views=tc.views,
                augment=build_augment(config) if tc.views else None, seed=config.seed,
                tail_temperatures=loss_temperatures(loss) if tc.mode == "topk" else (), batch_size=tc.batch_size)


def default_cache_path(config: ExperimentConfig, store: Path | None, run_dir: Path, key: str,
                       stage: str = "distil", model_label: str | None = None) -> Path:
    """Where a run's teacher cache lives: ``teacher_cache.path``, else ``teacher_caches/``
    beside the stage store (shared by every run of the same teacher, data and settings),
    else inside the run directory."""
    tc = _stage(config, stage).teacher_cache
    if tc.path is not None:
        return Path(tc.path).expanduser()
    if store is not None:
        return store.parent / "teacher_caches" / f"{model_label or config.teacher.label()}-{key}"
    return run_dir / ("teacher_cache" if stage == "distil" else f"{stage}_teacher_cache")


def open_teacher_cache(ctx: StageContext, loss: DistillationLoss, teacher: nn.Module, t_fp: str, stage_cfg,
                       stage: str) -> Any:
    """Build (or open) the teacher cache a distillation stage asks for: the teacher the
    stage's Distiller then distils from (``teacher`` is the stage's network: the teacher,
    or the assistant; ``loss`` the stage's losses, which decide what the cache holds)."""
    from .teacher import TeacherCache, estimate_size

    cfg = ctx.config
    tc = stage_cfg.teacher_cache
    settings = cache_settings(cfg, loss, stage)
    rows = distil_rows(cfg, ctx.data)
    stored = np.sort(rows)
    x = torch.from_numpy(ctx.data.x_train)[stored]
    key = fingerprint("teacher_cache", t_fp, ctx.data_fp, hashlib.sha256(stored.tobytes()).hexdigest(),
                      cfg.seed if tc.views else None,  # the seed only picks the views' augmentations
                      {k: v for k, v in settings.items() if k not in ("augment", "batch_size")},
                      [s.dump() for s in cfg.data.augment])
    from_assistant = stage == "distil" and cfg.stages.assistant is not None
    label = cfg.stages.assistant.model.label() if from_assistant else cfg.teacher.label()
    path = default_cache_path(cfg, ctx.store, ctx.run_dir, key, stage, label)
    if distributed.is_main() and not (path / "manifest.json").is_file():
        size = estimate_size(teacher, x, **{k: v for k, v in settings.items()
                                            if k in ("mode", "k", "dtype", "features", "tail_temperatures", "views")})
        ctx.log(f"[{stage}] building the teacher cache {path}: {size['rows']:,} rows "
                f"({tc.views or 1} view(s) x {len(x):,} samples), {size['bytes_per_sample']:,} bytes per sample, "
                f"{size['total_bytes'] / 2**20:,.1f} MiB")
    started = time.perf_counter()
    # (with several processes one builds it, the others wait on its lock and map the same files)
    cached = TeacherCache.build(teacher, x, path, device=ctx.device, dataset_name=ctx.data.name, **settings)
    if not np.array_equal(rows, stored):  # fit's order differs from the cache's (a labelled subset first)
        cached = cached.reindexed(np.searchsorted(stored, rows))
    ctx.log(f"[{stage}] distilling from the teacher cache {path} ({cached.mode}"
            + (f", k={cached.k}" if cached.k else "") + f", {cached.bytes_per_sample} B/sample"
            + (f", {cached.views} views" if cached.views else "") + f"; ready in {time.perf_counter() - started:.1f} s)")
    return cached


def member_fingerprint(config: ExperimentConfig, ctx: StageContext, member, aug_id: list, sha256: str | None) -> str:
    """An ensemble member's stage fingerprint: a single teacher's (the same formula) with
    the member's model, seed and epochs."""
    if member.epochs == 0:
        return fingerprint("checkpoint", sha256)
    ts = config.stages.teacher.model_copy(update={"epochs": member.epochs})
    return fingerprint("teacher", ctx.data_fp, member.model_dump_spec(), stage_settings(ts),
                       ts.batch_size or config.data.batch_size, aug_id, member.seed, *([sha256] if sha256 else []))


def train_ensemble(ctx: StageContext, results: dict, x_train: torch.Tensor, y_train: torch.Tensor,
                   common: dict, aug_id: list) -> tuple[dict[str, nn.Module], Any, str]:
    """Train (or load, reuse, resume) each member of ``config.ensemble`` in its own stage
    ``teacher-<tag>``, with ``stages.teacher``'s settings and the member's seed and epochs.

    Returns:
        ``({tag: network}, the EnsembleTeacher the distil stage learns from, its
        fingerprint)``; ``results`` gets each member's stage result and, as
        ``"teacher"``, the ensemble's.
    """
    from .teacher import EnsembleTeacher

    config, ens = ctx.config, ctx.config.ensemble
    members: dict[str, nn.Module] = {}
    fps = []
    for member in ens.teachers:
        name = f"teacher-{member.tag}"
        seed_everything(member.seed)  # the member's initial weights
        model = build_model(member, ctx.data)
        sha = None
        if member.checkpoint is not None:
            source = load_weights(Path(member.checkpoint), model)
            sha = source["sha256"]
            ctx.log(f"[{name}] loaded from {member.checkpoint} ({source['format']}, {source['tensors']} tensors)")
        fp = member_fingerprint(config, ctx, member, aug_id, sha)
        if member.epochs == 0:
            results[name] = {"fingerprint": fp, "seconds": 0.0, "history": None, "reused": str(member.checkpoint)}
        else:
            ts = config.stages.teacher.model_copy(update={"epochs": member.epochs})
            batch = ts.batch_size or config.data.batch_size

            def trainer(model=model, ts=ts, batch=batch) -> Trainer:
                sched, interval = build_schedule(ts.schedule, ts.epochs,
                                                 steps_per_epoch(len(x_train), batch, ts.accumulate_steps))
                t = Trainer(model, device=ctx.device)
                return t.compile(build_optimizer(ts.optimizer, model.parameters()), metrics=["accuracy"],
                                 temperature=ts.temperature, scheduler=sched, scheduler_interval=interval,
                                 **step_settings(ts))

            results[name] = run_stage(ctx, name, fp, model, trainer,
                                      dict(x=x_train, y=y_train, epochs=ts.epochs, batch_size=batch,
                                           **{**common, "seed": member.seed}), share=True, settings=ts)
        members[member.tag] = model
        fps.append(results[name]["fingerprint"])
    t_fp = fingerprint("ensemble", fps, ens.combine, ens.weights)
    member_results = [results[f"teacher-{m.tag}"] for m in ens.teachers]
    reused = [r["reused"] for r in member_results]
    results["teacher"] = {"fingerprint": t_fp, "seconds": sum(r["seconds"] for r in member_results),
                          "history": None, "reused": reused[0] if all(r == reused[0] for r in reused) else False}
    teacher = EnsembleTeacher(list(members.values()), combine=ens.combine, weights=ens.weights,
                              names=list(members), device=ctx.device)
    return members, teacher, t_fp


def ensemble_module(config: ExperimentConfig, members: list[nn.Module]) -> nn.Module:
    """The config's ensemble as one network (:class:`~kdistill.teacher.EnsembleModule`), at
    the distil stage's temperature: the combination its student learns from."""
    from .teacher import EnsembleModule

    ens = config.ensemble
    return EnsembleModule(members, ens.combine, config.stages.distil.temperature, ens.weights)


def ensemble_metrics(ctx: StageContext, config: ExperimentConfig, models: dict[str, nn.Module], x_test) -> dict:
    """What the report adds for an ensemble run: the members, the rule, and each model's
    top-1 agreement with each member on the test set."""
    from .run.measure import predict_classes

    ens = config.ensemble
    preds = {k: predict_classes(m, x_test, ctx.device, config.data.eval_batch_size) for k, m in models.items()}
    return {
        "combine": ens.combine, "weights": ens.weights, "temperature": config.stages.distil.temperature,
        "members": {m.tag: {"model": m.model_dump_spec(), "seed": m.seed, "epochs": m.epochs} for m in ens.teachers},
        "agreement": {m.tag: {k: float((preds[k] == preds[f"teacher-{m.tag}"]).float().mean())
                              for k in models if k != f"teacher-{m.tag}"} for m in ens.teachers},
    }


def preflight(config: ExperimentConfig, data: DatasetSplits, device: torch.device) -> None:
    """Check, before anything trains, what would otherwise fail minutes into a run: labels
    outside the class range, teacher and student (and assistant) scoring different classes,
    a loss's settings, a layer a loss taps that does not exist, a stage's ``precision`` the
    device cannot train in (fp16 off CUDA). Each distillation stage's
    set-up runs once on two training samples with freshly built models (nothing is kept,
    the random streams are restored).

    Raises:
        ConfigError: naming the stage or the data, what is wrong and how to fix it.
    """
    from .outputs import Batch
    from .runtime import rng_state, set_rng_state

    stages = config.stages
    for where in STAGES:  # a precision this device cannot train in (fp16 off CUDA)
        stage = getattr(stages, where)
        trained = stage is not None and stage.epochs != 0 and getattr(stage, "enabled", True)
        if trained:
            try:
                check_precision(stage.precision, device)
            except ValueError as e:
                raise ConfigError(f"stages.{where}.precision: {e}") from None
    n = data.num_classes
    for split, y in (("training", data.y_train), ("test", data.y_test)):
        y = np.asarray(y)
        if y.size and (y.min() < 0 or y.max() >= n):
            bad = int(y.min()) if y.min() < 0 else int(y.max())
            raise ConfigError(f"{data.name}: a {split} label is {bad}, outside the {n} classes 0..{n - 1} the data "
                              "declares; give labels as class indices 0..C-1 (or fix the reader's class list)")
    saved = rng_state()
    name = "teacher"
    try:
        x = torch.from_numpy(data.x_train[:2])
        batch = Batch(x, torch.from_numpy(data.y_train[:2]), torch.arange(2))
        if config.ensemble is not None:
            from .teacher import EnsembleTeacher

            ens = config.ensemble
            teacher = EnsembleTeacher([build_model(m, data) for m in ens.teachers], combine=ens.combine,
                                      weights=ens.weights, names=[m.tag for m in ens.teachers], device=device)
        else:
            teacher = build_model(config.teacher, data)
        pairs = [("distil", teacher, config.student, config.stages.distil)]
        if config.stages.assistant is not None:
            assistant = build_model(config.stages.assistant.model, data)
            pairs = [("assistant", teacher, config.stages.assistant.model, config.stages.assistant),
                     ("distil", assistant, config.student, config.stages.distil)]
        for name, source, spec, stage in pairs:
            student = build_model(spec, data)
            with torch.no_grad():
                classes = student.eval()(x).shape[-1]
            if classes != n:
                raise ValueError(f"the {'assistant' if name == 'assistant' else 'student'} predicts {classes} classes, "
                                 f"the data has {n}; build it with num_classes={n}")
            loss = build_losses(stage)
            dist = Distiller(student=student, teacher=source, device=device)
            dist.compile(torch.optim.SGD(student.parameters(), lr=0.0), distillation_loss_fn=loss,
                         alpha=stage.alpha, label_loss_weight=stage.label_loss_weight)
            dist.setup(batch)  # taps, adapters, class counts of the pair (models discarded after)
    except ConfigError:
        raise
    except (ValueError, TypeError, KeyError, IndexError, RuntimeError) as e:
        raise ConfigError(f"stages.{name}: {e} (found before any training, on two samples of {data.name})") from None
    finally:
        set_rng_state(saved)


def run_experiment(
    config: ExperimentConfig,
    *,
    run_dir: str | Path | None = None,
    force: bool = False,
    verbose: int = 1,
    log: Callable[[str], None] = print,
) -> dict:
    """Run (or continue) an experiment; returns what ``metrics.json`` holds.

    Args:
        config: the validated experiment.
        run_dir: where to write (default ``config.output_dir`` or ``runs/<name>``).
        force: replace a run directory that holds a different or finished run.
        verbose: 0 silent, 1 progress bars, 2 one line per epoch.
        log: where progress messages go.

    The run holds an exclusive lock on ``RUN_DIR/.lock`` from start to end (rank 0 of a
    multi-process run holds it for all).

    Raises:
        RunDirectoryError: ``run_dir`` holds a different run and ``force`` is not set, or
            another process is running in it.
    """
    distributed.init()
    # every process must run the same experiment (a rank with another config would hang or diverge)
    distributed.check_agreement("the experiment", {"config": config_dict(config)})
    if config.data.text is not None:  # a sharded teacher needs torchrun: refused before anything is written
        from .text_experiment import check_shard_teacher

        check_shard_teacher(config)
    main = distributed.is_main()
    run_dir = Path(run_dir) if run_dir is not None else config.run_dir()
    early: list[str] = []  # messages from before run.log is open; they go into it once it is

    def log_early(message: str) -> None:
        log(message)
        early.append(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}\n")

    with contextlib.ExitStack() as lock:
        distributed.run_together("locking the run directory",
                                 lambda: lock_run_dir(lock, run_dir, log_early) if main else None)
        return _run_locked(config, run_dir, force=force, verbose=verbose, log=log, log_early=log_early, early=early)


def _run_locked(config: ExperimentConfig, run_dir: Path, *, force: bool, verbose: int,
                log: Callable[[str], None], log_early: Callable[[str], None], early: list[str]) -> dict:
    """:func:`run_experiment` once the run directory is locked."""
    # 1. set up: run directory, threads, device, data (rank 0 alone writes, in a multi-process run)
    main = distributed.is_main()
    log, plain_log = log_early, log  # until run.log is open, messages are also kept for it
    state = distributed.run_together(
        "preparing the run directory", lambda: prepare_run_dir(config, run_dir, force=force, log=log) if main else None)
    state = distributed.broadcast_object(state)
    if state == "finished":
        log(f"{run_dir} already holds this finished run; nothing to do (report: {run_dir / 'report.md'}; "
            "--force trains it again)")
        return read_json(run_dir / "metrics.json")
    started = time.time()
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        with open(run_dir / "run.log", "a", encoding="utf-8") as f:
            f.writelines(early)
        log = tee(plain_log, run_dir / "run.log")
        if state == "continue":
            remove_stale_temp_files(run_dir, log)  # we hold the lock: no other writer is alive
        atomic_write_text(run_dir / "config.yaml", dump_config(config))
        write_run_json(run_dir, config, "running", started)
        if distributed.is_distributed():
            log(f"{distributed.world_size()} processes ({distributed.default_backend()}); batch sizes are global")
    else:
        log = lambda message: None  # noqa: E731
    distributed.barrier()
    set_threads(config.threads)
    device = get_device(config.device)
    store = None
    if config.teacher_store is not None:
        store = default_store() if config.teacher_store == "auto" else Path(config.teacher_store).expanduser()
    if config.data.text is not None:  # a language-model run: its own data, models and measurements
        from .text_experiment import run_text_stages

        return run_text_stages(config, run_dir, device, store, verbose=verbose, log=log, started=started)
    data = load_data(config)
    ctx = StageContext(config, run_dir, store, device, data, data_fingerprint(data), verbose, log)
    distributed.check_agreement("the data", {"data_fingerprint": ctx.data_fp})
    x_train, y_train = torch.from_numpy(data.x_train), torch.from_numpy(data.y_train)
    x_test, y_test = torch.from_numpy(data.x_test), torch.from_numpy(data.y_test)
    d = config.data
    x_lab, y_lab, x_unl = student_data(config, data)
    augment = build_augment(config)
    log(f"data: {data.name}" + (f" from {data.source}" if getattr(data, "source", None) else "")
        + f", {len(x_lab)} labelled training samples"
        + (f" + {len(x_unl)} unlabelled" if x_unl is not None else "") + f", {len(x_test)} test samples; device {device}")
    try:
        distributed.run_together("checking the experiment", lambda: preflight(config, data, device))
    except KDistillError:
        if main:  # nothing trained; the same command continues once the config is fixed
            write_run_json(run_dir, config, "failed before training", started)
        raise
    common = dict(validation_data=(x_test, y_test), verbose=verbose, seed=config.seed, augment=augment)
    aug_id = [s.dump() for s in d.augment]
    stages = config.stages

    def build(spec) -> nn.Module:
        seed_everything(config.seed)  # scratch and distilled students start from the same weights
        return build_model(spec, data)

    steps = steps_per_epoch

    # 2. the teacher: a checkpoint used as it is, or trained (fine-tuned from the
    #    checkpoint, if one is given) on the full training set
    stage_clock = StageClock()
    results: dict[str, dict] = {}
    ts = stages.teacher
    members: dict[str, nn.Module] = {}
    source = None
    if config.ensemble is not None:  # several teachers, each in its own stage; the distil stage learns from all
        with stage_clock("teacher"):
            members, teacher, t_fp = train_ensemble(ctx, results, x_train, y_train, common, aug_id)
    else:
        teacher = build(config.teacher)
    if config.ensemble is not None:
        pass
    elif config.teacher.checkpoint is not None:
        path = Path(config.teacher.checkpoint)
        source = load_weights(path, teacher)
        log(f"[teacher] loaded from {path} ({source['format']}, {source['tensors']} tensors"
            + (f", cast from {source['cast_from']}" if source.get("cast_from") else "") + ")")
    with stage_clock("teacher") if config.ensemble is None else contextlib.nullcontext():
        if config.ensemble is not None:
            pass
        elif ts.epochs == 0:
            t_fp = fingerprint("checkpoint", source["sha256"])
            results["teacher"] = {"fingerprint": t_fp, "seconds": 0.0, "history": None, "reused": str(path)}
        else:
            t_batch = ts.batch_size or d.batch_size
            t_fp = fingerprint("teacher", ctx.data_fp, config.teacher.dump(), stage_settings(ts), t_batch, aug_id,
                               config.seed, *([source["sha256"]] if source else []))

            def teacher_trainer() -> Trainer:
                sched, interval = build_schedule(ts.schedule, ts.epochs, steps(len(x_train), t_batch, ts.accumulate_steps))
                t = Trainer(teacher, device=device)
                return t.compile(build_optimizer(ts.optimizer, teacher.parameters()), metrics=["accuracy"],
                                 temperature=ts.temperature, scheduler=sched, scheduler_interval=interval,
                                 **step_settings(ts))

            results["teacher"] = run_stage(ctx, "teacher", t_fp, teacher, teacher_trainer,
                                           dict(x=x_train, y=y_train, epochs=ts.epochs, batch_size=t_batch, **common),
                                           share=True)

    # 3. the student from scratch, on the labelled data
    student_id = (ctx.data_fp, config.student.dump(), d.subset, aug_id, config.seed)
    ds = stages.distil
    d_batch = ds.batch_size or d.batch_size
    d_steps = steps(len(x_lab) + (0 if x_unl is None else len(x_unl)), d_batch, ds.accumulate_steps)
    scratch = None
    if stages.scratch.enabled:
        ss = stages.scratch
        s_batch = ss.batch_size or d.batch_size
        # with unlabelled data the distilled student takes more steps per epoch; give the
        # scratch student as many optimizer steps (cycling its labelled samples), so neither is short of optimisation
        s_steps = d_steps if (x_unl is not None and ss.match_steps) else None
        s_fp = fingerprint("scratch", student_id, stage_settings(ss), s_batch, s_steps)
        scratch = build(config.student)

        def scratch_trainer() -> Trainer:
            sched, interval = build_schedule(ss.schedule, ss.epochs, s_steps or steps(len(x_lab), s_batch, ss.accumulate_steps))
            t = Trainer(scratch, device=device)
            return t.compile(build_optimizer(ss.optimizer, scratch.parameters()), metrics=["accuracy"],
                             scheduler=sched, scheduler_interval=interval, **step_settings(ss))

        with stage_clock("scratch"):
            results["scratch"] = run_stage(ctx, "scratch", s_fp, scratch, scratch_trainer,
                                           dict(x=x_lab, y=y_lab, epochs=ss.epochs, batch_size=s_batch,
                                                steps_per_epoch=s_steps, **common), share=True)

    def distil_into(name: str, student: nn.Module, source: nn.Module, source_fp: str, stage, *,
                    model_id: tuple | None = None, settings: dict | None = None) -> dict:
        """Distil ``student`` from ``source`` (the teacher, the assistant, a born-again
        generation or their ensemble) with ``stage``'s settings (``model_id`` and
        ``settings``: what the fingerprint holds of the student and the stage, when not
        the default ones)."""
        batch = stage.batch_size or d.batch_size
        if model_id is None:
            model_id = student_id if name == "distil" else (ctx.data_fp, stage.model.dump(), d.subset, aug_id, config.seed)
        fp = fingerprint(name, model_id, stage_settings(stage) if settings is None else settings, batch,
                         d.unlabelled, source_fp)

        def trainer() -> Trainer:
            loss = build_losses(stage)
            sched, interval = build_schedule(stage.schedule, stage.epochs, steps(
                len(x_lab) + (0 if x_unl is None else len(x_unl)), batch, stage.accumulate_steps))
            # the stage's teacher: the network itself, or the cache of its outputs built before the Distiller
            cached = (open_teacher_cache(ctx, loss, source, source_fp, stage, name)
                      if stage.teacher_cache is not None else source)
            dist = Distiller(student=student, teacher=cached, device=device)
            params = list(student.parameters()) + [p for p in loss.parameters() if p.requires_grad]
            dist.compile(build_optimizer(stage.optimizer, params), metrics=["accuracy"], distillation_loss_fn=loss,
                         alpha=stage.alpha, scheduler=sched, scheduler_interval=interval,  # the losses own T
                         label_loss_weight=stage.label_loss_weight, **step_settings(stage))
            return dist

        with stage_clock(name):
            return run_stage(ctx, name, fp, student, trainer,
                             dict(x=x_lab, y=y_lab, unlabelled=x_unl, epochs=stage.epochs, batch_size=batch, **common),
                             share=False, settings=stage)

    # 4. optionally an assistant of intermediate size, distilled from the teacher (TAKD)
    source, source_fp = teacher, t_fp
    assistant = None
    if stages.assistant is not None:
        assistant = build(stages.assistant.model)
        results["assistant"] = distil_into("assistant", assistant, teacher, t_fp, stages.assistant)
        source, source_fp = assistant, results["assistant"]["fingerprint"]

    # 5. the same student as the scratch one, distilled from the teacher (or the assistant)
    distilled = build(config.student)
    results["distil"] = distil_into("distil", distilled, source, source_fp, ds)

    # 6. optionally born-again generations of the teacher's architecture, each from the last
    extra: dict[str, nn.Module] = {}
    if stages.born_again is not None:
        extra.update(run_born_again(config, stages.born_again, data, teacher, t_fp, distil_into,
                                    (ctx.data_fp, d.subset, aug_id, config.seed), results))

    # 7. optionally deep mutual learning of peers, on the scratch student's data
    if stages.mutual is not None:
        ms = stages.mutual
        specs = peer_specs(config, ms)
        m_batch = ms.batch_size or d.batch_size
        m_fp = fingerprint("mutual", ctx.data_fp, [s.dump() for s in specs], d.subset, aug_id, config.seed,
                           stage_settings(ms), m_batch)
        peers = []
        for k, spec in enumerate(specs):
            seed_everything(config.seed + k)  # peer 1 starts as the scratch student; each peer from its own weights
            peers.append(build_model(spec, data))
        stack = PeerStack(peers)

        def mutual_trainer() -> Trainer:
            sched, interval = build_schedule(ms.schedule, ms.epochs, steps(len(x_lab), m_batch, ms.accumulate_steps))
            dml = MutualLearning(peers, device=device)
            return dml.compile(lambda params: build_optimizer(ms.optimizer, params), metrics=["accuracy"],
                               alpha=ms.alpha, temperature=ms.temperature, target=ms.target, scheduler=sched,
                               scheduler_interval=interval, precision=ms.precision,
                               accumulate_steps=ms.accumulate_steps)

        with stage_clock("mutual"):
            results["mutual"] = run_stage(ctx, "mutual", m_fp, stack, mutual_trainer,
                                          dict(x=x_lab, y=y_lab, epochs=ms.epochs, batch_size=m_batch, **common),
                                          share=False)
        for k, peer in enumerate(peers, 1):  # measured one by one; the stage's history holds every peer's
            results[f"mutual_{k}"] = {**results["mutual"], "history": None}
            extra[f"mutual_{k}"] = peer

    # 8. measure, report, mark finished (rank 0; the others wait for its numbers)
    metrics = None
    if main:
        log("measuring accuracy, agreement, size and speed")
        if config.ensemble is not None:  # the ensemble measured as one network, beside each member
            teacher = ensemble_module(config, list(members.values()))
        models = {**{f"teacher-{tag}": m for tag, m in members.items()},
                  "teacher": teacher, **({"assistant": assistant} if assistant is not None else {}),
                  **({"scratch": scratch} if scratch is not None else {}), "distil": distilled, **extra}
        with stage_clock("measure"):
            metrics = measure(ctx, models, results, x_test, y_test, x_lab, x_unl)
            if config.ensemble is not None:
                metrics["ensemble"] = ensemble_metrics(ctx, config, models, x_test)
        finish_run(run_dir, config, metrics, stage_clock, started, log)
    return distributed.broadcast_object(metrics)


def run_born_again(config: ExperimentConfig, stage, data: DatasetSplits, teacher: nn.Module, t_fp: str,
                   distil_into: Callable[..., dict], run_id: tuple, results: dict[str, dict]) -> dict[str, nn.Module]:
    """``stages.born_again``: generation ``k`` (a new network of the teacher's architecture,
    initial weights under seed ``seed + k``) distilled from generation ``k - 1`` (the
    teacher is generation 0), each a stage ``born_again_<k>`` of its own; with ``ensemble``
    the last generation's teacher is the ensemble of all earlier ones
    (:class:`~kdistill.teacher.EnsembleTeacher`, mean of softened probabilities).

    A generation's fingerprint holds the stage's settings but ``generations`` and
    ``ensemble`` (the first generations of a longer chain are those of the shorter one)
    and its teacher's fingerprint (so a changed generation makes every later one another).

    Returns:
        ``{"born_again_<k>": network}``; ``results`` gets each generation's stage result.
    """
    from .teacher import EnsembleTeacher

    spec = config.teacher.model_copy(update={"checkpoint": None})
    settings = {k: v for k, v in stage_settings(stage).items() if k not in ("generations", "ensemble")}
    earlier: list[tuple[nn.Module, str]] = [(teacher, t_fp)]
    out: dict[str, nn.Module] = {}
    for k in range(1, stage.generations + 1):
        name = f"born_again_{k}"
        seed_everything(config.seed + k)
        student = build_model(spec, data)
        source, source_fp = earlier[-1]
        if stage.ensemble and k == stage.generations and len(earlier) >= 2:
            source = EnsembleTeacher([m for m, _ in earlier], combine="mean_probs",
                                     names=[f"gen{i}" for i in range(len(earlier))])
            source_fp = fingerprint("ensemble", "mean_probs", [fp for _, fp in earlier])
        results[name] = distil_into(name, student, source, source_fp, stage,
                                    model_id=(*run_id, spec.dump(), k), settings=settings)
        earlier.append((student, results[name]["fingerprint"]))
        out[name] = student
    return out


def peer_specs(config: ExperimentConfig, stage) -> list:
    """The model specs of ``stages.mutual``'s peers: ``peers`` copies of the student's, or
    the listed ones."""
    return [config.student] * stage.peers if isinstance(stage.peers, int) else list(stage.peers)


# --------------------------------------------------------------------------- reading runs


def load_ensemble_model(run_dir: Path, config: ExperimentConfig, stage: str,
                        data: DatasetSplits | None = None) -> nn.Module:
    """An ensemble run's ``teacher-<tag>`` member, or its ``teacher``: the members combined
    (:class:`~kdistill.teacher.EnsembleModule` at the distil stage's temperature); CPU, eval.

    Raises:
        ValueError: a member tag the run does not have (the tags listed).
        RunDirectoryError, CheckpointError: as :func:`load_stage_model`.
    """
    data = data if data is not None else load_data(config)
    by_tag = {m.tag: m for m in config.ensemble.teachers}
    if stage == "teacher":
        return ensemble_module(config, [load_ensemble_model(run_dir, config, f"teacher-{t}", data)
                                        for t in by_tag]).eval()
    tag = stage[len("teacher-"):]
    if tag not in by_tag:
        raise ValueError(f"stage {stage!r}: {run_dir} has the ensemble members {[f'teacher-{t}' for t in by_tag]}")
    member = by_tag[tag]
    model = build_model(member, data)
    if member.epochs == 0:  # used as it was given
        load_weights(member.checkpoint, model)
        return model.cpu().eval()
    ckpt = run_dir / "stages" / stage / "checkpoint.pt"
    done_path = ckpt.parent / "done.json"
    if not done_path.is_file():
        raise RunDirectoryError(f"stage '{stage}' of {run_dir} has not finished (no done.json); finish the run first "
                                f"(`kdistill run --resume {run_dir}`)")
    _verify_finished(ckpt, done_path, run_dir)
    load_checkpoint(ckpt, model)
    return model.cpu().eval()



def load_generation_or_peer(run_dir: Path, config: ExperimentConfig, stage: str, data: DatasetSplits | None) -> nn.Module:
    """:func:`load_stage_model` of born-again generation ``born_again_<k>`` (its own stage)
    or mutual-learning peer ``mutual_<k>`` (from the ``mutual`` stage, which holds every
    peer), ``k`` from 1."""
    kind, _, index = stage.rpartition("_")
    count = {"born_again": config.stages.born_again and config.stages.born_again.generations,
             "mutual": config.stages.mutual and len(peer_specs(config, config.stages.mutual))}[kind]
    if not count:
        raise RunDirectoryError(f"{run_dir} has no {kind} stage (its config sets no stages.{kind})")
    if not index.isdigit() or not 1 <= int(index) <= count:
        raise ValueError(f"stage {stage!r}: this run has {kind}_1 to {kind}_{count}")
    k = int(index)
    sdir = run_dir / "stages" / (stage if kind == "born_again" else "mutual")
    done_path = sdir / "done.json"
    if not done_path.is_file():
        raise RunDirectoryError(f"stage '{sdir.name}' of {run_dir} has not finished (no done.json); finish the run "
                                f"first (`kdistill run --resume {run_dir}`)")
    data = data if data is not None else load_data(config)
    if kind == "born_again":
        model = build_model(config.teacher.model_copy(update={"checkpoint": None}), data)
    else:
        model = PeerStack([build_model(spec, data) for spec in peer_specs(config, config.stages.mutual)])
    verify_stage_checkpoint(sdir / "checkpoint.pt", json.loads(done_path.read_text()), done_path, fix=(
        f"Train the stage again with `kdistill run --resume {run_dir}`, or restore an intact copy of the file."))
    load_checkpoint(sdir / "checkpoint.pt", model)
    if kind == "mutual":
        model = model.peers[k - 1]
    return model.cpu().eval()


def _verify_finished(ckpt: Path, done_path: Path, run_dir: Path) -> None:
    """Check a finished stage's checkpoint against the SHA-256 its ``done.json`` records."""
    try:
        done = json.loads(done_path.read_text())
    except ValueError as e:
        raise RunDirectoryError(f"{done_path} is not valid JSON ({e}); finish the stage again with "
                                f"`kdistill run --resume {run_dir}`") from e
    verify_stage_checkpoint(ckpt, done, done_path, fix=(
        f"Train the stage again with `kdistill run --resume {run_dir}` (it trains only the stages whose "
        "checkpoints are damaged), or restore an intact copy of the file."))


def load_stage_model(run_dir: str | Path, stage: str = "distil", data: DatasetSplits | None = None) -> nn.Module:
    """Rebuild a stage's model from a run directory and load its final weights (CPU, eval).

    The checkpoint is checked against the SHA-256 recorded in the stage's ``done.json``
    (run directories written before kdistill recorded it are loaded unchecked).

    Raises:
        RunDirectoryError: no such run or the stage did not finish.
        CheckpointError: the stage's checkpoint is missing, corrupt, or its bytes differ from
            those written (the message names the file and both hashes).
    """
    run_dir = Path(run_dir)
    config = read_run_config(run_dir)
    if config.ensemble is not None and (stage == "teacher" or stage.startswith("teacher-")):
        return load_ensemble_model(run_dir, config, stage, data)
    if stage.startswith(("born_again_", "mutual_")):
        return load_generation_or_peer(run_dir, config, stage, data)
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, born_again_<k> or mutual_<k>, got {stage!r}")
    ckpt = run_dir / "stages" / stage / "checkpoint.pt"
    given = config.teacher.checkpoint or config.teacher.kwargs.get("path")  # a teacher used as it was given
    if not (run_dir / "stages" / stage / "done.json").is_file() and not (stage == "teacher" and given):
        raise RunDirectoryError(f"stage '{stage}' of {run_dir} has not finished (no done.json); finish the run first "
                                f"(`kdistill run --resume {run_dir}`)")
    if stage == "assistant" and config.stages.assistant is None:
        raise RunDirectoryError(f"{run_dir} has no assistant stage (its config sets no stages.assistant)")
    if config.data.text is not None:  # a language-model run: its models are built for its tokenizer
        from .text_experiment import build_stage_lm

        model = build_stage_lm(run_dir, config, stage)
    else:
        data = data if data is not None else load_data(config)
        model = build_model({"teacher": config.teacher, "assistant": config.stages.assistant and
                             config.stages.assistant.model}.get(stage, config.student), data)
    if stage == "teacher" and given and not ckpt.is_file():
        if config.teacher.checkpoint:  # used as it was given (stages.teacher.epochs: 0)
            load_weights(config.teacher.checkpoint, model)
    else:
        done_path = ckpt.parent / "done.json"
        if done_path.is_file():
            _verify_finished(ckpt, done_path, run_dir)
        load_checkpoint(ckpt, model)
    return model.cpu().eval()
