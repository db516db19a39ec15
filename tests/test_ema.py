"""The EMA callback: the model ends with the exponential moving average of its weights over
the optimizer steps, computed independently here; bad settings are refused."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from kdistill import Distiller, Trainer
from kdistill.callbacks import EMA, Callback

from crashing import Crash, CrashAt


def _data(n: int = 48, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=g), torch.randint(0, 3, (n,), generator=g)


class Record(Callback):
    """The weights after every optimizer step (runs before the EMA callback)."""

    def __init__(self):
        self.steps: list[dict[str, torch.Tensor]] = []

    def on_train_batch_end(self, step, logs=None):
        self.steps.append({k: v.detach().clone() for k, v in self.trainer.model.state_dict().items()})


def _expected(steps, decay, start_step=0):
    avg = None
    for i, w in enumerate(steps, start=1):
        if avg is None or i <= start_step:
            avg = {k: v.clone() for k, v in w.items()}
        else:
            avg = {k: decay * avg[k] + (1 - decay) * w[k] for k in w}
    return avg


@pytest.mark.parametrize("start_step", [0, 3])
def test_the_model_ends_with_the_moving_average_of_its_weights(start_step):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
    record, ema = Record(), EMA(decay=0.8, start_step=start_step)
    x, y = _data()
    Trainer(model, device="cpu").compile(torch.optim.SGD(model.parameters(), lr=0.5)).fit(
        x, y, epochs=2, batch_size=16, verbose=0, callbacks=[record, ema])
    assert len(record.steps) == 6
    expected = _expected(record.steps, 0.8, start_step)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, expected[k], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(model[0].weight, record.steps[-1]["0.weight"])  # not the last raw weights


def test_a_distilled_student_is_evaluated_with_its_average():
    torch.manual_seed(1)
    teacher = nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 3))
    student = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3))
    raw = copy.deepcopy(student)
    x, y = _data()
    d = Distiller(student, teacher=teacher, device="cpu").compile("adam", temperature=2.0)
    record = Record()
    d.fit(x, y, epochs=2, batch_size=16, verbose=0, callbacks=[record, EMA(decay=0.5)])
    raw.load_state_dict(record.steps[-1])
    averaged = _expected(record.steps, 0.5)
    assert all(torch.allclose(student.state_dict()[k], averaged[k], atol=1e-6) for k in averaged)
    loss_avg = d.evaluate(x, y)["loss"]
    with torch.no_grad():
        loss_raw = float(nn.functional.cross_entropy(raw(x), y))
    assert loss_avg != pytest.approx(loss_raw)  # evaluate ran the averaged weights


@pytest.mark.parametrize("kwargs, message", [({"decay": 1.0}, r"decay must be in \[0, 1\)"),
                                             ({"decay": -0.1}, r"decay must be in \[0, 1\)"),
                                             ({"start_step": -1}, "start_step must be a non-negative integer")])
def test_bad_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        EMA(**kwargs)


@pytest.mark.parametrize("crash_at", [2, 4, 5])  # mid-epoch, at an epoch's end (3 steps an epoch), later
def test_a_resumed_fit_continues_the_same_average(tmp_path, crash_at):
    from kdistill.callbacks import TrainingCheckpoint

    def fresh():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
        return model, Trainer(model, device="cpu").compile(torch.optim.SGD(model.parameters(), lr=0.5))

    x, y = _data()
    kw = dict(epochs=3, batch_size=16, verbose=0, seed=0)
    ref_model, ref = fresh()
    ref.fit(x, y, callbacks=[EMA(decay=0.7)], **kw)
    state = tmp_path / "last.pt"
    model, t = fresh()
    with pytest.raises(Crash):
        t.fit(x, y, callbacks=[EMA(decay=0.7), TrainingCheckpoint(state, every_steps=1), CrashAt(crash_at)], **kw)
    model, t = fresh()  # a new process: new model, new callbacks
    t.fit(x, y, callbacks=[EMA(decay=0.7), TrainingCheckpoint(state, every_steps=1)], resume_from=state, **kw)
    for k, v in ref_model.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
