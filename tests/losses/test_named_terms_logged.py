"""Every loss with several parts reports them through one path: the terms reach the
History (as ``distillation/<term>``), and with their weights they sum to the logged
distillation loss, alone or inside a WeightedSum."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kdistill import Distiller
from kdistill.losses import CRDLoss, DISTLoss, DKDLoss, KDLoss, RKDLoss, WeightedSum

N, D, C = 64, 8, 10


def _models():
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(D, 32), nn.ReLU(), nn.Linear(32, C))
    student = nn.Sequential(nn.Linear(D, 16), nn.ReLU(), nn.Linear(16, C))
    return teacher, student


LOSSES = {
    "dkd": (lambda: DKDLoss(temperature=4.0), ("DKDLoss/tckd", "DKDLoss/nckd")),
    "dist": (lambda: DISTLoss(), ("DISTLoss/inter", "DISTLoss/intra")),
    "rkd": (lambda: RKDLoss("1", "1"), ("RKDLoss/distance", "RKDLoss/angle")),
    "crd": (lambda: CRDLoss("1", "1", n_data=N, feat_dim=8, nce_k=16), None),
}


def _fit(loss):
    teacher, student = _models()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(N, D, generator=g), torch.randint(0, C, (N,), generator=g)
    d = Distiller(student=student, teacher=teacher, device="cpu")
    d.compile(torch.optim.SGD(student.parameters(), lr=0.01), distillation_loss_fn=loss, alpha=0.5)
    return d.fit(x, y, epochs=2, batch_size=16, seed=0, verbose=0).history


@pytest.mark.parametrize("name", list(LOSSES))
def test_a_multi_term_loss_logs_its_terms_and_they_sum_to_the_total(name):
    make, expected = LOSSES[name]
    loss = make()
    history = _fit(loss)
    terms = sorted(k for k in history if k.startswith("distillation/"))
    assert len(terms) >= 2, f"{name} logged {sorted(history)}"
    if expected is not None:
        assert terms == sorted(f"distillation/{t}" for t in expected)
    for epoch in range(2):
        total = sum(history[t][epoch] for t in terms)
        assert total == pytest.approx(history["distillation_loss"][epoch], rel=1e-5, abs=1e-7)


def test_inside_a_weighted_sum_the_parts_terms_carry_the_part_name_and_weight():
    loss = WeightedSum({"kd": (KDLoss(temperature=4.0), 1.0), "dkd": (DKDLoss(temperature=4.0), 0.5)})
    history = _fit(loss)
    assert {"distillation/kd", "distillation/dkd/tckd", "distillation/dkd/nckd"} <= set(history)
    for epoch in range(2):
        total = history["distillation/kd"][epoch] + history["distillation/dkd/tckd"][epoch] \
            + history["distillation/dkd/nckd"][epoch]
        assert total == pytest.approx(history["distillation_loss"][epoch], rel=1e-5)


def test_the_weighted_terms_of_a_part_are_its_own_terms_times_its_weight():
    from kdistill.outputs import Batch, Outputs

    g = torch.Generator().manual_seed(2)
    s, t = Outputs(torch.randn(6, C, generator=g)), Outputs(torch.randn(6, C, generator=g))
    batch = Batch(torch.zeros(6, D), torch.randint(0, C, (6,), generator=g), torch.arange(6))
    dkd = DKDLoss(temperature=4.0)
    own = dkd.named_terms(s, t, batch)
    mixed = WeightedSum({"dkd": (dkd, 0.25)}).named_terms(s, t, batch)
    assert mixed["dkd/tckd"] == pytest.approx(0.25 * own["DKDLoss/tckd"].item())
    assert mixed["dkd/nckd"] == pytest.approx(0.25 * own["DKDLoss/nckd"].item())
    assert sum(own.values()).item() == pytest.approx(dkd(s, t, batch).item(), rel=1e-5)
