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
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from . import __version__, distributed
from .atomic import atomic_copy, atomic_write_text
from .bench import benchmark_model
from .callbacks import Callback, JSONLogger, TrainingCheckpoint
from .checkpoint import (CheckpointError, file_sha256, load_checkpoint, load_weights,
                         read_training_state, save_checkpoint)
from .config import SCHEDULES, ExperimentConfig, config_dict, dump_config, load_config
from .data import load_dataset, split_labelled
from .data.augment import Compose
from .data.datasets import DatasetSplits
from .distiller import Distiller, Trainer, check_precision, loss_temperatures, tapped_layers
from .errors import ConfigError, KDistillError, RunDirectoryError
from .locks import LockHeld, describe_holder, exclusive_lock
from .losses.base import DistillationLoss, WeightedSum
from .runtime import get_device, machine_description, seed_everything, set_threads

STAGES = ("teacher", "scratch", "assistant", "distil")
#: How stages are named in reports.
LABELS = {"teacher": "teacher", "scratch": "scratch", "assistant": "assistant", "distil": "distilled"}


def fingerprint(*parts: Any) -> str:
    """A short hash of JSON-serialisable parts (keys sorted)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def data_fingerprint(data: DatasetSplits) -> str:
    """Hash of the arrays themselves: two runs share a stage only on the same data."""
    h = hashlib.sha256(data.name.encode())
    for arr in (data.x_train, data.y_train, data.x_test, data.y_test):
        a = np.ascontiguousarray(arr)
        h.update(str((a.shape, a.dtype.str)).encode())
        h.update(a.data)
    return h.hexdigest()[:16]


def config_fingerprint(config: ExperimentConfig) -> str:
    """What makes two runs the same experiment (not where they run or how often they save)."""
    d = config_dict(config)
    for key in ("output_dir", "device", "threads", "teacher_store", "checkpoint", "name"):
        d.pop(key, None)
    d["stages"] = {name: None if stage is None else stage_settings(getattr(config.stages, name))
                   for name, stage in d["stages"].items()}
    return fingerprint(d)


#: Training-step settings of a stage and their defaults (see :func:`stage_settings`).
STEP_DEFAULTS = {"precision": "fp32", "accumulate_steps": 1, "max_grad_norm": None}


def stage_settings(stage) -> dict[str, Any]:
    """A stage's settings as fingerprints hold them: :func:`config_dict`, less the
    training-step settings (``precision``, ``accumulate_steps``, ``max_grad_norm``) left
    at their defaults, so a stage trained without them keeps its fingerprint (and a
    stored teacher stays reusable); setting one makes it another stage."""
    d = config_dict(stage)
    for key, default in STEP_DEFAULTS.items():
        if d.get(key, default) == default:
            d.pop(key, None)
    return d


def step_settings(stage) -> dict[str, Any]:
    """``compile``'s training-step keywords from a stage's settings."""
    return {key: getattr(stage, key) for key in STEP_DEFAULTS}


def default_store() -> Path:
    base = os.environ.get("KDISTILL_CACHE")
    return (Path(base) if base else Path.home() / ".cache" / "kdistill") / "stages"


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


# --------------------------------------------------------------------------- the run
@dataclass
class _Context:
    config: ExperimentConfig
    run_dir: Path
    store: Path | None
    device: torch.device
    data: DatasetSplits
    data_fp: str
    verbose: int
    log: Callable[[str], None]


def read_json(path: Path) -> Any:
    """A bookkeeping file of a run directory (run.json, done.json, stage.json, metrics.json).

    Raises:
        RunDirectoryError: the file is unreadable or not valid JSON (naming it).
    """
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise RunDirectoryError(
            f"{path} is damaged and cannot be read ({type(e).__name__}: {str(e)[:200]}): it was cut short or "
            "edited. kdistill writes it atomically, so a kill does not do this; restore it, or delete it "
            "(that stage, or the whole run with --force, is then trained again)") from e


def _copy_stage(src: Path, dst: Path) -> None:
    """Copy a finished stage's files, ``done.json`` last (it marks the copy complete)."""
    dst.mkdir(parents=True, exist_ok=True)
    for name in ("checkpoint.pt", "history.jsonl", "stage.json", "done.json"):
        if (src / name).is_file():
            atomic_copy(src / name, dst / name)  # a unique temp file: runs may publish at once


def verify_stage_checkpoint(ckpt: Path, done: dict, done_path: Path | None = None, *,
                            fix: str = "Train the stage again or restore an intact copy.") -> None:
    """Check a stage's ``checkpoint.pt`` against the SHA-256 its ``done.json`` recorded.

    A ``done.json`` written before kdistill recorded the hash has none: nothing to check
    (the checkpoint's own content digest, if any, is still checked when it is read).

    Raises:
        CheckpointError: the file is missing or its bytes differ from those written.
    """
    expected = done.get("checkpoint_sha256")
    if expected is None:
        return
    if not ckpt.is_file():
        raise CheckpointError(f"no checkpoint at {ckpt}: the file does not exist, though "
                              f"{done_path or 'its done.json'} marks the stage finished")
    found = file_sha256(ckpt)
    if found != expected:
        size, written = ckpt.stat().st_size, done.get("checkpoint_bytes")
        sizes = f"{size} bytes" + (f", {written} when written" if written is not None and written != size else "")
        raise CheckpointError(
            f"checkpoint {ckpt} ({sizes}) is truncated or corrupt: it does not match the SHA-256 recorded in "
            f"{done_path or 'done.json'} when it was written: expected {expected}, found {found}. Its bytes changed "
            f"on disk since (a failing disk, a damaged copy, an edit), so its weights cannot be trusted. {fix}"
        )


def _load_finished_stage(sdir: Path, model: nn.Module) -> dict:
    """Load a finished stage's verified weights into ``model``; returns its ``done.json``.

    Raises:
        CheckpointError: checksum mismatch, missing, truncated or corrupt checkpoint.
        OSError, ValueError: unreadable ``done.json``.
    """
    done_path = sdir / "done.json"
    done = json.loads(done_path.read_text())
    verify_stage_checkpoint(sdir / "checkpoint.pt", done, done_path)
    load_checkpoint(sdir / "checkpoint.pt", model)
    return done


def _run_stage(ctx: _Context, name: str, fp: str, model: nn.Module, make_trainer: Callable[[], Trainer],
               fit: Callable[[Trainer, list, Any], Any], *, share: bool) -> dict:
    """Train one stage into ``stages/<name>``, or reuse/resume it.

    Order of preference: this run's finished stage with the same fingerprint; the same
    stage finished by another run (stage store); this run's interrupted stage (resumed from
    ``last.pt``); training from the start.

    In a multi-process run rank 0 decides (and does the file work) and every process
    follows: all load a reused stage's weights, all resume from the same state, all train
    (rank 0 alone writes).
    """
    sdir = ctx.run_dir / "stages" / name
    if not distributed.is_distributed():
        plan = _plan_stage(ctx, name, fp, model, share=share)
    else:
        plan = distributed.run_together(
            f"[{name}] preparing the stage",
            lambda: _plan_stage(ctx, name, fp, model, share=share) if distributed.is_main() else None)
        light = distributed.broadcast_object(None if plan is None else {**plan, "resume_from": None})
        if not distributed.is_main():
            plan = light
            if plan["action"] == "reuse":
                verify_stage_checkpoint(sdir / "checkpoint.pt", plan["result"], sdir / "done.json")
                load_checkpoint(sdir / "checkpoint.pt", model)
            elif plan["resume"]:
                plan["resume_from"] = read_training_state(sdir / "last.pt")
    if plan["action"] == "reuse":
        return plan["result"]
    # 4. train
    if plan["resume_from"] is None:
        ctx.log(f"[{name}] training")
    trainer = make_trainer()
    cfg = ctx.config
    callbacks: list[Callback] = [
        TrainingCheckpoint(sdir / "last.pt", every_steps=cfg.checkpoint.every_steps,
                           every_seconds=cfg.checkpoint.every_seconds),
        JSONLogger(sdir / "history.jsonl"),
        *[spec.resolve()(**spec.kwargs) for spec in cfg.callbacks],
    ]
    history = fit(trainer, callbacks, plan["resume_from"])
    done = {"fingerprint": fp, "stage": name, "seconds": trainer.elapsed_seconds, "history": history.to_dict(),
            "run_dir": str(ctx.run_dir), "kdistill_version": __version__}
    if distributed.is_main():
        save_checkpoint(sdir / "checkpoint.pt", model, epoch=len(history.epoch) - 1)
        # checked at every later load of the stage
        done["checkpoint_sha256"] = file_sha256(sdir / "checkpoint.pt")
        done["checkpoint_bytes"] = (sdir / "checkpoint.pt").stat().st_size
        atomic_write_text(sdir / "done.json", json.dumps(done))
        # 5. publish for other runs (best effort: a read-only cache must not fail the run);
        #    a stored copy found corrupt is replaced
        if share and ctx.store is not None:
            try:
                stored = ctx.store / f"{name}-{fp}"
                if not (stored / "done.json").is_file() or plan.get("store_unusable"):
                    _copy_stage(sdir, stored)
            except OSError as e:
                ctx.log(f"[{name}] could not publish to the stage store {ctx.store}: {e}")
    distributed.barrier()
    return {**done, "reused": False}


def _plan_stage(ctx: _Context, name: str, fp: str, model: nn.Module, *, share: bool) -> dict:
    """Steps 1-3 of :func:`_run_stage`: ``{"action": "reuse", "result"}`` (the weights are
    in ``model``) or ``{"action": "train", "resume", "resume_from"}``."""
    sdir = ctx.run_dir / "stages" / name
    done_path = sdir / "done.json"
    # 1. finished here already
    if done_path.is_file():
        try:
            done = read_json(done_path)
        except RunDirectoryError as e:
            ctx.log(f"[{name}] cannot reuse the finished stage ({e}); training again")
            done = {}
        if done.get("fingerprint") == fp:
            try:
                _load_finished_stage(sdir, model)
                ctx.log(f"[{name}] finished earlier in this run directory: reusing it")
                return {"action": "reuse", "result": {**done, "reused": done.get("reused") or "this run"}}
            except CheckpointError as e:
                ctx.log(f"[{name}] cannot reuse the finished stage ({e}); training again")
        done_path.unlink()
    # 2. finished by another run (same stage config, data and seed)
    store_unusable = False
    if share and ctx.store is not None:
        stored = ctx.store / f"{name}-{fp}"
        if (stored / "done.json").is_file():
            try:
                _load_finished_stage(stored, model)
                _copy_stage(stored, sdir)
                done = json.loads((sdir / "done.json").read_text())
                verify_stage_checkpoint(sdir / "checkpoint.pt", done, sdir / "done.json")  # the copy, too
                origin = done.get("run_dir", "another run")
                ctx.log(f"[{name}] reusing the {name} trained by {origin} (same stage config, data and seed; "
                        f"fingerprint {fp}): no training")
                return {"action": "reuse", "result": {**done, "reused": str(origin)}}
            except (CheckpointError, OSError, json.JSONDecodeError) as e:
                ctx.log(f"[{name}] the stored stage {stored} is unusable ({e}); training")
                store_unusable = True
                for leftover in ("done.json", "checkpoint.pt"):  # a bad copy of it must not be reused here
                    (sdir / leftover).unlink(missing_ok=True)
    # 3. interrupted here: resume from the last training state
    sdir.mkdir(parents=True, exist_ok=True)
    last = sdir / "last.pt"
    stage_json = sdir / "stage.json"
    resume_from = None
    if last.is_file():
        try:
            same = stage_json.is_file() and read_json(stage_json).get("fingerprint") == fp
        except RunDirectoryError as e:
            ctx.log(f"[{name}] cannot tell what {last.name} belongs to ({e}); training from the start")
            same = False
        if same:
            try:
                state = read_training_state(last)
                resume_from = state
                ctx.log(f"[{name}] resuming from epoch {state['epoch'] + 1}, step {state['step_in_epoch']} "
                        f"(global step {state['global_step']})")
            except CheckpointError as e:
                ctx.log(f"[{name}] cannot resume ({e}); training from the start")
        if resume_from is None:
            last.unlink()
    atomic_write_text(stage_json, json.dumps({"fingerprint": fp, "stage": name}))
    return {"action": "train", "resume": resume_from is not None, "resume_from": resume_from,
            "store_unusable": store_unusable}


def _prepare_run_dir(config: ExperimentConfig, run_dir: Path, *, force: bool, log: Callable[[str], None]) -> str:
    """Decide what to do with ``run_dir``; returns ``"new"``, ``"continue"`` or ``"finished"``.

    Raises:
        RunDirectoryError: the directory holds another run (without ``force``), or is a
            non-empty folder that is not a run directory.
    """
    cfp = config_fingerprint(config)
    run_json = run_dir / "run.json"
    if run_json.is_file():
        try:
            info = read_json(run_json)
        except RunDirectoryError as e:
            if not force:
                raise RunDirectoryError(f"{e}. Or replace the whole run directory with --force.") from None
            info = {}
        same = info.get("config_fingerprint") == cfp
        if info.get("status") == "failed before training" and not same and not force:
            force = True  # nothing of it trained: the corrected config simply starts here
            log(f"{run_dir} holds a run that stopped before training (its config was refused); starting over")
        if force:
            log(f"--force: discarding the earlier run in {run_dir}")
            for item in ("stages", "figures"):
                shutil.rmtree(run_dir / item, ignore_errors=True)
            for item in ("metrics.json", "report.md", "report.html", "run.json", "config.yaml", "export.json",
                         *(p.name for p in run_dir.glob("student*.*"))):
                (run_dir / item).unlink(missing_ok=True)
            return "new"
        if same and info.get("status") == "finished":
            damaged = _damaged_stages(run_dir)
            if not damaged:
                return "finished"
            log(f"{run_dir} holds this finished run, but the checkpoint of stage(s) {', '.join(damaged)} changed "
                "on disk after it was written (its SHA-256 differs from the one in done.json): continuing the run "
                "to train them again")
            return "continue"
        if same:
            log(f"{run_dir} holds an unfinished run of this config: continuing it")
            return "continue"
        state = "a finished" if info.get("status") == "finished" else "an unfinished"
        raise RunDirectoryError(
            f"{run_dir} already holds {state} run of a different config; nothing was overwritten. "
            f"Use another output directory (--out or output_dir), continue that run with "
            f"`kdistill run --resume {run_dir}`, or replace it with --force."
        )
    _refuse_foreign_folder(run_dir)
    return "new"


def _damaged_stages(run_dir: Path) -> list[str]:
    """The finished stages whose ``checkpoint.pt`` no longer matches the SHA-256 in their
    ``done.json`` (or is gone)."""
    damaged = []
    for done_path in sorted((run_dir / "stages").glob("*/done.json")):
        try:
            verify_stage_checkpoint(done_path.parent / "checkpoint.pt", json.loads(done_path.read_text()), done_path)
        except (CheckpointError, ValueError, OSError):
            damaged.append(done_path.parent.name)
    return damaged


#: The run directory's lock file (see :func:`_lock_run_dir`).
LOCK_FILE = ".lock"


def _refuse_foreign_folder(run_dir: Path) -> None:
    """Raise if ``run_dir`` is a non-empty folder that is not a run directory (its lock
    file alone does not count)."""
    if (run_dir / "run.json").is_file() or not run_dir.is_dir():
        return
    if any(p.name != LOCK_FILE for p in run_dir.iterdir()):
        raise RunDirectoryError(
            f"{run_dir} is not empty and is not a kdistill run directory (no run.json); "
            "choose an empty or new output directory"
        )


def _lock_run_dir(stack: contextlib.ExitStack, run_dir: Path, log: Callable[[str], None]) -> None:
    """Take the exclusive lock ``RUN_DIR/.lock`` for the rest of ``stack``.

    Raises:
        RunDirectoryError: another live process holds it (the message names it), or
            ``run_dir`` is a folder that is not a run directory (nothing is created in it).
    """
    _refuse_foreign_folder(run_dir)  # before the lock file is written into someone's folder

    def stale(holder: dict) -> None:
        log(f"{run_dir}: taking over the lock left by {describe_holder(holder)}, which ended without "
            "releasing it (killed or crashed)")

    try:
        stack.enter_context(exclusive_lock(run_dir / LOCK_FILE, on_stale=stale))
    except LockHeld as e:
        raise RunDirectoryError(
            f"{run_dir} is in use by another kdistill run: {describe_holder(e.holder)} holds its lock "
            f"{e.path}. Two runs writing one directory would mix their checkpoints and results, so this one "
            "stopped without writing anything. Wait for that run to end (or stop it), then run again, "
            "or give this run another output directory (--out or output_dir)."
        ) from None


#: Name patterns of the temporary files of atomic writes (``.NAME.XXXX.tmp``) and of stage
#: copies (``.NAME.XXXX.copy``), left behind when a process is killed mid-write.
_TEMP_PATTERNS = (".*.tmp", ".*.copy")


def remove_stale_temp_files(run_dir: Path, log: Callable[[str], None]) -> list[Path]:
    """Delete the leftover temporary files of interrupted writes in a run directory (its
    top level, ``stages/`` and ``figures/``; teacher caches keep their own resumable
    temporaries). Call it only with the run directory's lock held: then no other writer of
    these files is alive, so every one of them is stale. Returns the removed paths."""
    places = [run_dir, run_dir / "figures", *sorted(p for p in (run_dir / "stages").glob("*") if p.is_dir())]
    removed, size = [], 0
    for place in places:
        for pattern in _TEMP_PATTERNS:
            for f in sorted(place.glob(pattern)):
                if not f.is_file() or f.is_symlink():
                    continue
                try:
                    n = f.stat().st_size
                    f.unlink()
                except FileNotFoundError:
                    continue
                removed.append(f)
                size += n
    if removed:
        shown = ", ".join(str(f.relative_to(run_dir)) for f in removed[:3]) + (", ..." if len(removed) > 3 else "")
        log(f"removed {len(removed)} leftover temporary file(s) ({size / 2**20:.1f} MiB) of writes interrupted "
            f"earlier: {shown}")
    return removed


def _tee(log: Callable[[str], None], path: Path) -> Callable[[str], None]:
    """``log`` that also appends each message, time-stamped, to ``path`` (the run's log)."""

    def both(message: str) -> None:
        log(message)
        with open(path, "a", encoding="utf-8") as f:
            f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}\n")

    return both


def _write_run_json(run_dir: Path, config: ExperimentConfig, status: str, started: float) -> None:
    atomic_write_text(run_dir / "run.json", json.dumps({
        "status": status, "config_fingerprint": config_fingerprint(config), "name": config.name,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "updated_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "kdistill_version": __version__,
    }, indent=1))


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


def open_teacher_cache(ctx: _Context, loss: DistillationLoss, teacher: nn.Module, t_fp: str, stage_cfg,
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
                         alpha=stage.alpha, student_loss_weight=stage.student_loss_weight)
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
    main = distributed.is_main()
    run_dir = Path(run_dir) if run_dir is not None else config.run_dir()
    early: list[str] = []  # messages from before run.log is open; they go into it once it is

    def log_early(message: str) -> None:
        log(message)
        early.append(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}\n")

    with contextlib.ExitStack() as lock:
        distributed.run_together("locking the run directory",
                                 lambda: _lock_run_dir(lock, run_dir, log_early) if main else None)
        return _run_locked(config, run_dir, force=force, verbose=verbose, log=log, log_early=log_early, early=early)


def _run_locked(config: ExperimentConfig, run_dir: Path, *, force: bool, verbose: int,
                log: Callable[[str], None], log_early: Callable[[str], None], early: list[str]) -> dict:
    """:func:`run_experiment` once the run directory is locked."""
    # 1. set up: run directory, threads, device, data (rank 0 alone writes, in a multi-process run)
    main = distributed.is_main()
    log, plain_log = log_early, log  # until run.log is open, messages are also kept for it
    state = distributed.run_together(
        "preparing the run directory", lambda: _prepare_run_dir(config, run_dir, force=force, log=log) if main else None)
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
        log = _tee(plain_log, run_dir / "run.log")
        if state == "continue":
            remove_stale_temp_files(run_dir, log)  # we hold the lock: no other writer is alive
        atomic_write_text(run_dir / "config.yaml", dump_config(config))
        _write_run_json(run_dir, config, "running", started)
        if distributed.is_distributed():
            log(f"{distributed.world_size()} processes ({distributed.default_backend()}); batch sizes are global")
    else:
        log = lambda message: None  # noqa: E731
    distributed.barrier()
    set_threads(config.threads)
    device = get_device(config.device)
    data = load_data(config)
    store = None
    if config.teacher_store is not None:
        store = default_store() if config.teacher_store == "auto" else Path(config.teacher_store).expanduser()
    ctx = _Context(config, run_dir, store, device, data, data_fingerprint(data), verbose, log)
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
            _write_run_json(run_dir, config, "failed before training", started)
        raise
    common = dict(validation_data=(x_test, y_test), verbose=verbose, seed=config.seed, augment=augment)
    aug_id = [s.dump() for s in d.augment]
    stages = config.stages

    def build(spec) -> nn.Module:
        seed_everything(config.seed)  # scratch and distilled students start from the same weights
        return build_model(spec, data)

    def steps(n_samples: int, batch: int, accumulate: int = 1) -> int:
        """Optimizer steps per epoch: one per ``accumulate`` batches (the last on the rest)."""
        return -(-(-(-n_samples // batch)) // accumulate)

    # 2. the teacher: a checkpoint used as it is, or trained (fine-tuned from the
    #    checkpoint, if one is given) on the full training set
    stage_clock = _StageClock()
    teacher = build(config.teacher)
    results: dict[str, dict] = {}
    ts = stages.teacher
    source = None
    if config.teacher.checkpoint is not None:
        path = Path(config.teacher.checkpoint)
        source = load_weights(path, teacher)
        log(f"[teacher] loaded from {path} ({source['format']}, {source['tensors']} tensors"
            + (f", cast from {source['cast_from']}" if source.get("cast_from") else "") + ")")
    with stage_clock("teacher"):
        if ts.epochs == 0:
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

            results["teacher"] = _run_stage(
                ctx, "teacher", t_fp, teacher, teacher_trainer,
                lambda tr, cbs, resume: tr.fit(x_train, y_train, epochs=ts.epochs, batch_size=t_batch, callbacks=cbs,
                                               resume_from=resume, **common), share=True)

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
            results["scratch"] = _run_stage(
                ctx, "scratch", s_fp, scratch, scratch_trainer,
                lambda tr, cbs, resume: tr.fit(x_lab, y_lab, epochs=ss.epochs, batch_size=s_batch,
                                               steps_per_epoch=s_steps, callbacks=cbs, resume_from=resume, **common),
                share=True)

    def distil_into(name: str, student: nn.Module, source: nn.Module, source_fp: str, stage) -> dict:
        """Distil ``student`` from ``source`` (the teacher, or the assistant) with ``stage``'s settings."""
        batch = stage.batch_size or d.batch_size
        model_id = student_id if name == "distil" else (ctx.data_fp, stage.model.dump(), d.subset, aug_id, config.seed)
        fp = fingerprint(name, model_id, stage_settings(stage), batch, d.unlabelled, source_fp)

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
                         student_loss_weight=stage.student_loss_weight, **step_settings(stage))
            return dist

        with stage_clock(name):
            return _run_stage(
                ctx, name, fp, student, trainer,
                lambda tr, cbs, resume: tr.fit(x_lab, y_lab, unlabelled=x_unl, epochs=stage.epochs, batch_size=batch,
                                               callbacks=cbs, resume_from=resume, **common), share=False)

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

    # 6. measure, report, mark finished (rank 0; the others wait for its numbers)
    metrics = None
    if main:
        log("measuring accuracy, agreement, size and speed")
        models = {"teacher": teacher, **({"assistant": assistant} if assistant is not None else {}),
                  **({"scratch": scratch} if scratch is not None else {}), "distil": distilled}
        with stage_clock("measure"):
            metrics = _measure(ctx, models, results, x_test, y_test, x_lab, x_unl)
        metrics["timing"] = {"wall_seconds": time.time() - started, "stages": stage_clock.seconds}
        metrics["warnings"] = training_warnings(metrics)
        for warning in metrics["warnings"]:
            log(f"warning: {warning}")
        atomic_write_text(run_dir / "metrics.json", json.dumps(metrics, indent=1))
        write_run_report(run_dir, metrics)
        _write_run_json(run_dir, config, "finished", started)
    return distributed.broadcast_object(metrics)


class _StageClock:
    """Wall-clock seconds this invocation spent on each stage (cache builds included)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - started


from .report.numbers import headline_numbers  # noqa: E402


def training_warnings(metrics: dict) -> list[str]:
    """What in a finished run looks like failed training, one sentence each: a model at
    chance accuracy, or a stage whose training loss ended far above its first epoch's
    (a diverged optimisation, e.g. a learning rate orders of magnitude too high).
    The run still finishes; the log and the report say it."""
    out = []
    n = (metrics.get("dataset") or {}).get("num_classes") or 0
    for name, m in (metrics.get("models") or {}).items():
        acc = m.get("test_accuracy")
        if n > 1 and acc is not None and acc <= 1.5 / n:
            out.append(f"{LABELS.get(name, name)} is at chance accuracy ({100 * acc:.2f}% with {n} classes): its "
                       f"training failed; check stages.{name}.optimizer (a learning rate far too high diverges) "
                       "and the data")
    for name, record in (metrics.get("histories") or {}).items():
        loss = [v for v in ((record or {}).get("history") or {}).get("loss") or [] if v is not None]
        if len(loss) >= 2 and loss[-1] > 10 * max(loss[0], 1e-8):
            out.append(f"the {LABELS.get(name, name)} stage's training loss ended at {loss[-1]:.4g}, more than 10x its "
                       f"first epoch's ({loss[0]:.4g}): the optimisation diverged; lower stages.{name}.optimizer.lr")
    return out


def _predict(model: nn.Module, x: torch.Tensor, device: torch.device, batch_size: int) -> torch.Tensor:
    return Trainer(model, device=device).predict(x, batch_size=batch_size).argmax(-1)


def _measure(ctx: _Context, models: dict[str, nn.Module], results: dict[str, dict], x_test, y_test, x_lab, x_unl) -> dict:
    cfg, data = ctx.config, ctx.data
    preds = {name: _predict(m, x_test, ctx.device, cfg.data.eval_batch_size) for name, m in models.items()}
    out: dict[str, dict] = {}
    for name, model in models.items():
        # latency and throughput are the CPU's, whatever trained the model, in the ordinary
        # memory format (a live teacher may have run channels-last)
        model.to("cpu", memory_format=torch.contiguous_format)
        out[name] = {
            "test_accuracy": float((preds[name] == y_test).float().mean()),
            **benchmark_model(model, data.input_shape, latency_batch=cfg.report.latency_batch,
                              throughput_batch=cfg.report.throughput_batch, repeats=cfg.report.repeats),
            "train_seconds": results[name]["seconds"],
            "reused": results[name]["reused"],
        }
    gain, recovered = headline_numbers(out)
    n = data.num_classes
    confusion = torch.bincount(y_test * n + preds["distil"], minlength=n * n).reshape(n, n)
    return {
        "kdistill_version": __version__,
        "name": cfg.name,
        "config": config_dict(cfg),
        "dataset": {"name": data.name, "train": len(data.x_train), "labelled": len(x_lab),
                    "unlabelled": 0 if x_unl is None else len(x_unl), "test": len(x_test),
                    "num_classes": n, "class_names": list(data.classes) or None, "input_shape": list(data.input_shape)},
        "stages": list(models),
        "models": out,
        "distillation_gain_points": gain,
        "accuracy_recovered": recovered,
        "agreement": {k: float((preds[k] == preds["teacher"]).float().mean()) for k in models if k != "teacher"},
        "confusion_matrix": confusion.tolist(),
        "histories": {k: r["history"] for k, r in results.items() if r.get("history")},
        "fingerprints": {k: r["fingerprint"] for k, r in results.items()},
        "machine": machine_description(),
    }


def write_run_report(run_dir: Path, metrics: dict) -> dict[str, Path]:
    """``report.md`` and ``report.html`` (with figures) of a run from its metrics."""
    from .report.html import write_report

    return write_report(run_dir, metrics)


def refresh_metrics(run_dir: Path, metrics: dict) -> dict:
    """Recompute the derived numbers of ``metrics.json`` (written by an older kdistill)
    from the measured accuracies; rewrites the file when they changed."""
    gain, recovered = headline_numbers(metrics.get("models", {}))
    if (metrics.get("distillation_gain_points"), metrics.get("accuracy_recovered")) != (gain, recovered):
        metrics = {**metrics, "distillation_gain_points": gain, "accuracy_recovered": recovered}
        atomic_write_text(run_dir / "metrics.json", json.dumps(metrics, indent=1))
    return metrics


# --------------------------------------------------------------------------- reading runs
def read_run_config(run_dir: str | Path) -> ExperimentConfig:
    """The resolved config a run directory was made with.

    Raises:
        RunDirectoryError: the folder is not a kdistill run directory.
    """
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise RunDirectoryError(
            f"{run_dir} is not a kdistill run directory (no config.yaml); give the folder "
            "`kdistill run` wrote (its output_dir or --out)")
    return load_config(run_dir / "config.yaml")


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
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    ckpt = run_dir / "stages" / stage / "checkpoint.pt"
    if not (run_dir / "stages" / stage / "done.json").is_file() and not (stage == "teacher" and config.teacher.checkpoint):
        raise RunDirectoryError(f"stage '{stage}' of {run_dir} has not finished (no done.json); finish the run first "
                                f"(`kdistill run --resume {run_dir}`)")
    if stage == "assistant" and config.stages.assistant is None:
        raise RunDirectoryError(f"{run_dir} has no assistant stage (its config sets no stages.assistant)")
    data = data if data is not None else load_data(config)
    spec = {"teacher": config.teacher, "assistant": config.stages.assistant and config.stages.assistant.model
            }.get(stage, config.student)
    model = build_model(spec, data)
    if stage == "teacher" and config.teacher.checkpoint and not ckpt.is_file():
        load_weights(config.teacher.checkpoint, model)  # used as it was given (stages.teacher.epochs: 0)
    else:
        done_path = ckpt.parent / "done.json"
        if done_path.is_file():
            try:
                done = json.loads(done_path.read_text())
            except ValueError as e:
                raise RunDirectoryError(f"{done_path} is not valid JSON ({e}); finish the stage again with "
                                        f"`kdistill run --resume {run_dir}`") from e
            verify_stage_checkpoint(ckpt, done, done_path, fix=(
                f"Train the stage again with `kdistill run --resume {run_dir}` (it trains only the stages whose "
                "checkpoints are damaged), or restore an intact copy of the file."))
        load_checkpoint(ckpt, model)
    return model.cpu().eval()
