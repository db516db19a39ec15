"""Callbacks: progress, per-epoch logs, checkpoints, early stopping, history.

A callback sees the trainer (``self.trainer``) and the logs: per batch, the running
means of the epoch so far; per epoch, the epoch's means with ``val_``-prefixed
validation results. Hooks mirror Keras's.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import time
from pathlib import Path
from typing import Any

from .atomic import atomic_write_text
from .checkpoint import save_checkpoint


class Callback:
    """Base class: override the hooks you need."""

    trainer: Any = None
    #: In a multi-process run, only rank 0 runs this callback (set it on callbacks that
    #: write files or print; callbacks that decide, such as early stopping, run on every
    #: process and see the same, reduced, logs).
    main_process_only: bool = False

    def set_trainer(self, trainer: Any) -> None:
        self.trainer = trainer

    def on_train_begin(self, logs: dict | None = None) -> None: ...
    def on_train_end(self, logs: dict | None = None) -> None: ...
    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None: ...
    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None: ...
    def on_train_batch_end(self, step: int, logs: dict | None = None) -> None: ...


class History(Callback):
    """Per-epoch logs of a ``fit``: ``history.history["val_accuracy"][epoch]``.

    Every loss term and metric is a key; validation results carry a ``val_`` prefix.
    """

    def __init__(self) -> None:
        self.history: dict[str, list[float]] = {}
        self.epoch: list[int] = []

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        self.epoch.append(epoch)
        for k, v in (logs or {}).items():
            self.history.setdefault(k, []).append(v)

    def to_dict(self) -> dict:
        return {"epoch": list(self.epoch), "history": {k: list(v) for k, v in self.history.items()}}

    @classmethod
    def from_dict(cls, data: dict) -> "History":
        h = cls()
        h.epoch = list(data.get("epoch", []))
        h.history = {k: list(v) for k, v in data.get("history", {}).items()}
        return h

    def __repr__(self) -> str:
        return f"History(epochs={len(self.epoch)}, keys={sorted(self.history)})"


def _fmt(v: float) -> str:
    return f"{v:.4f}" if abs(v) < 1e4 else f"{v:.3g}"


class ProgressBar(Callback):
    """A tqdm bar per epoch with the running loss terms, metrics and samples per second.

    Args:
        verbose: 1 for a bar per epoch, 2 for one line per epoch.
    """

    main_process_only = True

    def __init__(self, verbose: int = 1):
        self.verbose = verbose
        self._bar = None
        self._epochs = 0

    def on_train_begin(self, logs: dict | None = None) -> None:
        self._epochs = getattr(self.trainer, "_epochs", 0)

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self._start = time.perf_counter()
        self._seen = 0
        if self.verbose == 1:
            from tqdm.auto import tqdm

            total = getattr(self.trainer, "_steps_per_epoch", None)
            self._bar = tqdm(
                total=total, desc=f"epoch {epoch + 1}/{self._epochs}", unit="batch",
                leave=True, dynamic_ncols=True, mininterval=0.2,
            )

    def on_train_batch_end(self, step: int, logs: dict | None = None) -> None:
        # a language model's speed is in trained-on tokens, a classifier's in samples
        tokens = getattr(self.trainer, "_last_batch_tokens", 0)
        self._unit = "tokens/s" if tokens else "samples/s"
        self._seen += tokens or getattr(self.trainer, "_last_batch_size", 0)
        if self._bar is not None:
            self._bar.update(1)
            if self._bar.n == 1 or step % 10 == 0:
                rate = self._seen / max(time.perf_counter() - self._start, 1e-9)
                post = {k: _fmt(v) for k, v in (logs or {}).items()}
                post[self._unit] = f"{rate:.0f}"
                self._bar.set_postfix(post, refresh=False)

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        rate = self._seen / max(time.perf_counter() - self._start, 1e-9)
        unit = getattr(self, "_unit", "samples/s")
        if self._bar is not None:
            post = {k: _fmt(v) for k, v in (logs or {}).items()}
            post[unit] = f"{rate:.0f}"
            self._bar.set_postfix(post, refresh=True)
            self._bar.close()
            self._bar = None
        elif self.verbose == 2:
            body = " - ".join(f"{k}: {_fmt(v)}" for k, v in (logs or {}).items())
            print(f"epoch {epoch + 1}/{self._epochs} - {body} - {rate:.0f} {unit}", flush=True)


def _history_rows(trainer: Any) -> list[dict]:
    """The epochs a trainer's history already holds (a resumed fit starts with them)."""
    history = getattr(trainer, "history", None)
    if history is None:
        return []
    return [{"epoch": e, **{k: v[i] for k, v in history.history.items() if i < len(v)}}
            for i, e in enumerate(history.epoch)]


class CSVLogger(Callback):
    """Appends one row per epoch to a CSV file (``epoch`` + every log key).

    The file is rewritten atomically each epoch, so it is never half-written; a resumed
    ``fit`` starts from the epochs its restored history holds, so no row is lost or doubled.
    """

    main_process_only = True

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.rows: list[dict] = []

    def on_train_begin(self, logs: dict | None = None) -> None:
        self.rows = _history_rows(self.trainer)

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        self.rows.append({"epoch": epoch, **(logs or {})})
        keys: list[str] = []
        for row in self.rows:
            keys += [k for k in row if k not in keys]
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=keys)
        writer.writeheader()
        writer.writerows(self.rows)
        atomic_write_text(self.path, buf.getvalue())


class JSONLogger(Callback):
    """Writes one JSON object per epoch to a JSON-lines file (rewritten atomically;
    a resumed ``fit`` keeps the epochs its restored history holds)."""

    main_process_only = True

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.lines: list[str] = []

    def on_train_begin(self, logs: dict | None = None) -> None:
        self.lines = [json.dumps(row) for row in _history_rows(self.trainer)]

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        self.lines.append(json.dumps({"epoch": epoch, **(logs or {})}))
        atomic_write_text(self.path, "\n".join(self.lines) + "\n")


def _better(mode: str, value: float, best: float, min_delta: float) -> bool:
    return value < best - min_delta if mode == "min" else value > best + min_delta


def _resolve_mode(monitor: str, mode: str) -> str:
    if mode not in ("auto", "min", "max"):
        raise ValueError(f"mode must be 'auto', 'min' or 'max', got {mode!r}")
    if mode == "auto":
        return "min" if "loss" in monitor else "max"
    return mode


def _monitored(monitor: str, logs: dict | None, who: str) -> float | None:
    logs = logs or {}
    if monitor not in logs:
        raise KeyError(
            f"{who} monitors {monitor!r}, but the epoch logs hold only {sorted(logs)}; "
            "pass validation_data to fit for 'val_' metrics, or monitor one of these"
        )
    return float(logs[monitor])


class ModelCheckpoint(Callback):
    """Saves the model after an epoch, atomically (temp file + rename).

    Args:
        path: destination file; ``{epoch}`` and log keys may be formatted into it.
        monitor: the log key that decides "best" (e.g. ``"val_accuracy"``).
        mode: ``"min"``, ``"max"``, or ``"auto"`` (min for losses, max otherwise).
        save_best_only: only write when ``monitor`` improved.
        save_optimizer: include the optimizer state (for resuming).
    """

    main_process_only = True

    def __init__(
        self,
        path: str | os.PathLike,
        monitor: str = "val_loss",
        mode: str = "auto",
        save_best_only: bool = True,
        save_optimizer: bool = True,
        min_delta: float = 0.0,
    ):
        self.path = str(path)
        self.monitor = monitor
        self.mode = _resolve_mode(monitor, mode)
        self.save_best_only = save_best_only
        self.save_optimizer = save_optimizer
        self.min_delta = min_delta
        self.best = math.inf if self.mode == "min" else -math.inf
        self.best_epoch: int | None = None
        self.last_path: Path | None = None

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        value = _monitored(self.monitor, logs, "ModelCheckpoint") if self.save_best_only else None
        if self.save_best_only and not _better(self.mode, value, self.best, self.min_delta):
            return
        if value is not None:
            self.best, self.best_epoch = value, epoch
        path = self.path.format(epoch=epoch + 1, **(logs or {}))
        t = self.trainer
        self.last_path = save_checkpoint(
            path,
            t.model,
            optimizer=t.optimizer if self.save_optimizer else None,
            epoch=epoch,
            metrics=logs,
        )


class EarlyStopping(Callback):
    """Stops training when ``monitor`` has not improved for ``patience`` epochs.

    Args:
        monitor, mode, min_delta: as for :class:`ModelCheckpoint`.
        patience: epochs without improvement before stopping.
        restore_best_weights: put back the weights of the best epoch when stopping.
    """

    def __init__(
        self,
        monitor: str = "val_loss",
        patience: int = 3,
        mode: str = "auto",
        min_delta: float = 0.0,
        restore_best_weights: bool = False,
    ):
        if patience < 0:
            raise ValueError(f"patience must be >= 0, got {patience}")
        self.monitor = monitor
        self.mode = _resolve_mode(monitor, mode)
        self.patience = patience
        self.min_delta = min_delta
        self.restore_best_weights = restore_best_weights
        self.best = math.inf if self.mode == "min" else -math.inf
        self.best_epoch: int | None = None
        self.stopped_epoch: int | None = None
        self._wait = 0
        self._best_state: dict | None = None

    def on_train_begin(self, logs: dict | None = None) -> None:
        self._wait = 0
        self.best = math.inf if self.mode == "min" else -math.inf

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        value = _monitored(self.monitor, logs, "EarlyStopping")
        if _better(self.mode, value, self.best, self.min_delta):
            self.best, self.best_epoch, self._wait = value, epoch, 0
            if self.restore_best_weights:
                self._best_state = {k: v.detach().clone() for k, v in self.trainer.model.state_dict().items()}
            return
        self._wait += 1
        if self._wait >= max(self.patience, 1):
            self.stopped_epoch = epoch
            self.trainer.stop_training = True
            if self.restore_best_weights and self._best_state is not None:
                self.trainer.model.load_state_dict(self._best_state)


class TrainingCheckpoint(Callback):
    """Saves everything a killed ``fit`` needs to resume: model, optimizer, scheduler,
    the distillation loss's own parameters (adapters), RNG states, epoch, step, the data
    order's position, the epoch's running means and the history.

    Written atomically at the end of every epoch, and within an epoch every
    ``every_steps`` optimizer steps and/or every ``every_seconds`` seconds. Resume with
    ``trainer.fit(..., resume_from=path)``: the run then ends with the same weights and
    metrics as one that was never interrupted (bit for bit on the CPU with the same
    thread count, for arrays, tensors and Datasets; a user's own ``DataLoader`` resumes at
    the right step, in its own shuffle order).

    Args:
        path: the file (``last.pt`` in a run directory).
        every_steps: save after every this many steps within an epoch (``None``: not by steps).
        every_seconds: save when this many seconds passed since the last save (``None``:
            not by time).
    """

    main_process_only = True

    def __init__(self, path: str | os.PathLike, *, every_steps: int | None = None, every_seconds: float | None = None):
        if every_steps is not None and (not isinstance(every_steps, int) or every_steps < 1):
            raise ValueError(f"every_steps must be a positive integer or None, got {every_steps!r}")
        if every_seconds is not None and every_seconds <= 0:
            raise ValueError(f"every_seconds must be > 0 or None, got {every_seconds!r}")
        self.path = Path(path)
        self.every_steps = every_steps
        self.every_seconds = every_seconds
        self._last = time.monotonic()

    def _save(self) -> None:
        from .checkpoint import save_training_state

        save_training_state(self.path, self.trainer.training_state())
        self._last = time.monotonic()

    def on_train_begin(self, logs: dict | None = None) -> None:
        self._last = time.monotonic()

    def on_train_batch_end(self, step: int, logs: dict | None = None) -> None:
        due = self.every_steps is not None and (step + 1) % self.every_steps == 0
        due = due or (self.every_seconds is not None and time.monotonic() - self._last >= self.every_seconds)
        if due and step + 1 < self.trainer._steps_per_epoch:  # the epoch-end save follows anyway
            self._save()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        self._save()


class EMA(Callback):
    """An exponential moving average of the model's weights, put into the model when
    training ends.

    After every optimizer step the average moves towards the current weights:
    ``avg = decay * avg + (1 - decay) * w`` (``torch.optim.swa_utils.AveragedModel`` with
    ``get_ema_multi_avg_fn``; batch-norm statistics are averaged the same way). When
    ``fit`` ends the averaged weights replace the model's, so ``evaluate``, ``predict``,
    checkpoints, reports and exports all use them; the validation curves during training are
    those of the raw weights. Its state is part of the trainer's training state, so a
    resumed fit continues the same average.

    Put it before any :class:`TrainingCheckpoint` in the callback list (a checkpoint saved
    after a step then holds the average of that step); the experiment runner does.

    Args:
        decay: weight of the running average per step, in ``[0, 1)`` (0.999: an average
            over roughly the last 1,000 steps).
        start_step: the first optimizer step (1-based, counted over the fit) that updates
            the average; before it the average follows the weights exactly.

    Raises:
        ValueError: ``decay`` outside ``[0, 1)`` or a negative ``start_step``.
    """

    def __init__(self, decay: float = 0.999, *, start_step: int = 0):
        if not 0.0 <= float(decay) < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay!r}: 0.999 averages over about the last 1,000 steps")
        if not isinstance(start_step, int) or start_step < 0:
            raise ValueError(f"start_step must be a non-negative integer, got {start_step!r}")
        self.decay = float(decay)
        self.start_step = start_step
        self.averaged: Any = None
        self._pending: dict | None = None  # a state to restore once the model is known

    def on_train_begin(self, logs: dict | None = None) -> None:
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        # each fit starts the average from the model's weights, or continues a restored one
        self.averaged = AveragedModel(self.trainer.model, multi_avg_fn=get_ema_multi_avg_fn(self.decay),
                                      use_buffers=True)
        if self._pending is not None:
            self.averaged.load_state_dict(self._pending)
            self._pending = None

    def on_train_batch_end(self, step: int, logs: dict | None = None) -> None:
        model = self.trainer.model
        if int(self.trainer.global_step) <= self.start_step and int(self.averaged.n_averaged) > 0:
            # not started: follow the weights (the average starts from them)
            for avg, p in zip(self.averaged.module.state_dict().values(), model.state_dict().values()):
                avg.copy_(p)
            return
        self.averaged.update_parameters(model)  # the first update copies the weights

    def on_train_end(self, logs: dict | None = None) -> None:
        self.trainer.model.load_state_dict(self.averaged.module.state_dict())

    def state_dict(self) -> dict[str, Any]:
        """The average (weights, buffers and the number of updates)."""
        return {} if self.averaged is None else {"averaged": self.averaged.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue the average of a saved training state (applied when training begins)."""
        self._pending = state.get("averaged")

    def __repr__(self) -> str:
        return f"EMA(decay={self.decay}, start_step={self.start_step})"
