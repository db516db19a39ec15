"""TensorBoard and MLflow loggers: what they write reads back as the fit's History, a
resumed fit continues the same folder / run, only rank 0 writes, a missing package names
its extra, and a YAML run takes them by dotted path."""

from __future__ import annotations

import importlib.util
import sys

import pytest
import torch
from torch import nn

from kdistill import Distiller, Trainer
from kdistill.callbacks import TrainingCheckpoint
from kdistill.checkpoint import read_training_state
from kdistill.errors import MissingExtraError
from kdistill.trackers import MLflowLogger, TensorBoardLogger, trainer_params

from crashing import Crash, CrashAt

needs_tensorboard = pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None,
                                       reason="needs the tensorboard extra (pip install 'kdistill[tensorboard]')")


def _data(n=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 12, generator=g)
    y = (x[:, :3].sum(1) > 0).long() + (x[:, 3] > 1).long()
    return x, y


def _net(seed=1):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 3))


def _distiller():
    d = Distiller(student=_net(), teacher=_net(seed=7), device="cpu")
    return d.compile("adam", metrics=["accuracy"], alpha=0.3, temperature=4.0, learning_rate=1e-2)


def _trainer():
    return Trainer(_net(), device="cpu").compile("adam", metrics=["accuracy"], learning_rate=1e-2)


FIT = dict(epochs=2, batch_size=32, validation_data=_data(32, seed=3), verbose=0, seed=0)  # 3 steps an epoch


def _scalars(path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(path), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


# ------------------------------------------------------------------ TensorBoard


@needs_tensorboard
def test_tensorboard_scalars_equal_the_history(tmp_path):
    distiller = _distiller()
    logger = TensorBoardLogger(tmp_path / "tb", every_steps=2)
    history = distiller.fit(*_data(), callbacks=[logger], **FIT)
    assert logger.path == tmp_path / "tb" / "version_0"
    scalars = _scalars(logger.path)
    assert {"loss", "student_loss", "distillation_loss", "accuracy", "val_loss", "val_accuracy"} <= set(history.history)
    for key, values in history.history.items():
        # logged at the last step of each epoch, as float32
        assert [s for s, _ in scalars[key]] == [3, 6]
        assert [v for _, v in scalars[key]] == pytest.approx(values, rel=1e-6, abs=1e-7)
    assert scalars["epoch"] == [(3, 1.0), (6, 2.0)]
    assert [s for s, _ in scalars["step/loss"]] == [2, 4, 6]  # every 2 optimizer steps: running means
    assert scalars["step/loss"][-1][1] == pytest.approx(history.history["loss"][-1], rel=1e-6)


@needs_tensorboard
def test_tensorboard_logs_named_distillation_terms(tmp_path):
    from kdistill.losses import KDLoss, WeightedSum

    d = Distiller(student=_net(), teacher=_net(seed=7), device="cpu")
    d.compile("adam", distillation_loss_fn=WeightedSum({"kd": (KDLoss(temperature=2.0), 0.5), "kd4": (KDLoss(temperature=4.0), 0.5)}))
    logger = TensorBoardLogger(tmp_path / "tb")
    history = d.fit(*_data(), callbacks=[logger], **FIT)
    named = [k for k in history.history if k.startswith("distillation/")]
    assert len(named) == 2
    scalars = _scalars(logger.path)
    for key in named:
        assert [v for _, v in scalars[key]] == pytest.approx(history.history[key], rel=1e-6)


@needs_tensorboard
def test_each_fresh_fit_gets_a_folder_and_a_continued_fit_keeps_it(tmp_path):
    logger = TensorBoardLogger(tmp_path / "tb")
    t = _trainer()
    t.fit(*_data(), callbacks=[logger], **{**FIT, "validation_data": None})
    t.fit(*_data(), callbacks=[logger], **{**FIT, "validation_data": None})  # continues the trainer
    assert logger.path.name == "version_0"
    assert [s for s, _ in _scalars(logger.path)["loss"]] == [3, 6, 9, 12]
    _trainer().fit(*_data(), callbacks=[logger], **{**FIT, "validation_data": None})  # a fresh trainer
    assert logger.path.name == "version_1"
    named = TensorBoardLogger(tmp_path / "tb", name="mine")
    _trainer().fit(*_data(), callbacks=[named], **{**FIT, "validation_data": None})
    assert named.path == tmp_path / "tb" / "mine"


# 3 steps an epoch; saved at step 2 of an epoch (global 2, 5, 8) and at epoch ends (3, 6)
@needs_tensorboard
@pytest.mark.parametrize("crash", [CrashAt(4), CrashAt(7), CrashAt(epoch=1)],
                         ids=["step4-after-epoch-end", "step7-after-epoch-end", "epoch1-logged-not-saved"])
def test_a_resumed_fit_continues_the_folder_as_if_uninterrupted(tmp_path, crash):
    kw = {**FIT, "epochs": 3}
    reference = _distiller().fit(*_data(), **kw)
    state = tmp_path / "last.pt"
    crashed = TensorBoardLogger(tmp_path / "tb", every_steps=1)
    with pytest.raises(Crash):
        _distiller().fit(*_data(), callbacks=[crashed, crash, TrainingCheckpoint(state, every_steps=2)], **kw)
    crashed.on_train_end()  # everything it wrote reaches the disk (a killed process may lose the unflushed tail)
    written = max(s for s, _ in _scalars(tmp_path / "tb" / "version_0")["step/loss"])
    assert written > read_training_state(state)["global_step"]  # the crashed run wrote past its last state
    logger = TensorBoardLogger(tmp_path / "tb", every_steps=1)  # a new process: a new logger
    history = _distiller().fit(*_data(), callbacks=[TrainingCheckpoint(state, every_steps=2), logger],
                               resume_from=state, **kw)
    assert history.history == reference.history
    assert logger.path.name == "version_0" and [p.name for p in (tmp_path / "tb").iterdir()] == ["version_0"]
    scalars = _scalars(logger.path)
    for key, values in reference.history.items():
        assert [s for s, _ in scalars[key]] == [3, 6, 9]  # no step twice: the crashed run's tail is purged
        assert [v for _, v in scalars[key]] == pytest.approx(values, rel=1e-6, abs=1e-7)
    assert [s for s, _ in scalars["step/loss"]] == list(range(1, 10))


@needs_tensorboard
def test_only_the_main_process_writes(tmp_path, monkeypatch):
    import kdistill.trackers as trackers

    assert TensorBoardLogger.main_process_only and MLflowLogger.main_process_only
    monkeypatch.setattr(trackers.distributed, "is_main", lambda: False)
    logger = TensorBoardLogger(tmp_path / "tb", every_steps=1)
    logger.set_trainer(_trainer())
    logger.on_train_begin()
    logger.on_train_batch_end(0, {"loss": 1.0})
    logger.on_epoch_end(0, {"loss": 1.0})
    logger.on_train_end()
    assert not (tmp_path / "tb").exists()


@pytest.mark.parametrize("cls, module, extra", [(TensorBoardLogger, "tensorboard", "tensorboard"),
                                                (MLflowLogger, "mlflow", "mlflow")])
def test_a_missing_package_names_the_extra(tmp_path, monkeypatch, cls, module, extra):
    monkeypatch.setitem(sys.modules, module, None)  # import fails
    with pytest.raises(MissingExtraError, match=rf'pip install "kdistill\[{extra}\]"'):
        cls(tmp_path / "x") if cls is TensorBoardLogger else cls(tracking_uri=f"file:{tmp_path}")


@needs_tensorboard
def test_every_steps_is_checked(tmp_path):
    with pytest.raises(ValueError, match="every_steps must be a positive integer"):
        TensorBoardLogger(tmp_path, every_steps=0)


@needs_tensorboard
def test_a_yaml_run_takes_the_logger_by_dotted_path(tmp_path):
    from experiment_configs import tiny_config
    from kdistill.config import validate_config
    from kdistill.experiment import run_experiment

    pytest.importorskip("sklearn", reason="the tiny experiment reads scikit-learn's digits")
    stages = tiny_config(tmp_path)["stages"]
    stages = {k: {**v, "epochs": 1} for k, v in stages.items()}
    raw = tiny_config(tmp_path / "run", device="cpu", stages=stages,
                      callbacks=[{"name": "tensorboard",  # the built-in name of kdistill.trackers.TensorBoardLogger
                                  "log_dir": str(tmp_path / "tb"), "every_steps": 5},
                                 {"name": "tensorboard", "log_dir": "{run_dir}/tb/{stage}"}])  # a folder per stage
    metrics = run_experiment(validate_config(raw), verbose=0, log=lambda m: None)
    folders = sorted(p.name for p in (tmp_path / "tb").iterdir())
    assert folders == ["version_0", "version_1", "version_2"]  # teacher, scratch, distil: one fit each
    distil = metrics["histories"]["distil"]["history"]
    scalars = _scalars(tmp_path / "tb" / "version_2")
    for key, values in distil.items():
        assert [v for _, v in scalars[key]] == pytest.approx(values, rel=1e-6, abs=1e-7)
    assert "distillation_loss" not in _scalars(tmp_path / "tb" / "version_0")  # the teacher's fit
    per_stage = sorted(p.parent.name for p in (tmp_path / "run").rglob("tb/*/version_0"))
    assert per_stage == ["distil", "scratch", "teacher"]


# ------------------------------------------------------------------ MLflow


@pytest.fixture
def mlflow_uri(tmp_path, monkeypatch):
    pytest.importorskip("mlflow", reason="the MLflow logger's tests need the mlflow extra")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    return f"file:{tmp_path / 'mlruns'}"


def _metric_histories(uri, run_id):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(run_id)
    return run, {k: [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, k), key=lambda m: m.step)]
                 for k in run.data.metrics}


def test_mlflow_metrics_equal_the_history_and_params_hold_the_settings(mlflow_uri):
    logger = MLflowLogger(tracking_uri=mlflow_uri, experiment_name="tiny", run_name="distil")
    distiller = _distiller()
    history = distiller.fit(*_data(), callbacks=[logger], **FIT)
    run, metrics = _metric_histories(mlflow_uri, logger.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "distil"
    assert set(metrics) == set(history.history)
    for key, values in history.history.items():
        assert metrics[key] == [(0, pytest.approx(values[0], rel=1e-12)), (1, pytest.approx(values[1], rel=1e-12))]
    params = run.data.params
    assert params["trainer"] == "Distiller" and params["alpha"] == "0.3" and params["temperature"] == "4.0"
    assert params["optimizer"] == "Adam" and params["optimizer.lr"] == "0.01"
    assert params["precision"] == "fp32" and params["accumulate_steps"] == "1" and params["epochs"] == "2"
    assert run.data.tags["kdistill.trainer"] == "Distiller"


@pytest.mark.parametrize("crash", [CrashAt(4), CrashAt(8), CrashAt(epoch=1)],
                         ids=["mid-epoch", "later-epoch", "epoch1-logged-not-saved"])
def test_a_resumed_fit_continues_the_mlflow_run(tmp_path, mlflow_uri, crash):
    kw = {**FIT, "epochs": 3}
    reference = _trainer().fit(*_data(), **kw)
    state = tmp_path / "last.pt"
    first = MLflowLogger(tracking_uri=mlflow_uri, experiment_name="tiny")
    with pytest.raises(Crash):
        _trainer().fit(*_data(), callbacks=[first, crash, TrainingCheckpoint(state, every_steps=2)], **kw)
    _, before = _metric_histories(mlflow_uri, first.run_id)
    logger = MLflowLogger(tracking_uri=mlflow_uri, experiment_name="tiny")  # a new process
    history = _trainer().fit(*_data(), callbacks=[logger, TrainingCheckpoint(state, every_steps=2)],
                             resume_from=state, **kw)
    assert history.history == reference.history
    assert logger.run_id == first.run_id  # the interrupted run, found again
    run, metrics = _metric_histories(mlflow_uri, logger.run_id)
    assert run.info.status == "FINISHED"
    for key, values in reference.history.items():
        assert [s for s, _ in metrics[key]] == [0, 1, 2]  # each epoch once
        assert [v for _, v in metrics[key]] == pytest.approx(values, rel=1e-12)
    assert before["loss"][0][0] == 0 and first.run_id is not None


def test_a_fresh_fit_starts_a_new_run_and_run_id_continues_one(mlflow_uri):
    a = MLflowLogger(tracking_uri=mlflow_uri, experiment_name="tiny")
    _trainer().fit(*_data(), callbacks=[a], **FIT)
    first = a.run_id
    _trainer().fit(*_data(), callbacks=[a], **FIT)  # another trainer: a run of its own
    assert a.run_id != first
    again = MLflowLogger(tracking_uri=mlflow_uri, experiment_name="tiny", run_id=first)
    t = _trainer()
    t.fit(*_data(), callbacks=[again], **FIT)
    assert again.run_id == first
    t.fit(*_data(), callbacks=[again], **{**FIT, "epochs": 3, "initial_epoch": 2})  # the same trainer, on
    assert again.run_id == first
    _, metrics = _metric_histories(mlflow_uri, first)
    assert [s for s, _ in metrics["loss"]] == [0, 0, 1, 1, 2]  # two fits logged as asked, then epoch 2


def test_trainer_params_of_a_plain_trainer():
    t = _trainer()
    params = trainer_params(t)
    assert params["trainer"] == "Trainer" and params["metrics"] == "accuracy" and "alpha" not in params
    assert all(isinstance(v, str) for v in params.values())
