"""Callbacks driven directly with a stub trainer and scripted logs, plus one real fit."""

from __future__ import annotations

import csv
import json
import os
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from kdistill.callbacks import CSVLogger, EarlyStopping, History, JSONLogger, ModelCheckpoint, ProgressBar
from kdistill.checkpoint import read_checkpoint
from kdistill.distiller import Trainer


def _stub(model: nn.Module | None = None):
    model = model or nn.Linear(2, 2)
    return SimpleNamespace(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                           stop_training=False, _epochs=3)


def _run(cb, trainer, logs_per_epoch, on_epoch=None):
    cb.set_trainer(trainer)
    cb.on_train_begin()
    for epoch, logs in enumerate(logs_per_epoch):
        if on_epoch:
            on_epoch(epoch)
        cb.on_epoch_begin(epoch)
        cb.on_epoch_end(epoch, logs)
        if trainer.stop_training:
            break
    cb.on_train_end()


# ------------------------------------------------------------------ ModelCheckpoint
def test_checkpoint_best_only_min(tmp_path):
    losses = [1.0, 0.8, 0.9, 0.5, 0.5, 0.7]
    cb = ModelCheckpoint(tmp_path / "best.pt", monitor="val_loss")
    saved = []
    trainer = _stub()
    cb.set_trainer(trainer)
    for epoch, v in enumerate(losses):
        cb.on_epoch_end(epoch, {"loss": 0.0, "val_loss": v})
        if read_checkpoint(tmp_path / "best.pt")["epoch"] == epoch:
            saved.append(epoch)
    assert saved == [0, 1, 3]  # equal is not better
    assert cb.best == 0.5 and cb.best_epoch == 3
    assert read_checkpoint(tmp_path / "best.pt")["metrics"]["val_loss"] == 0.5


def test_checkpoint_best_only_max_with_epoch_in_name(tmp_path):
    accs = [0.1, 0.3, 0.2, 0.4]
    cb = ModelCheckpoint(tmp_path / "ckpt-{epoch:02d}-{val_accuracy:.2f}.pt", monitor="val_accuracy")
    assert cb.mode == "max"
    _run(cb, _stub(), [{"val_accuracy": a} for a in accs])
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["ckpt-01-0.10.pt", "ckpt-02-0.30.pt", "ckpt-04-0.40.pt"]
    assert cb.last_path.name == "ckpt-04-0.40.pt"


def test_checkpoint_every_epoch_and_optimizer_flag(tmp_path):
    cb = ModelCheckpoint(tmp_path / "e{epoch}.pt", save_best_only=False, save_optimizer=False)
    _run(cb, _stub(), [{"loss": 1.0}, {"loss": 2.0}])  # no monitor needed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e1.pt", "e2.pt"]
    assert read_checkpoint(tmp_path / "e2.pt")["optimizer"] is None
    cb2 = ModelCheckpoint(tmp_path / "o.pt", save_best_only=False)
    _run(cb2, _stub(), [{"loss": 1.0}])
    assert read_checkpoint(tmp_path / "o.pt")["optimizer"] is not None


def test_checkpoint_saves_current_weights(tmp_path):
    trainer = _stub()
    cb = ModelCheckpoint(tmp_path / "best.pt", monitor="loss")

    def perturb(epoch):
        with torch.no_grad():
            trainer.model.weight.fill_(float(epoch))

    _run(cb, trainer, [{"loss": 3.0}, {"loss": 2.0}, {"loss": 2.5}], on_epoch=perturb)
    state = read_checkpoint(tmp_path / "best.pt")["state_dict"]
    assert torch.equal(state["weight"], torch.full((2, 2), 1.0))  # epoch 1 was best


def test_checkpoint_is_atomic(tmp_path, monkeypatch):
    trainer = _stub()
    cb = ModelCheckpoint(tmp_path / "best.pt", monitor="val_loss")
    cb.set_trainer(trainer)
    cb.on_epoch_end(0, {"val_loss": 1.0})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt"]
    old = (tmp_path / "best.pt").read_bytes()

    def boom(src, dst):
        raise OSError("simulated crash during rename")

    monkeypatch.setattr(os, "replace", boom)
    with torch.no_grad():
        trainer.model.weight.add_(1.0)
    with pytest.raises(OSError, match="simulated crash"):
        cb.on_epoch_end(1, {"val_loss": 0.5})
    monkeypatch.undo()
    assert (tmp_path / "best.pt").read_bytes() == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt"]  # no temp file left
    assert read_checkpoint(tmp_path / "best.pt")["epoch"] == 0


def test_missing_monitor_key_names_available_keys(tmp_path):
    cb = ModelCheckpoint(tmp_path / "b.pt", monitor="val_accuracy")
    cb.set_trainer(_stub())
    with pytest.raises(KeyError, match=r"val_accuracy.*\['accuracy', 'loss'\]"):
        cb.on_epoch_end(0, {"loss": 1.0, "accuracy": 0.5})
    es = EarlyStopping(monitor="val_loss")
    es.set_trainer(_stub())
    with pytest.raises(KeyError, match=r"EarlyStopping monitors 'val_loss'.*\['loss'\].*validation_data"):
        es.on_epoch_end(0, {"loss": 1.0})


def test_bad_mode():
    with pytest.raises(ValueError, match="mode must be 'auto', 'min' or 'max', got 'up'"):
        ModelCheckpoint("x.pt", mode="up")
    with pytest.raises(ValueError, match="patience must be >= 0"):
        EarlyStopping(patience=-1)


# ------------------------------------------------------------------ EarlyStopping
def test_early_stopping_stops_after_patience():
    trainer = _stub()
    es = EarlyStopping(monitor="val_loss", patience=2)
    seen = []
    es.set_trainer(trainer)
    es.on_train_begin()
    for epoch, v in enumerate([1.0, 0.9, 0.95, 0.91, 0.5, 0.4]):
        seen.append(epoch)
        es.on_epoch_end(epoch, {"val_loss": v})
        if trainer.stop_training:
            break
    assert seen == [0, 1, 2, 3]
    assert es.stopped_epoch == 3 and es.best_epoch == 1 and es.best == 0.9


def test_early_stopping_min_delta_and_max_mode():
    trainer = _stub()
    es = EarlyStopping(monitor="val_accuracy", patience=1, min_delta=0.05)
    es.set_trainer(trainer)
    es.on_train_begin()
    es.on_epoch_end(0, {"val_accuracy": 0.5})
    es.on_epoch_end(1, {"val_accuracy": 0.52})  # not enough
    assert trainer.stop_training and es.stopped_epoch == 1


def test_early_stopping_restores_best_weights():
    trainer = _stub()
    es = EarlyStopping(monitor="val_loss", patience=2, restore_best_weights=True)

    def set_weights(epoch):
        with torch.no_grad():
            trainer.model.weight.fill_(float(epoch))
            trainer.model.bias.fill_(-float(epoch))

    _run(es, trainer, [{"val_loss": v} for v in [1.0, 0.5, 0.7, 0.8, 0.1]], on_epoch=set_weights)
    assert trainer.stop_training and es.stopped_epoch == 3
    assert torch.equal(trainer.model.weight, torch.full((2, 2), 1.0))
    assert torch.equal(trainer.model.bias, torch.full((2,), -1.0))


def test_early_stopping_without_restore_keeps_last_weights():
    trainer = _stub()
    es = EarlyStopping(monitor="loss", patience=1)

    def set_weights(epoch):
        with torch.no_grad():
            trainer.model.weight.fill_(float(epoch))

    _run(es, trainer, [{"loss": v} for v in [1.0, 2.0, 3.0]], on_epoch=set_weights)
    assert torch.equal(trainer.model.weight, torch.full((2, 2), 1.0))
    assert es.stopped_epoch == 1


def test_early_stopping_in_fit_shortens_history():
    torch.manual_seed(0)
    x = torch.randn(16, 4)
    y = torch.zeros(16, dtype=torch.long)
    trainer = Trainer(nn.Linear(4, 2), device="cpu").compile("sgd", learning_rate=0.0)  # never improves
    es = EarlyStopping(monitor="loss", patience=2)
    h = trainer.fit(x, y, epochs=10, batch_size=16, verbose=0, callbacks=[es])
    assert len(h.history["loss"]) == 3 == len(h.epoch)
    assert es.stopped_epoch == 2


# ------------------------------------------------------------------ loggers
LOGS = [{"loss": 1.5, "accuracy": 0.25, "val_loss": 1.75}, {"loss": 1.0, "accuracy": 0.5, "val_loss": 1.25},
        {"loss": 0.5, "accuracy": 0.75, "val_loss": 1.0}]


def test_csv_logger_one_row_per_epoch(tmp_path):
    path = tmp_path / "logs" / "log.csv"
    cb = CSVLogger(path)
    cb.set_trainer(_stub())
    for epoch, logs in enumerate(LOGS):
        cb.on_epoch_end(epoch, logs)
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        assert len(rows) == epoch + 1
    assert list(rows[0]) == ["epoch", "loss", "accuracy", "val_loss"]
    for epoch, (row, logs) in enumerate(zip(rows, LOGS)):
        assert int(row["epoch"]) == epoch
        for k, v in logs.items():
            assert float(row[k]) == v
    assert sorted(p.name for p in path.parent.iterdir()) == ["log.csv"]


def test_csv_logger_keys_appearing_later(tmp_path):
    cb = CSVLogger(tmp_path / "log.csv")
    cb.on_epoch_end(0, {"loss": 1.0})
    cb.on_epoch_end(1, {"loss": 0.5, "val_loss": 0.7})
    with open(tmp_path / "log.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows[0]["val_loss"] == "" and float(rows[1]["val_loss"]) == 0.7


def test_json_logger_one_line_per_epoch(tmp_path):
    path = tmp_path / "log.jsonl"
    cb = JSONLogger(path)
    for epoch, logs in enumerate(LOGS):
        cb.on_epoch_end(epoch, logs)
    lines = path.read_text().splitlines()
    assert len(lines) == 3
    for epoch, (line, logs) in enumerate(zip(lines, LOGS)):
        assert json.loads(line) == {"epoch": epoch, **logs}


def test_loggers_in_fit(tmp_path):
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(20, 3)).astype(np.float32), rng.integers(0, 2, 20)
    trainer = Trainer(nn.Linear(3, 2), device="cpu").compile("sgd", metrics=["accuracy"])
    trainer.fit(x, y, epochs=2, batch_size=8, validation_data=(x, y), verbose=0,
                callbacks=[CSVLogger(tmp_path / "a.csv"), JSONLogger(tmp_path / "a.jsonl")])
    with open(tmp_path / "a.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["epoch"] for r in rows] == ["0", "1"]
    assert set(rows[0]) == {"epoch", "loss", "accuracy", "val_loss", "val_accuracy"}
    recs = [json.loads(line) for line in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in recs] == [0, 1]
    assert float(rows[1]["val_loss"]) == pytest.approx(recs[1]["val_loss"])


# ------------------------------------------------------------------ History, ProgressBar
def test_history_round_trip():
    h = History()
    for epoch, logs in enumerate(LOGS):
        h.on_epoch_end(epoch, logs)
    assert h.history["loss"] == [1.5, 1.0, 0.5]
    h2 = History.from_dict(json.loads(json.dumps(h.to_dict())))
    assert h2.history == h.history and h2.epoch == [0, 1, 2]
    assert "epochs=3" in repr(h2)


def test_progress_bar_verbose_2_prints_one_line_per_epoch(capsys):
    trainer = SimpleNamespace(_epochs=3, _last_batch_size=10, _steps_per_epoch=2)
    pb = ProgressBar(verbose=2)
    pb.set_trainer(trainer)
    pb.on_train_begin()
    for epoch, logs in enumerate(LOGS):
        pb.on_epoch_begin(epoch)
        pb.on_train_batch_end(0, logs)
        pb.on_train_batch_end(1, logs)
        pb.on_epoch_end(epoch, logs)
    pb.on_train_end()
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.strip()]
    assert len(lines) == 3
    for i, line in enumerate(lines):
        assert line.startswith(f"epoch {i + 1}/3")
        assert "loss: " in line and "val_loss: " in line and "accuracy: " in line
        m = re.search(r"(\d+) samples/s", line)
        assert m and int(m.group(1)) > 0


def test_fit_verbose_2(capsys):
    trainer = Trainer(nn.Linear(3, 2), device="cpu").compile("sgd")
    trainer.fit(np.zeros((10, 3), np.float32), np.zeros(10, np.int64), epochs=2, batch_size=4, verbose=2)
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("epoch")]
    assert len(lines) == 2
    assert lines[1].startswith("epoch 2/2 - loss: ") and lines[1].endswith("samples/s")


def test_fit_verbose_0_prints_nothing(capsys):
    trainer = Trainer(nn.Linear(3, 2), device="cpu").compile("sgd")
    trainer.fit(np.zeros((10, 3), np.float32), np.zeros(10, np.int64), epochs=2, verbose=0)
    out = capsys.readouterr()
    assert out.out == "" and out.err == ""


def test_progress_bar_shows_loss_terms_and_throughput(capsys):
    """verbose=1: a tqdm bar per epoch whose postfix carries every loss term and samples/s."""
    import torch
    from torch import nn

    from kdistill import Distiller

    torch.manual_seed(0)
    teacher, student = nn.Linear(4, 3), nn.Linear(4, 3)
    distiller = Distiller(student, teacher, device="cpu").compile("sgd", metrics=["accuracy"], learning_rate=0.1)
    x, y = torch.randn(64, 4), torch.randint(0, 3, (64,))
    distiller.fit(x, y, epochs=2, batch_size=16, verbose=1)
    err = capsys.readouterr().err
    for text in ("epoch 1/2", "epoch 2/2", "4/4", "student_loss=", "distillation_loss=", "accuracy=", "samples/s="):
        assert text in err, text
