"""The teacher protocol: the Distiller makes the same calls on every teacher kind, a new
kind needs only a Teacher subclass, and a top-k cache learns the losses' temperature from
compile (one explicit call) instead of serving T = 1 logits to a T = 4 loss."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kdistill
from kdistill.losses import HintLoss, KDLoss, WeightedSum, kd_loss
from kdistill.outputs import Batch, Outputs
from kdistill.teacher import LiveTeacher, Teacher, TeacherCache

N, D, C = 64, 6, 5


def _data(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, D, generator=g), torch.randint(0, C, (N,), generator=g)


def _net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(D, 16), nn.ReLU(), nn.Linear(16, C))


class TableTeacher(Teacher):
    """A teacher kind the package does not know: logits looked up in a table (standing for a
    remote service), recording every protocol call."""

    def __init__(self, logits: torch.Tensor):
        self.logits = logits
        self.calls: list[tuple] = []

    def __call__(self, batch: Batch) -> Outputs:
        self.calls.append(("call", len(batch)))
        return Outputs(self.logits[batch.index].to(batch.inputs.device))

    def prepare(self, batch: Batch, epoch: int) -> Batch:
        self.calls.append(("prepare", epoch))
        return batch

    def set_temperatures(self, temperatures) -> None:
        self.calls.append(("temperatures", tuple(temperatures)))


def test_a_new_teacher_kind_is_a_teacher_subclass_and_distils_like_the_live_teacher():
    x, y = _data()
    teacher, student = _net(1), _net(2)
    with torch.no_grad():
        table = TableTeacher(teacher(x))

    def run(t):
        s = copy.deepcopy(student)
        d = kdistill.Distiller(s, teacher=t, device="cpu")
        d.compile(torch.optim.SGD(s.parameters(), lr=0.1), distillation_loss_fn=KDLoss(temperature=4.0), alpha=0.2)
        d.fit(x, y, epochs=2, batch_size=16, seed=0, verbose=0)
        return s.state_dict()

    from_table, from_live = run(table), run(LiveTeacher(teacher, channels_last=False))
    for k in from_live:
        torch.testing.assert_close(from_table[k], from_live[k], rtol=0, atol=1e-6)
    # compile told it the temperature once; every training batch was prepared, then served
    assert table.calls[0] == ("temperatures", (4.0,))
    prepared = [c for c in table.calls if c[0] == "prepare"]
    assert [e for _, e in prepared].count(0) >= 4 and [e for _, e in prepared].count(1) == 4  # 4 batches per epoch
    served = [c for c in table.calls if c[0] == "call"]
    assert len(served) >= 8


def test_an_object_without_the_protocol_is_refused_naming_what_it_lacks():
    class Half:
        def __call__(self, batch):
            return Outputs(torch.zeros(len(batch), C))

        def parameters(self):
            return iter(())

    with pytest.raises(TypeError, match=r"lacks \['prepare', 'set_taps', 'set_temperatures', 'resolve_augment'\]"
                                        r".*Subclass kdistill.teacher.Teacher"):
        kdistill.Distiller(_net(2), teacher=Half(), device="cpu")


def test_the_default_teacher_refuses_taps_and_augmentation_passes_through():
    t = TableTeacher(torch.zeros(N, C))
    t.set_taps([])  # no layers: fine
    with pytest.raises(ValueError, match=r"TableTeacher\(\) serves logits only; the losses read its layers \['0'\]"):
        t.set_taps(["0"])
    aug = object()
    assert t.resolve_augment(aug) is aug and list(t.parameters()) == []


def test_the_frozen_teacher_check_runs_on_the_teacher_the_distiller_trains_with(tmp_path):
    """The cache is passed as teacher=, so compile checks the teacher actually used."""
    x, y = _data()
    teacher, student = _net(1), _net(2)
    cache = TeacherCache.build(teacher, x, tmp_path / "c", dtype="float32", device="cpu")
    d = kdistill.Distiller(student, teacher=cache, device="cpu")
    assert d.teacher is cache
    d.compile(torch.optim.SGD(student.parameters(), lr=0.1))
    live = kdistill.Distiller(student, teacher=teacher, device="cpu")
    with pytest.raises(ValueError, match="the optimizer holds teacher parameters"):
        live.compile(torch.optim.SGD(list(student.parameters()) + list(teacher.parameters()), lr=0.1))


def _topk_cache(tmp_path, teacher, x, **kw):
    return TeacherCache.build(teacher, x, tmp_path / "topk", mode="topk", k=2, dtype="float32", device="cpu", **kw)


def test_compile_tells_a_topk_cache_the_losses_temperature(tmp_path):
    """A top-k cache handed to a Distiller serves logits exact at the loss's T, not at T = 1."""
    x, y = _data()
    teacher = _net(1)
    cache = _topk_cache(tmp_path, teacher, x, tail_temperatures=(4.0,))
    assert cache.temperature == 1.0
    d = kdistill.Distiller(_net(2), teacher=cache, device="cpu")
    d.compile("sgd", distillation_loss_fn=KDLoss(temperature=4.0))
    assert cache.temperature == 4.0
    # the rebuilt distribution at T = 4 keeps the teacher's top-2 probabilities exactly
    index = torch.arange(N)
    with torch.no_grad():
        z = teacher(x)
    top = z.topk(2, -1).indices
    p, p_hat = F.softmax(z / 4, -1), F.softmax(cache(Batch(x, None, index)).logits / 4, -1)
    torch.testing.assert_close(p_hat.gather(-1, top), p.gather(-1, top), rtol=1e-5, atol=1e-7)
    # a WeightedSum of parts at one temperature counts as that temperature
    d.compile("sgd", distillation_loss_fn=WeightedSum({"kd": (KDLoss(temperature=4.0), 1.0)}))
    assert cache.temperature == 4.0
    d.compile("sgd", temperature=1.0)  # the built-in loss at T = 1
    assert cache.temperature == 1.0


def test_a_topk_cache_without_the_losses_temperature_is_refused_at_compile(tmp_path):
    x, _ = _data()
    cache = _topk_cache(tmp_path, _net(1), x)  # only the T = 1 tail stored
    d = kdistill.Distiller(_net(2), teacher=cache, device="cpu")
    with pytest.raises(ValueError, match=r"not at the losses' T=4.*tail_temperatures=\[4.0\]"):
        d.compile("sgd", distillation_loss_fn=KDLoss(temperature=4.0))
    with pytest.raises(ValueError, match=r"the losses use \[2.0, 4.0\]"):
        d.compile("sgd", distillation_loss_fn=WeightedSum({"a": (KDLoss(temperature=2.0), 1.0),
                                                          "b": (KDLoss(temperature=4.0), 1.0)}))


def test_a_full_cache_and_a_feature_loss_need_no_temperature(tmp_path):
    x, y = _data()
    teacher = _net(1)
    cache = TeacherCache.build(teacher, x, tmp_path / "full", dtype="float32", features=["1"], device="cpu")
    d = kdistill.Distiller(_net(2), teacher=cache, device="cpu")
    d.compile("sgd", distillation_loss_fn=KDLoss(temperature=7.0))  # full logits: exact at any T
    d.compile("sgd", distillation_loss_fn=HintLoss("1", "1"))
    d.fit(x, y, epochs=1, batch_size=32, verbose=0)
    with torch.no_grad():
        z = teacher(x[:8])
    served = cache(Batch(x[:8], None, torch.arange(8))).logits
    assert float(kd_loss(served, z, temperature=7.0)) < 1e-6
