"""Running one stage: reuse it (finished here, or by another run through the stage store),
resume it from its last training state, or train it; then publish it to the store.

Finished teacher and scratch stages are published to a *stage store* (``teacher_store``,
default ``~/.cache/kdistill/stages``): any later run whose stage has the same fingerprint
(same config of that stage, same data, same seed) copies it instead of training again.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .. import __version__, distributed
from ..atomic import atomic_copy, atomic_write_text
from ..callbacks import EMA, Callback, JSONLogger, TrainingCheckpoint
from ..checkpoint import CheckpointError, file_sha256, load_checkpoint, read_training_state, save_checkpoint
from ..config import ExperimentConfig
from ..data.datasets import DatasetSplits
from ..distiller import Trainer
from ..errors import RunDirectoryError
from .directory import read_json, verify_stage_checkpoint


@dataclass


class StageContext:
    config: ExperimentConfig
    run_dir: Path
    store: Path | None
    device: torch.device
    data: DatasetSplits
    data_fp: str
    verbose: int
    log: Callable[[str], None]


def default_store() -> Path:
    base = os.environ.get("KDISTILL_CACHE")
    return (Path(base) if base else Path.home() / ".cache" / "kdistill") / "stages"


def copy_stage(src: Path, dst: Path) -> None:
    """Copy a finished stage's files, ``done.json`` last (it marks the copy complete)."""
    dst.mkdir(parents=True, exist_ok=True)
    for name in ("checkpoint.pt", "history.jsonl", "stage.json", "done.json"):
        if (src / name).is_file():
            atomic_copy(src / name, dst / name)  # a unique temp file: runs may publish at once


def load_finished_stage(sdir: Path, model: nn.Module) -> dict:
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


def stage_kwargs(kwargs: dict[str, Any], *, stage: str, run_dir: Path) -> dict[str, Any]:
    """A YAML callback's keyword arguments for one stage: ``{stage}`` and ``{run_dir}`` in
    a string value become the stage's name and the run directory (``log_dir:
    "{run_dir}/tb/{stage}"`` gives each stage its own folder). Other braces are left as
    they are.

    Args:
        kwargs: the callback's keyword arguments from the config.
        stage: ``teacher``, ``scratch``, ``assistant`` or ``distil``.
        run_dir: the run directory.
    """
    def fill(value: Any) -> Any:
        if isinstance(value, str):
            return value.replace("{stage}", stage).replace("{run_dir}", str(run_dir))
        return value

    return {k: fill(v) for k, v in kwargs.items()}


def run_stage(ctx: StageContext, name: str, fp: str, model: nn.Module, make_trainer: Callable[[], Trainer],
              fit_args: dict[str, Any], *, share: bool, settings: Any = None) -> dict:
    """Train one stage into ``stages/<name>``, or reuse/resume it: the one function every
    stage (teacher, scratch, assistant, distilled) runs through.

    Args:
        ctx: the run's context.
        name: the stage (its folder under ``stages/``).
        fp: the stage's fingerprint (:mod:`.fingerprints`).
        model: the network the stage trains (its weights are loaded when reused).
        make_trainer: builds the compiled Trainer or Distiller (called only to train).
        fit_args: ``fit``'s arguments (``x``, ``y``, ``epochs``, ...); the stage adds its
            callbacks and the training state to resume from.
        share: publish to / reuse from the stage store (teacher and scratch).
        settings: the stage's config (default ``stages.<name>``; an ensemble member's
            stage ``teacher-<tag>`` passes ``stages.teacher`` with its own epochs).

    Order of preference: this run's finished stage with the same fingerprint; the same
    stage finished by another run (stage store); this run's interrupted stage (resumed from
    ``last.pt``); training from the start.

    In a multi-process run rank 0 decides (and does the file work) and every process
    follows: all load a reused stage's weights, all resume from the same state, all train
    (rank 0 alone writes).
    """
    sdir = ctx.run_dir / "stages" / name
    if not distributed.is_distributed():
        plan = plan_stage(ctx, name, fp, model, share=share)
    else:
        plan = distributed.run_together(
            f"[{name}] preparing the stage",
            lambda: plan_stage(ctx, name, fp, model, share=share) if distributed.is_main() else None)
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
    stage_cfg = getattr(cfg.stages, name) if settings is None else settings
    callbacks: list[Callback] = [
        # the weight average first: a checkpoint saved after a step holds that step's average
        *([EMA(stage_cfg.ema_decay)] if stage_cfg.ema_decay is not None else []),
        TrainingCheckpoint(sdir / "last.pt", every_steps=cfg.checkpoint.every_steps,
                           every_seconds=cfg.checkpoint.every_seconds),
        JSONLogger(sdir / "history.jsonl"),
        *[spec.resolve()(**stage_kwargs(spec.kwargs, stage=name, run_dir=ctx.run_dir)) for spec in cfg.callbacks],
    ]
    history = trainer.fit(**fit_args, callbacks=callbacks, resume_from=plan["resume_from"])
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
                    copy_stage(sdir, stored)
            except OSError as e:
                ctx.log(f"[{name}] could not publish to the stage store {ctx.store}: {e}")
    distributed.barrier()
    return {**done, "reused": False}


def plan_stage(ctx: StageContext, name: str, fp: str, model: nn.Module, *, share: bool) -> dict:
    """Steps 1-3 of :func:`run_stage`: ``{"action": "reuse", "result"}`` (the weights are
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
                load_finished_stage(sdir, model)
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
                load_finished_stage(stored, model)
                copy_stage(stored, sdir)
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
