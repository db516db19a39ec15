"""Resuming a fit from a TrainingCheckpoint ends where an uninterrupted fit ends."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kdistill import Distiller, Trainer
from kdistill.callbacks import CSVLogger, TrainingCheckpoint
from kdistill.checkpoint import read_training_state
from kdistill.errors import CheckpointError

from crashing import Crash, CrashAt


def _data(n=200, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 12, generator=g)
    y = (x[:, :3].sum(1) > 0).long() + (x[:, 3] > 1).long()
    return x, y


def _net(seed=1, dropout=0.2):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Dropout(dropout), nn.Linear(32, 3))


def _noise(x):  # augmentation drawing from the global RNG (restored on resume)
    return x + 0.05 * torch.randn_like(x)


def _trainer(kind: str):
    if kind == "trainer":
        t = Trainer(_net(), device="cpu")
    else:
        teacher = _net(seed=7, dropout=0.0)
        t = Distiller(student=_net(), teacher=teacher, device="cpu")
    t.compile("adam", metrics=["accuracy"], learning_rate=1e-2,
              scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=4, gamma=0.5),
              scheduler_interval="step")
    return t


@pytest.mark.parametrize("kind", ["trainer", "distiller"])
@pytest.mark.parametrize("crash_at", [5, 7, 13])  # mid-epoch, epoch end (7 steps/epoch), later epoch
def test_resume_matches_uninterrupted(tmp_path, kind, crash_at):
    x, y = _data()
    kw = dict(epochs=3, batch_size=32, validation_data=_data(64, seed=3), verbose=0, seed=0, augment=_noise)

    reference = _trainer(kind)
    ref_hist = reference.fit(x, y, **kw)

    path = tmp_path / "last.pt"
    crashed = _trainer(kind)
    with pytest.raises(Crash):
        crashed.fit(x, y, callbacks=[TrainingCheckpoint(path, every_steps=2), CrashAt(crash_at)], **kw)
    saved = read_training_state(path)
    assert saved["global_step"] <= crash_at

    resumed = _trainer(kind)
    csv = tmp_path / "log.csv"
    hist = resumed.fit(x, y, callbacks=[TrainingCheckpoint(path, every_steps=2), CSVLogger(csv)], resume_from=path, **kw)
    assert hist.history == ref_hist.history  # identical per-epoch means, val included
    assert resumed.global_step == reference.global_step
    for a, b in zip(resumed.model.state_dict().values(), reference.model.state_dict().values()):
        assert torch.equal(a, b)
    assert resumed.scheduler.get_last_lr() == reference.scheduler.get_last_lr()
    assert len(csv.read_text().strip().splitlines()) == 1 + 3  # header + every epoch once


def test_resume_with_steps_per_epoch_cycles_the_same_data(tmp_path):
    x, y = _data(100)
    kw = dict(epochs=2, batch_size=32, steps_per_epoch=5, verbose=0, seed=0)
    ref = _trainer("trainer")
    ref.fit(x, y, **kw)
    path = tmp_path / "last.pt"
    crashed = _trainer("trainer")
    with pytest.raises(Crash):
        crashed.fit(x, y, callbacks=[TrainingCheckpoint(path, every_steps=1), CrashAt(7)], **kw)
    resumed = _trainer("trainer")
    resumed.fit(x, y, resume_from=path, **kw)
    for a, b in zip(resumed.model.state_dict().values(), ref.model.state_dict().values()):
        assert torch.equal(a, b)


def test_resume_from_a_truncated_state_is_refused(tmp_path):
    path = tmp_path / "last.pt"
    path.write_bytes(b"PK\x03\x04 not a whole file")
    t = _trainer("trainer")
    x, y = _data()
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        t.fit(x, y, epochs=1, verbose=0, resume_from=path)


def test_resume_into_another_kind_of_trainer_is_refused(tmp_path):
    x, y = _data()
    path = tmp_path / "last.pt"
    _trainer("trainer").fit(x, y, epochs=1, verbose=0, seed=0, callbacks=[TrainingCheckpoint(path)])
    with pytest.raises(ValueError, match="resume with the trainer the state was saved from"):
        _trainer("distiller").fit(x, y, epochs=2, verbose=0, seed=0, resume_from=path)


def test_training_checkpoint_rejects_bad_intervals(tmp_path):
    with pytest.raises(ValueError, match="every_steps"):
        TrainingCheckpoint(tmp_path / "x.pt", every_steps=0)
    with pytest.raises(ValueError, match="every_seconds"):
        TrainingCheckpoint(tmp_path / "x.pt", every_seconds=-1)


def test_scheduler_interval_is_checked():
    t = Trainer(_net(), device="cpu")
    with pytest.raises(ValueError, match="scheduler_interval"):
        t.compile("adam", scheduler=lambda o: torch.optim.lr_scheduler.StepLR(o, 1), scheduler_interval="batch")
