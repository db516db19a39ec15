"""Experiment trackers as callbacks: TensorBoard and MLflow.

Both are optional: ``pip install "kdistill[tensorboard]"`` or ``"kdistill[mlflow]"``.
They are imported when a logger is built, never by ``import kdistill``.

Both log what :class:`~kdistill.callbacks.History` records, under the same names: every
loss term (``loss``, ``student_loss``, ``distillation_loss``, a loss's named parts as
``distillation/<part>``), every metric, and the ``val_`` results. In a multi-process fit
only rank 0 logs. A resumed fit (``fit(..., resume_from=...)``) continues the same
TensorBoard folder and the same MLflow run, with the same step numbers.

In an experiment config they are named by their dotted path::

    callbacks:
      - {_component_: kdistill.trackers.TensorBoardLogger, log_dir: runs/tb}
      - {_component_: kdistill.trackers.MLflowLogger, experiment_name: digits-kd}

Each stage (teacher, scratch, distilled student) is then a fit of its own: a
TensorBoard folder ``version_N`` of its own, an MLflow run of its own.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import Any

from torch import nn

from . import distributed
from .callbacks import Callback
from .checkpoint import model_name
from .export import require_extra

#: Tag of the TensorBoard scalars logged every ``every_steps`` steps: ``step/<key>``.
STEP_PREFIX = "step/"
_VERSION = re.compile(r"version_(\d+)")
#: MLflow keeps parameter values up to this many characters (older servers: 500).
_MAX_PARAM_CHARS = 500


def _check_every_steps(every_steps: int | None) -> int | None:
    if every_steps is not None and (isinstance(every_steps, bool) or not isinstance(every_steps, int)
                                    or every_steps < 1):
        raise ValueError(f"every_steps must be a positive integer (log every this many optimizer steps) or None "
                         f"(per epoch only), got {every_steps!r}")
    return every_steps


def _history_epochs(trainer: Any) -> list[tuple[int, dict[str, float]]]:
    """``[(epoch, {key: value})]`` of the epochs a trainer's history holds (a resumed fit
    starts with the epochs trained before the interruption)."""
    history = getattr(trainer, "history", None)
    if history is None:
        return []
    return [(e, {k: v[i] for k, v in history.history.items() if i < len(v)}) for i, e in enumerate(history.epoch)]


# --------------------------------------------------------------------------------------
# TensorBoard
# --------------------------------------------------------------------------------------


class TensorBoardLogger(Callback):
    """Writes the logs of a ``fit`` as TensorBoard scalars
    (``torch.utils.tensorboard.SummaryWriter``).

    The x-axis is the optimizer step (``trainer.global_step``). At the end of every epoch
    each log key becomes a scalar of the same name (``loss``, ``distillation_loss``,
    ``distillation/<part>``, ``accuracy``, ``val_accuracy``, ...), logged at the epoch's
    last step, plus ``epoch`` (epochs completed). With ``every_steps=N``, every N-th
    step also logs the epoch's running means so far as ``step/<key>``.

    Each fit of a fresh trainer writes a new folder ``log_dir/version_N`` (``N`` one
    more than the largest there), or ``log_dir/name`` when ``name`` is given, so runs and
    the stages of an experiment do not overwrite each other; ``tensorboard --logdir
    log_dir`` shows them side by side. A fit that continues a trainer (a second ``fit``
    call, or ``fit(resume_from=...)`` after an interruption) continues the same folder
    (in a new process: the newest ``version_N``, or ``name``) and opens its writer with
    ``purge_step`` = the restored step + 1: scalars the interrupted run wrote after its
    last saved state are dropped by TensorBoard, and the resumed run's replace them, so
    the curves read as those of an uninterrupted run.

    Args:
        log_dir: the root folder (created if missing).
        every_steps: also log the running means every this many optimizer steps
            (``None``: once per epoch only).
        name: the subfolder to write instead of a new ``version_N`` (a fresh fit into a
            folder that holds events adds to it: give each run its own name).
        flush_secs: how often the writer flushes in the background; it also flushes at
            the end of every epoch.

    Raises:
        MissingExtraError: ``tensorboard`` is not installed (``pip install
            "kdistill[tensorboard]"``).
        ValueError: ``every_steps`` not a positive integer.
    """

    main_process_only = True

    def __init__(self, log_dir: str | os.PathLike, *, every_steps: int | None = None, name: str | None = None,
                 flush_secs: float = 30.0):
        require_extra("tensorboard", extra="tensorboard")
        if name is not None and (not isinstance(name, str) or not name or Path(name).name != name):
            raise ValueError(f"name must be a folder name (no path separators), got {name!r}")
        self.log_dir = Path(log_dir)
        self.every_steps = _check_every_steps(every_steps)
        self.name = name
        self.flush_secs = flush_secs
        #: The folder written (set when the first fit begins).
        self.path: Path | None = None
        self._writer: Any = None
        self._path_trainer: Any = None

    # ---------------------------------------------------------------- folder
    def _versions(self) -> list[int]:
        if not self.log_dir.is_dir():
            return []
        return sorted(int(m.group(1)) for p in self.log_dir.iterdir()
                      if p.is_dir() and (m := _VERSION.fullmatch(p.name)))

    def _new_version(self) -> Path:
        n = (self._versions() or [-1])[-1] + 1
        while True:  # claim the folder: another run may take the same number at once
            path = self.log_dir / f"version_{n}"
            try:
                path.mkdir(parents=True)
                return path
            except FileExistsError:
                n += 1

    def _choose_path(self, continuing: bool) -> Path:
        # this trainer's folder, or one given by load_state_dict (no trainer yet)
        if continuing and self.path is not None and (self._path_trainer is None or self._path_trainer is self.trainer):
            return self.path
        if self.name is not None:
            return self.log_dir / self.name
        versions = self._versions()
        if continuing and versions:
            return self.log_dir / f"version_{versions[-1]}"
        return self._new_version()

    # ---------------------------------------------------------------- hooks
    def on_train_begin(self, logs: dict | None = None) -> None:
        if not distributed.is_main():
            return
        from torch.utils.tensorboard import SummaryWriter

        self._close()
        step = int(getattr(self.trainer, "global_step", 0))
        continuing = step > 0
        self.path = self._choose_path(continuing)
        self._path_trainer = self.trainer
        self.path.mkdir(parents=True, exist_ok=True)
        # a continued fit drops what was written after the state it continues from
        self._writer = SummaryWriter(log_dir=str(self.path), purge_step=step + 1 if continuing else None,
                                     flush_secs=self.flush_secs)

    def on_train_batch_end(self, step: int, logs: dict | None = None) -> None:
        if self._writer is None or self.every_steps is None:
            return
        global_step = int(self.trainer.global_step)
        if global_step % self.every_steps == 0:
            for key, value in (logs or {}).items():
                self._writer.add_scalar(f"{STEP_PREFIX}{key}", float(value), global_step)

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if self._writer is None:
            return
        global_step = int(self.trainer.global_step)
        for key, value in (logs or {}).items():
            self._writer.add_scalar(key, float(value), global_step)
        self._writer.add_scalar("epoch", epoch + 1, global_step)
        self._writer.flush()

    def on_train_end(self, logs: dict | None = None) -> None:
        self._close()

    def _close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """``{"path": the folder written}``: what a resumed fit needs to continue it."""
        return {"path": None if self.path is None else str(self.path)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue the folder recorded by :meth:`state_dict` (in a resumed fit)."""
        path = state.get("path")
        self.path = None if path is None else Path(path)
        self._path_trainer = None

    def __repr__(self) -> str:
        return f"TensorBoardLogger(log_dir={str(self.log_dir)!r}, every_steps={self.every_steps}, name={self.name!r})"


# --------------------------------------------------------------------------------------
# MLflow
# --------------------------------------------------------------------------------------

#: The local store used when neither ``tracking_uri`` nor ``MLFLOW_TRACKING_URI`` is set.
DEFAULT_TRACKING_URI = "file:./mlruns"
_FINISHED = "FINISHED"


def _is_file_store(uri: str) -> bool:
    return uri.startswith("file:") or ("://" not in uri and not uri.startswith(("databricks", "sqlite", "http")))


def _plain(value: Any) -> bool:
    return isinstance(value, (bool, int, float, str, type(None))) or (
        isinstance(value, (list, tuple)) and all(isinstance(v, (bool, int, float, str, type(None))) for v in value))


#: Module attributes that change as training goes, or are not settings.
_NOT_SETTINGS = frozenset({"training", "epoch", "global_step"})


def _module_params(module: Any, prefix: str) -> dict[str, Any]:
    """``{prefix: class, prefix.setting: value, prefix.child...}``: a module's public
    plain attributes (a loss's temperature, a weighted sum's weights) and its submodules'."""
    out: dict[str, Any] = {prefix: type(module).__name__}
    for key, value in vars(module).items():
        if key.startswith("_") or key in _NOT_SETTINGS:
            continue
        if _plain(value):
            out[f"{prefix}.{key}"] = value
        elif isinstance(value, dict) and all(isinstance(k, str) and _plain(v) for k, v in value.items()):
            out.update({f"{prefix}.{key}.{k}": v for k, v in value.items()})
    if isinstance(module, nn.Module):
        for name, child in module.named_children():
            out.update(_module_params(child, f"{prefix}.{name}"))
    return out


def _describe(obj: Any) -> str | None:
    """A loss or an augmentation as a parameter: its repr if it describes itself (an
    augmentation), a module's class, a function's name."""
    if obj is None:
        return None
    if isinstance(obj, nn.Module):
        return type(obj).__name__
    return getattr(obj, "__qualname__", None) or repr(obj)


def trainer_params(trainer: Any) -> dict[str, str]:
    """The settings of a compiled, fitting :class:`~kdistill.Trainer` or
    :class:`~kdistill.Distiller` as MLflow parameters (strings): the model, the
    optimizer and its defaults, the schedule, the training step (precision,
    accumulation, clipping), the loss and metrics, and for a Distiller ``alpha``, the
    temperature and the distillation loss's settings."""
    t = trainer
    model = getattr(t, "model", None)
    params: dict[str, Any] = {"trainer": type(t).__name__}
    if isinstance(model, nn.Module):
        params["model"] = model_name(model)
        params["parameters"] = sum(p.numel() for p in model.parameters())
    opt = getattr(t, "optimizer", None)
    if opt is not None:
        params["optimizer"] = type(opt).__name__
        params.update({f"optimizer.{k}": v for k, v in opt.defaults.items() if _plain(v)})
    scheduler = getattr(t, "scheduler", None)
    params["scheduler"] = None if scheduler is None else type(scheduler).__name__
    for key in ("scheduler_interval", "precision", "accumulate_steps", "max_grad_norm", "train_temperature"):
        if hasattr(t, key):
            params[key] = getattr(t, key)
    params["loss"] = _describe(getattr(t, "loss_fn", None))
    params["metrics"] = ",".join(getattr(t, "metrics", {}) or [])
    params["epochs"] = getattr(t, "_epochs", None)
    params["steps_per_epoch"] = getattr(t, "_steps_per_epoch", None)
    params["augment"] = _describe(getattr(t, "augment", None))
    if hasattr(t, "distillation_loss"):  # a Distiller
        params["alpha"] = getattr(t, "alpha", None)
        params["label_loss_weight"] = getattr(t, "label_loss_weight", None)
        params["temperature"] = getattr(t, "temperature", None)
        params["teacher"] = type(getattr(t, "teacher", None)).__name__
        if t.distillation_loss is not None:
            params.update(_module_params(t.distillation_loss, "distillation_loss"))
    return {k: str(v)[:_MAX_PARAM_CHARS] for k, v in params.items()}


class MLflowLogger(Callback):
    """Logs a ``fit`` to an MLflow run: its settings as parameters, its logs as metrics.

    When training begins the run gets the trainer's settings as parameters
    (:func:`trainer_params`: model, optimizer, schedule, precision, accumulation,
    clipping, loss, metrics; for a Distiller ``alpha``, the temperature and the
    distillation loss's settings) and tags ``kdistill.trainer`` and ``kdistill.model``.
    At the end of every epoch every log key is logged as a metric of the same name at
    step = the epoch (0-based, as ``History.epoch``), so the run's metric histories are
    the fit's :class:`~kdistill.callbacks.History`. The run is marked ``FINISHED`` when the
    fit ends; a fit that fails leaves it ``RUNNING``.

    **Resuming.** A resumed fit (``fit(resume_from=...)``) continues a run instead of
    starting one: ``run_id`` if given (or restored by :meth:`load_state_dict`), else the
    newest run of the experiment that is not ``FINISHED`` and was logged by the same
    trainer class and model (and ``run_name``, if given): the run the interrupted fit left
    behind. Epochs the run already holds are not logged twice; epochs of the restored
    history that it lacks are logged when training begins; parameters it already has are
    kept. Without such a run, a new run starts with the restored history's epochs. A
    second ``fit`` call on the same trainer continues this logger's run (give it
    ``initial_epoch`` so that its epochs are numbered on); a fit of a fresh trainer starts
    a new run, unless ``run_id`` was given.

    Args:
        tracking_uri: where runs are stored: a local folder (``"file:./mlruns"``), a
            database (``"sqlite:///mlflow.db"``, needs the full ``mlflow`` package) or a
            tracking server (``"http://host:5000"``). Default: ``MLFLOW_TRACKING_URI``
            if set, else ``"file:./mlruns"`` (relative to the working directory). MLflow
            3 keeps its file store behind ``MLFLOW_ALLOW_FILE_STORE``; for a file store
            this logger sets that variable to ``true`` unless it is already set (set it
            to ``false`` yourself to forbid file stores).
        experiment_name: the experiment (created if missing).
        run_name: the run's name (default: MLflow picks one).
        run_id: continue this run instead of starting one.
        tags: more tags for a new run.
        log_params: log the trainer's settings as parameters.

    Raises:
        MissingExtraError: ``mlflow`` is not installed (``pip install "kdistill[mlflow]"``).
    """

    main_process_only = True

    def __init__(self, tracking_uri: str | None = None, experiment_name: str = "kdistill", run_name: str | None = None,
                 *, run_id: str | None = None, tags: dict[str, str] | None = None, log_params: bool = True):
        require_extra("mlflow", extra="mlflow")
        if not isinstance(experiment_name, str) or not experiment_name:
            raise ValueError(f"experiment_name must be a non-empty string, got {experiment_name!r}")
        self.tracking_uri = str(tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI)
        self.experiment_name = experiment_name
        self.run_name = run_name
        #: The run logged to (set when training begins).
        self.run_id = run_id
        self.tags = dict(tags or {})
        self.log_params = log_params
        self._client: Any = None
        self._run_trainer: Any = None  # the trainer whose fit chose run_id (None: run_id was given)
        self._logged: dict[str, set[int]] = {}  # key -> epochs the run holds
        self._active = False

    # ---------------------------------------------------------------- mlflow
    def client(self) -> Any:
        """The ``mlflow.tracking.MlflowClient`` of ``tracking_uri``."""
        if self._client is None:
            if _is_file_store(self.tracking_uri):
                os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(tracking_uri=self.tracking_uri)
        return self._client

    def _experiment_id(self) -> str:
        client = self.client()
        found = client.get_experiment_by_name(self.experiment_name)
        if found is not None:
            return found.experiment_id
        try:
            return client.create_experiment(self.experiment_name)
        except Exception:  # another process created it in between
            found = client.get_experiment_by_name(self.experiment_name)
            if found is None:
                raise
            return found.experiment_id

    def _identity(self) -> dict[str, str]:
        return {"kdistill.trainer": type(self.trainer).__name__, "kdistill.model": model_name(self.trainer.model)}

    def _interrupted_run(self, experiment_id: str) -> str | None:
        """The newest run of the experiment that is not finished and was logged by this
        kind of trainer and model (and ``run_name``): the one an interrupted fit left."""
        identity = self._identity()
        runs = self.client().search_runs([experiment_id], order_by=["attributes.start_time DESC"], max_results=200)
        for run in runs:
            if run.info.status == _FINISHED:
                continue
            if any(run.data.tags.get(k) != v for k, v in identity.items()):
                continue
            if self.run_name is not None and run.info.run_name != self.run_name:
                continue
            return run.info.run_id
        return None

    def _log_epoch(self, epoch: int, logs: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(key, float(value), now, epoch) for key, value in logs.items()
                   if epoch not in self._logged.get(key, ())]
        for start in range(0, len(metrics), 1000):  # MLflow's limit per batch
            self.client().log_batch(self.run_id, metrics=metrics[start:start + 1000])
        for m in metrics:
            self._logged.setdefault(m.key, set()).add(epoch)

    # ---------------------------------------------------------------- hooks
    def on_train_begin(self, logs: dict | None = None) -> None:
        if not distributed.is_main():
            return
        client = self.client()
        experiment_id = self._experiment_id()
        continuing = int(getattr(self.trainer, "global_step", 0)) > 0
        history = _history_epochs(self.trainer)
        # restored from a training state: epochs trained before, or a position inside an epoch
        resumed = bool(history) or int(getattr(self.trainer, "step_in_epoch", 0)) > 0
        # 1. the run: one given (or this trainer's, continued), the interrupted one, or a new one
        if self.run_id is not None and (self._run_trainer is None or (continuing and self._run_trainer is self.trainer)):
            pass
        elif resumed:
            self.run_id = self._interrupted_run(experiment_id)
        else:
            self.run_id = None
        self._run_trainer = self.trainer
        self._logged = {}
        if self.run_id is not None:
            run = client.get_run(self.run_id)
            if run.info.status != "RUNNING":
                client.update_run(self.run_id, status="RUNNING")
            if resumed:  # what the interrupted fit logged after its last saved state is not logged twice
                for key in run.data.metrics:
                    self._logged[key] = {m.step for m in client.get_metric_history(self.run_id, key)}
            have = set(run.data.params)
        else:
            run = client.create_run(experiment_id, run_name=self.run_name, tags={**self._identity(), **self.tags})
            self.run_id = run.info.run_id
            have = set()
        self._active = True
        # 2. the settings, then the epochs trained before a resume that the run lacks
        if self.log_params:
            from mlflow.entities import Param

            params = [Param(k, v) for k, v in trainer_params(self.trainer).items() if k not in have]
            for start in range(0, len(params), 100):  # MLflow's limit per batch
                client.log_batch(self.run_id, params=params[start:start + 100])
        for epoch, values in history:
            self._log_epoch(epoch, values)

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if self._active:
            self._log_epoch(epoch, logs or {})

    def on_train_end(self, logs: dict | None = None) -> None:
        if self._active:
            self.client().set_terminated(self.run_id, status=_FINISHED)
            self._active = False

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """``{"run_id": ...}``: what a resumed fit needs to continue the run."""
        return {"run_id": self.run_id}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue the run recorded by :meth:`state_dict` (in a resumed fit)."""
        self.run_id = state.get("run_id")
        self._run_trainer = None

    def __repr__(self) -> str:
        return (f"MLflowLogger(tracking_uri={self.tracking_uri!r}, experiment_name={self.experiment_name!r}, "
                f"run_name={self.run_name!r})")


__all__ = ["MLflowLogger", "TensorBoardLogger", "trainer_params"]
