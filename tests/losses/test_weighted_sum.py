"""WeightedSum: the total is the weighted sum of its parts, each part is a named term,
and the Distiller logs those terms."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from kdistill import Distiller
from kdistill.losses import DistillationLoss, KDLoss, WeightedSum
from kdistill.outputs import Batch, Outputs
from user_components import CosineLogits


def hinton_kd(zs: torch.Tensor, zt: torch.Tensor, temperature: float) -> float:
    """T^2 * (1/B) * sum_i sum_c p_t log(p_t / p_s), p = softmax(z / T), by loops in float64."""
    zs, zt = zs.double(), zt.double()
    total = 0.0
    for i in range(zs.shape[0]):
        es = [math.exp(v / temperature) for v in zs[i].tolist()]
        et = [math.exp(v / temperature) for v in zt[i].tolist()]
        ps = [e / sum(es) for e in es]
        pt = [e / sum(et) for e in et]
        total += sum(t * (math.log(t) - math.log(s)) for t, s in zip(pt, ps))
    return temperature ** 2 * total / zs.shape[0]


def cosine_ref(zs: torch.Tensor, zt: torch.Tensor, scale: float) -> float:
    vals = []
    for s, t in zip(zs.double().tolist(), zt.double().tolist()):
        dot = sum(a * b for a, b in zip(s, t))
        ns, nt = math.sqrt(sum(a * a for a in s)), math.sqrt(sum(b * b for b in t))
        vals.append(1 - dot / (ns * nt))
    return scale * sum(vals) / len(vals)


@pytest.fixture
def pair():
    g = torch.Generator().manual_seed(0)
    zs = torch.randn(5, 4, generator=g) * 2
    zt = torch.randn(5, 4, generator=g) * 2
    batch = Batch(torch.zeros(5, 3), torch.zeros(5, dtype=torch.long))
    return Outputs(zs), Outputs(zt), batch


def test_total_is_the_weighted_sum_of_independently_computed_parts(pair):
    student, teacher, batch = pair
    loss = WeightedSum({"kd4": (KDLoss(4.0), 0.7), "kd1": (KDLoss(1.0), 0.2), "cos": (CosineLogits(2.0), 1.5)})
    expected = (0.7 * hinton_kd(student.logits, teacher.logits, 4.0)
                + 0.2 * hinton_kd(student.logits, teacher.logits, 1.0)
                + 1.5 * cosine_ref(student.logits, teacher.logits, 2.0))
    total = loss(student, teacher, batch)
    assert total.dim() == 0
    assert total.item() == pytest.approx(expected, rel=1e-5)


def test_kd_reference_is_not_trivial(pair):
    # guard: the reference and the loss would agree trivially on identical logits
    student, teacher, _ = pair
    assert hinton_kd(student.logits, teacher.logits, 4.0) > 0.01
    assert hinton_kd(teacher.logits, teacher.logits, 4.0) == pytest.approx(0.0, abs=1e-12)


def test_named_terms_keys_and_weighted_values(pair):
    student, teacher, batch = pair
    loss = WeightedSum({"kd": (KDLoss(3.0), 0.5), "cosine": (CosineLogits(1.0), 2.0)})
    terms = loss.named_terms(student, teacher, batch)
    assert list(terms) == ["kd", "cosine"]
    assert terms["kd"].item() == pytest.approx(0.5 * hinton_kd(student.logits, teacher.logits, 3.0), rel=1e-5)
    assert terms["cosine"].item() == pytest.approx(2.0 * cosine_ref(student.logits, teacher.logits, 1.0), rel=1e-5)
    assert loss(student, teacher, batch).item() == pytest.approx(sum(t.item() for t in terms.values()), rel=1e-6)
    assert loss.weights == {"kd": 0.5, "cosine": 2.0}


def test_zero_weight_term_is_zero_and_still_named(pair):
    student, teacher, batch = pair
    loss = WeightedSum({"kd": (KDLoss(2.0), 1.0), "off": (CosineLogits(), 0.0)})
    terms = loss.named_terms(student, teacher, batch)
    assert terms["off"].item() == 0.0
    assert loss(student, teacher, batch).item() == pytest.approx(hinton_kd(student.logits, teacher.logits, 2.0), rel=1e-5)


def test_gradient_flows_to_the_student_logits(pair):
    student, teacher, batch = pair
    zs = student.logits.clone().requires_grad_(True)
    loss = WeightedSum({"kd": (KDLoss(2.0), 0.3), "cos": (CosineLogits(), 0.7)})
    loss(Outputs(zs), teacher, batch).backward()
    assert zs.grad is not None and zs.grad.abs().sum() > 0


def test_parts_are_submodules():
    kd = KDLoss(2.0)
    loss = WeightedSum({"kd": (kd, 1.0)})
    assert loss.parts["kd"] is kd
    assert any(m is kd for m in loss.modules())
    assert "kd: weight 1.0" in repr(loss)


@pytest.mark.parametrize("weight", [-0.5, -1e-9, float("nan")])
def test_negative_or_nan_weight_rejected(weight):
    with pytest.raises(ValueError, match=r"the weight of loss 'kd' must be >= 0"):
        WeightedSum({"kd": (KDLoss(), weight)})


@pytest.mark.parametrize("bad", [nn.MSELoss(), lambda s, t, b: 0.0, "kd"])
def test_non_distillation_loss_rejected(bad):
    with pytest.raises(TypeError, match=r"loss 'mine' is a \w+, not a DistillationLoss"):
        WeightedSum({"kd": (KDLoss(), 1.0), "mine": (bad, 1.0)})


def test_empty_rejected():
    with pytest.raises(ValueError, match="at least one loss"):
        WeightedSum({})


def test_nonnegative_only_when_every_part_is():
    class Signed(DistillationLoss):
        nonnegative = False

        def forward(self, student, teacher, batch):
            return (student.logits - teacher.logits).mean()

    assert WeightedSum({"kd": (KDLoss(), 1.0), "cos": (CosineLogits(), 1.0)}).nonnegative is True
    assert WeightedSum({"kd": (KDLoss(), 1.0), "signed": (Signed(), 1.0)}).nonnegative is False


# --------------------------------------------------------------------------- in the Distiller


def tiny_distiller(loss: DistillationLoss, alpha: float = 0.25):
    torch.manual_seed(0)
    student = nn.Linear(6, 3)
    teacher = nn.Linear(6, 3)
    d = Distiller(student=student, teacher=teacher, device="cpu")
    d.compile(torch.optim.SGD(student.parameters(), lr=0.1), distillation_loss_fn=loss, alpha=alpha)
    g = torch.Generator().manual_seed(1)
    batch = Batch(torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g))
    return d, student, teacher, batch


def test_distiller_logs_each_part_and_their_sum():
    loss = WeightedSum({"kd": (KDLoss(3.0), 0.6), "cosine": (CosineLogits(2.0), 0.4)})
    d, student, teacher, batch = tiny_distiller(loss, alpha=0.25)
    before = copy.deepcopy(student)
    with torch.no_grad():
        zs, zt = before(batch.inputs), teacher(batch.inputs)
    ce = nn.functional.cross_entropy(zs, batch.targets).item()

    logs = d.train_step(batch)

    assert {"loss", "student_loss", "distillation_loss", "distillation/kd", "distillation/cosine"} <= set(logs)
    kd = logs["distillation/kd"].item()
    cos = logs["distillation/cosine"].item()
    # each term is the weighted part, computed from the weights before the step
    assert kd == pytest.approx(0.6 * hinton_kd(zs, zt, 3.0), rel=1e-5)
    assert cos == pytest.approx(0.4 * cosine_ref(zs, zt, 2.0), rel=1e-5)
    assert logs["distillation_loss"].item() == pytest.approx(kd + cos, rel=1e-6)
    assert logs["student_loss"].item() == pytest.approx(ce, rel=1e-5)
    assert logs["loss"].item() == pytest.approx(0.25 * ce + 0.75 * (kd + cos), rel=1e-5)
    # the step trained the student, not the teacher
    assert not torch.equal(student.weight, before.weight)
    for v in logs.values():
        assert not v.requires_grad


def test_distiller_logs_no_parts_for_a_single_loss():
    d, _, _, batch = tiny_distiller(WeightedSum({"kd": (KDLoss(3.0), 0.5)}))
    logs = d.train_step(batch)
    assert not any(k.startswith("distillation/") for k in logs)
    assert "distillation_loss" in logs

    d, _, _, batch = tiny_distiller(KDLoss(3.0))
    logs = d.train_step(batch)
    assert not any(k.startswith("distillation/") for k in logs)


def test_distiller_fit_history_has_the_parts():
    loss = WeightedSum({"kd": (KDLoss(2.0), 1.0), "cosine": (CosineLogits(), 0.5)})
    d, _, _, _ = tiny_distiller(loss)
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(32, 6, generator=g), torch.randint(0, 3, (32,), generator=g)
    history = d.fit(x, y, epochs=2, batch_size=8, verbose=0)
    h = history.history
    for key in ("distillation/kd", "distillation/cosine", "distillation_loss"):
        assert len(h[key]) == 2
    # epoch means of the parts add up to the epoch mean of their sum
    for e in range(2):
        assert h["distillation_loss"][e] == pytest.approx(h["distillation/kd"][e] + h["distillation/cosine"][e], rel=1e-5)
