"""What a training step does besides the arithmetic, kept to what a hand-written loop does:
one read of the step's logs (which the NaN check needs anyway), batches already on the
device not copied, what a loader knows about its data not recomputed per batch, and the
epoch's running means made only for callbacks that read them. The numbers logged stay
those of a read per log."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import kdistill.distiller as distiller_module
from kdistill import Distiller, Trainer
from kdistill.callbacks import Callback
from kdistill.data.loader import make_loader
from kdistill.errors import NonFiniteLossError
from kdistill.losses import KDLoss
from kdistill.outputs import Batch


def _data(n=96, d=8, c=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    return x, (x[:, :c] + 0.3 * torch.randn(n, c, generator=g)).argmax(1)


def _mlp(seed=1, d=8, c=4):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, 16), nn.Tanh(), nn.Linear(16, c))


def _trainer(kind, **compile_kw):
    if kind == "trainer":
        return Trainer(_mlp(), device="cpu").compile("adam", metrics=["accuracy"], **compile_kw)
    return Distiller(_mlp(), _mlp(seed=5), device="cpu").compile(
        "adam", metrics=["accuracy"], distillation_loss_fn=KDLoss(temperature=3.0), **compile_kw)


class _Counting:
    """Counts the calls of distiller._to_floats (each is one read of tensors)."""

    def __init__(self, monkeypatch):
        self.calls = 0
        real = distiller_module._to_floats

        def counted(logs):
            self.calls += 1
            return real(logs)

        monkeypatch.setattr(distiller_module, "_to_floats", counted)


@pytest.mark.parametrize("kind", ["trainer", "distiller"])
def test_fit_reads_each_steps_logs_once(kind, monkeypatch):
    x, y = _data()
    t = _trainer(kind)
    reads = _Counting(monkeypatch)
    t.fit(x, y, epochs=2, batch_size=32, verbose=0, seed=0)
    assert reads.calls == 2 * 3  # one per step: the step's read, which fit's logs reuse


@pytest.mark.parametrize("kind", ["trainer", "distiller"])
def test_logs_added_or_replaced_by_a_train_step_of_ones_own_are_read_and_logged(kind):
    x, y = _data()
    seen = []

    class Extra(type(_trainer(kind))):
        def train_step(self, batch):
            logs = super().train_step(batch)
            logs["extra"] = torch.tensor(2.0)  # added after the step's read
            logs["loss"] = torch.tensor(float(len(seen)))  # replaced after it
            seen.append(len(batch))
            return logs

    t = _trainer(kind)
    t.__class__ = Extra
    history = t.fit(x, y, epochs=1, batch_size=32, verbose=0, seed=0)
    assert history.history["extra"] == [2.0]
    assert history.history["loss"] == [pytest.approx((0 * 32 + 1 * 32 + 2 * 32) / 96)]


def test_a_nan_term_still_stops_before_the_optimizer_step_naming_it():
    x, y = _data()
    t = _trainer("distiller")
    before = {k: v.clone() for k, v in t.model.state_dict().items()}
    x = x.clone()
    x[5] = math.nan
    with pytest.raises(NonFiniteLossError, match=r"loss term 'student_loss' is nan at epoch 1, step 1"):
        t.fit(x, y, epochs=1, batch_size=32, shuffle=False, verbose=0)
    assert all(torch.equal(before[k], v) for k, v in t.model.state_dict().items())


def test_batch_to_its_own_device_is_the_batch_and_keeps_what_is_known():
    x, y = _data()
    b = Batch(x[:4], y[:4], torch.arange(4))
    assert b.labelled is None
    assert b.to("cpu") is b and b.to(torch.device("cpu")) is b
    y2 = y[:4].clone()
    y2[1] = -1
    b2 = Batch(x[:4], y2, torch.arange(4))
    assert b2.labelled.tolist() == [True, False, True, True]


@pytest.mark.parametrize("targets, expected", [
    ([0, 3, 1], None),
    ([0, -1, 1], [True, False, True]),
    ([-1, -1], [False, False]),
    ([5, -100, 2], None),  # an ignore index is a label to the loss, not "unlabelled"
    ([], None),
])
def test_labelled_marks_exactly_the_targets_minus_one(targets, expected):
    t = torch.tensor(targets, dtype=torch.long)
    b = Batch(torch.zeros(len(targets), 2), t)
    assert (b.labelled is None if expected is None else b.labelled.tolist() == expected)


@pytest.mark.parametrize("shuffle", [True, False])
def test_the_array_loader_tells_its_batches_what_it_knows(shuffle):
    x, y = _data(n=10)
    g = torch.Generator().manual_seed(0)
    batches = list(make_loader(x, y, batch_size=4, shuffle=shuffle, generator=g))
    assert all(b._labelled is None for b in batches)  # every sample labelled: no look at the targets per batch
    for b in batches:
        assert torch.equal(b.inputs, x[b.index]) and torch.equal(b.targets, y[b.index])
    y2 = y.clone()
    y2[3] = -1
    batches = list(make_loader(x, y2, batch_size=4, shuffle=shuffle, generator=g))
    assert sum(int((~b.labelled).sum()) for b in batches if b.labelled is not None) == 1


def test_running_means_reach_every_callback_that_reads_batch_ends():
    x, y = _data()
    got = {"subclass": [], "instance": []}

    class Sub(Callback):
        def on_train_batch_end(self, step, logs=None):
            got["subclass"].append(dict(logs))

    attached = Callback()
    attached.on_train_batch_end = lambda step, logs=None: got["instance"].append(dict(logs))
    t = _trainer("distiller")
    t.fit(x, y, epochs=1, batch_size=32, verbose=0, seed=0, callbacks=[Sub(), attached])
    assert len(got["subclass"]) == len(got["instance"]) == 3
    assert got["subclass"] == got["instance"]
    assert set(got["subclass"][-1]) == {"loss", "student_loss", "distillation_loss", "accuracy"}


@pytest.mark.parametrize("kind", ["trainer", "distiller"])
def test_a_hand_made_batch_with_unlabelled_samples_trains_as_one_whose_mask_is_known(kind):
    x, y = _data(n=16)
    y = y.clone()
    y[[2, 9]] = -1
    a, b = _trainer(kind), _trainer(kind)
    known = Batch(x, y, torch.arange(16))
    assert known.labelled is not None  # computed before the step
    logs_a = a.train_step(known)
    fresh = Batch(x, y, torch.arange(16))  # the step finds the unlabelled samples itself
    logs_b = b.train_step(fresh)
    assert fresh.labelled.tolist() == (y != -1).tolist()
    assert {k: float(v) for k, v in logs_a.items()} == {k: float(v) for k, v in logs_b.items()}
    assert all(torch.equal(p, q) for p, q in zip(a.model.parameters(), b.model.parameters()))
    with pytest.raises(ValueError, match=r"labels must be class indices in \[0, 4\).*from 0 to 7"):
        b.train_step(Batch(x, torch.where(y == 3, 7, y), torch.arange(16)))
