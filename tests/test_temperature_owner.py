"""The distillation loss owns its temperature: compile refuses a conflicting value instead
of ignoring it, the Distiller reads it from the loss, and the temperature a Trainer trains
its own softmax at has its own name."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kdistill import Distiller, Trainer
from kdistill.losses import KDLoss, WeightedSum
from kdistill.outputs import Batch


def _pair():
    torch.manual_seed(0)
    return nn.Linear(4, 3), nn.Linear(4, 3)


def test_a_conflicting_temperature_is_refused_not_ignored():
    teacher, student = _pair()
    d = Distiller(student=student, teacher=teacher, device="cpu")
    with pytest.raises(ValueError, match=r"compile\(temperature=10\) conflicts with .*KDLoss\(temperature=4\).*"
                                         r"the loss owns its temperature"):
        d.compile(torch.optim.SGD(student.parameters(), lr=0.1), distillation_loss_fn=KDLoss(temperature=4.0),
                  temperature=10)


def test_the_distiller_reads_its_temperature_from_the_loss():
    teacher, student = _pair()
    d = Distiller(student=student, teacher=teacher, device="cpu")
    d.compile(torch.optim.SGD(student.parameters(), lr=0.1), distillation_loss_fn=KDLoss(temperature=4.0))
    assert d.temperature == 4.0  # was 1.0: the Trainer's own softmax temperature under the same name
    d.compile(torch.optim.SGD(student.parameters(), lr=0.1), distillation_loss_fn=KDLoss(temperature=4.0),
              temperature=4.0)  # the same value is fine
    assert d.temperature == 4.0 and d.train_temperature == 1.0
    d.compile(torch.optim.SGD(student.parameters(), lr=0.1), temperature=7.0)  # the built-in loss takes it
    assert d.temperature == 7.0
    d.compile(torch.optim.SGD(student.parameters(), lr=0.1))
    assert d.temperature == 3.0  # the Keras example's default
    d.compile(torch.optim.SGD(student.parameters(), lr=0.1),
              distillation_loss_fn=WeightedSum({"kd": (KDLoss(temperature=2.0), 1.0)}))
    assert d.temperature is None  # several losses: each its own


def test_a_trainer_trains_its_softmax_at_train_temperature():
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    t = Trainer(model, device="cpu").compile(torch.optim.SGD(model.parameters(), lr=0.0), temperature=2.0)
    assert t.train_temperature == 2.0 and not hasattr(t, "temperature")
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    logs = t.train_step(Batch(x, y))
    with torch.no_grad():
        expected = nn.functional.cross_entropy(model(x) / 2.0, y)
    assert float(logs["loss"]) == pytest.approx(float(expected), rel=1e-6)
