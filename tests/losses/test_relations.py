"""Relation losses (SP, RKD, PKT, CC), each checked against its paper's formula computed
independently in float64 NumPy with explicit loops, plus the invariances the papers
claim, gradients, the module contract and the errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from kdistill.losses.relations import (
    CCLoss,
    PKTLoss,
    RKDLoss,
    SPLoss,
    cc_loss,
    pkt_loss,
    rkd_angle_loss,
    rkd_distance_loss,
    rkd_loss,
    sp_loss,
)
from kdistill.outputs import Batch, Outputs

# --------------------------------------------------------------------------- references (float64, loops)


def flat(x: torch.Tensor) -> np.ndarray:
    return x.detach().double().reshape(x.shape[0], -1).numpy()


def huber(a: float, b: float) -> float:
    d = abs(a - b)
    return 0.5 * d * d if d < 1.0 else d - 0.5


def sp_ref(s: torch.Tensor, t: torch.Tensor) -> float:
    """Tung & Mori: G = row-normalised Q Q^T; ||G_t - G_s||_F^2 / b^2."""
    def g(q):
        b = q.shape[0]
        gt = np.array([[float(np.dot(q[i], q[j])) for j in range(b)] for i in range(b)])
        return np.array([row / math.sqrt(sum(v * v for v in row)) for row in gt])

    qs, qt = flat(s), flat(t)
    b = qs.shape[0]
    diff = g(qt) - g(qs)
    return float(sum(diff[i, j] ** 2 for i in range(b) for j in range(b)) / b**2)


def rkd_distance_ref(s: torch.Tensor, t: torch.Tensor) -> float:
    """Park et al.: psi_D = ||x_i - x_j|| / mu, mu = mean over i != j; mean Huber over all pairs."""
    def psi(x):
        b = x.shape[0]
        d = np.array([[math.sqrt(sum((x[i] - x[j]) ** 2)) for j in range(b)] for i in range(b)])
        mu = sum(d[i, j] for i in range(b) for j in range(b) if i != j) / (b * (b - 1))
        return d / mu

    ds, dt = psi(flat(s)), psi(flat(t))
    b = ds.shape[0]
    return sum(huber(dt[i, j], ds[i, j]) for i in range(b) for j in range(b)) / b**2


def rkd_angle_ref(s: torch.Tensor, t: torch.Tensor) -> float:
    """Park et al.: cos of the angle at x_j of (x_i, x_j, x_k) = <e_ij, e_kj>; 0 for degenerate triplets."""
    def psi(x):
        b = x.shape[0]
        out = np.zeros((b, b, b))
        for i in range(b):
            for j in range(b):
                for k in range(b):
                    if i == j or k == j:
                        continue
                    e_ij = (x[i] - x[j]) / math.sqrt(sum((x[i] - x[j]) ** 2))
                    e_kj = (x[k] - x[j]) / math.sqrt(sum((x[k] - x[j]) ** 2))
                    out[i, j, k] = float(np.dot(e_ij, e_kj))
        return out

    a_s, a_t = psi(flat(s)), psi(flat(t))
    b = a_s.shape[0]
    return sum(huber(a_t[i, j, k], a_s[i, j, k]) for i in range(b) for j in range(b) for k in range(b)) / b**3


def pkt_ref(s: torch.Tensor, t: torch.Tensor, eps: float = 1e-7) -> float:
    """Passalis & Tefas (authors' code): cosine kernel (1 + cos)/2, rows -> probabilities,
    mean over i, j of p log((p + eps)/(q + eps))."""
    def probs(x):
        b = x.shape[0]
        x = np.array([row / (math.sqrt(sum(row * row)) + eps) for row in x])
        k = np.array([[(float(np.dot(x[i], x[j])) + 1.0) / 2.0 for j in range(b)] for i in range(b)])
        return np.array([row / sum(row) for row in k])

    q, p = probs(flat(s)), probs(flat(t))
    b = p.shape[0]
    return sum(p[i, j] * math.log((p[i, j] + eps) / (q[i, j] + eps)) for i in range(b) for j in range(b)) / b**2


def cc_ref(s: torch.Tensor, t: torch.Tensor, gamma: float = 0.4, order: int = 2) -> float:
    """Peng et al.: k(a, b) = sum_p exp(-2g) (2g)^p / p! (a.b)^p on unit rows; ||K_t - K_s||_F^2 / n^2."""
    def corr(x):
        b = x.shape[0]
        x = np.array([row / math.sqrt(sum(row * row)) for row in x])
        k = np.zeros((b, b))
        for i in range(b):
            for j in range(b):
                c = float(np.dot(x[i], x[j]))
                k[i, j] = sum(
                    math.exp(-2 * gamma) * (2 * gamma) ** p / math.factorial(p) * c**p for p in range(order + 1)
                )
        return k

    ks, kt = corr(flat(s)), corr(flat(t))
    b = ks.shape[0]
    return sum((kt[i, j] - ks[i, j]) ** 2 for i in range(b) for j in range(b)) / b**2


# --------------------------------------------------------------------------- data


def feats(*shape, seed=0, dtype=torch.float64, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def pair(b=6):
    """Student (B, 3, 2, 2) maps and teacher (B, 7) vectors: different ranks and widths."""
    return feats(b, 3, 2, 2, seed=1), feats(b, 7, seed=2, scale=3.0)


def outputs(s: torch.Tensor, t: torch.Tensor) -> tuple[Outputs, Outputs, Batch]:
    b = s.shape[0]
    return (
        Outputs(torch.zeros(b, 3), {"s.layer": s}),
        Outputs(torch.zeros(b, 3), {"t.layer": t}),
        Batch(torch.zeros(b, 1), torch.zeros(b, dtype=torch.long), torch.arange(b)),
    )


FUNCTIONS = {
    "sp": (sp_loss, sp_ref),
    "rkd_distance": (rkd_distance_loss, rkd_distance_ref),
    "rkd_angle": (rkd_angle_loss, rkd_angle_ref),
    "pkt": (pkt_loss, pkt_ref),
    "cc": (cc_loss, cc_ref),
}


# --------------------------------------------------------------------------- formulas


@pytest.mark.parametrize("name", list(FUNCTIONS))
def test_matches_the_papers_formula(name):
    fn, ref = FUNCTIONS[name]
    s, t = pair()
    expected = ref(s, t)
    assert expected > 1e-4  # not trivially zero
    value = fn(s, t)
    assert value.dim() == 0 and value.dtype == torch.float64
    assert value.item() == pytest.approx(expected, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("name", list(FUNCTIONS))
def test_float32_close_to_float64_reference(name):
    fn, ref = FUNCTIONS[name]
    s, t = pair()
    value = fn(s.float(), t.float())
    assert value.dtype == torch.float32
    assert value.item() == pytest.approx(ref(s, t), rel=1e-4, abs=1e-7)


def test_half_precision_is_computed_in_float32():
    s, t = pair()
    value = sp_loss(s.half(), t.half())
    assert value.dtype == torch.float32 and math.isfinite(value.item())


def test_rkd_combines_with_the_papers_weights():
    s, t = pair()
    assert rkd_loss(s, t).item() == pytest.approx(25 * rkd_distance_ref(s, t) + 50 * rkd_angle_ref(s, t), rel=1e-9)
    assert rkd_loss(s, t, 1.0, 0.0).item() == pytest.approx(rkd_distance_ref(s, t), rel=1e-9)


def test_cc_taylor_form_approaches_the_exact_rbf_kernel():
    from kdistill.losses.relations import taylor_rbf_correlation

    x = feats(5, 4, seed=3)
    xn = x / x.norm(dim=1, keepdim=True)
    exact = torch.exp(-0.4 * torch.cdist(xn, xn).pow(2))
    assert torch.allclose(taylor_rbf_correlation(x, 0.4, 20), exact, atol=1e-12)
    assert not torch.allclose(taylor_rbf_correlation(x, 0.4, 2), exact, atol=1e-3)  # order 2 is an approximation
    assert cc_loss(x, x * 5).item() == pytest.approx(0.0, abs=1e-15)
    assert cc_loss(feats(5, 4, seed=4), x, gamma=1.0, order=3).item() == pytest.approx(
        cc_ref(feats(5, 4, seed=4), x, 1.0, 3), rel=1e-9
    )


# --------------------------------------------------------------------------- invariances


def test_sp_invariant_to_scaling_either_side():
    s, t = pair()
    base = sp_loss(s, t).item()
    assert sp_loss(s, 123.0 * t).item() == pytest.approx(base, rel=1e-10)
    assert sp_loss(0.01 * s, t).item() == pytest.approx(base, rel=1e-10)


def test_rkd_distance_invariant_to_scaling_and_translation_of_the_teacher():
    s, t = pair()
    base = rkd_distance_loss(s, t).item()
    assert rkd_distance_loss(s, 37.0 * t).item() == pytest.approx(base, rel=1e-9)
    assert rkd_distance_loss(s, t + 10.0).item() == pytest.approx(base, rel=1e-9)


def test_rkd_angle_invariant_to_translation_and_scaling():
    s, t = pair()
    base = rkd_angle_loss(s, t).item()
    assert rkd_angle_loss(s, t - 4.0).item() == pytest.approx(base, rel=1e-9)
    assert rkd_angle_loss(s + 2.5, t).item() == pytest.approx(base, rel=1e-9)
    assert rkd_angle_loss(s, 0.1 * t).item() == pytest.approx(base, rel=1e-9)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_pkt_is_zero_when_student_equals_teacher(dtype):
    x = feats(8, 5, seed=5, dtype=dtype)
    assert abs(pkt_loss(x, x.clone()).item()) < 1e-7
    assert pkt_loss(x, feats(8, 5, seed=6, dtype=dtype)).item() > 1e-4


@pytest.mark.parametrize("name", list(FUNCTIONS))
def test_zero_when_student_equals_teacher(name):
    fn, _ = FUNCTIONS[name]
    x = feats(6, 5, seed=7)
    assert abs(fn(x, x.clone()).item()) < 1e-12


@pytest.mark.parametrize("name", list(FUNCTIONS))
def test_single_sample_batch_has_no_relations(name):
    fn, _ = FUNCTIONS[name]
    s = feats(1, 4, seed=8).requires_grad_()
    value = fn(s, feats(1, 3, seed=9))
    assert value.item() == 0.0
    value.backward()
    assert torch.isfinite(s.grad).all()


# --------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("name", list(FUNCTIONS))
def test_gradients_reach_the_student_features(name):
    fn, _ = FUNCTIONS[name]
    s, t = pair()
    s = s.clone().requires_grad_()
    fn(s, t).backward()
    assert s.grad is not None and torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0


@pytest.mark.parametrize("name", list(FUNCTIONS))
def test_gradcheck_float64(name):
    fn, _ = FUNCTIONS[name]
    s = feats(4, 3, seed=10).requires_grad_()
    t = feats(4, 5, seed=11)
    assert torch.autograd.gradcheck(lambda x: fn(x, t), (s,))


def test_coincident_points_have_finite_gradients():
    s = feats(4, 3, seed=12)
    s = torch.cat([s, s[:1]]).requires_grad_()  # a duplicated sample: zero distance off the diagonal
    t = feats(5, 3, seed=13)
    (rkd_loss(s, t) + sp_loss(s, t) + pkt_loss(s, t) + cc_loss(s, t)).backward()
    assert torch.isfinite(s.grad).all()


# --------------------------------------------------------------------------- modules

MODULES = {
    "sp": (lambda: SPLoss("s.layer", "t.layer"), lambda s, t: 3000.0 * sp_ref(s, t)),
    "rkd": (
        lambda: RKDLoss("s.layer", "t.layer"),
        lambda s, t: 25.0 * rkd_distance_ref(s, t) + 50.0 * rkd_angle_ref(s, t),
    ),
    "pkt": (lambda: PKTLoss("s.layer", "t.layer"), lambda s, t: 30000.0 * pkt_ref(s, t)),
    "cc": (lambda: CCLoss("s.layer", "t.layer"), lambda s, t: 0.02 * cc_ref(s, t)),
}


@pytest.mark.parametrize("name", list(MODULES))
def test_module_uses_repdistiller_defaults_and_the_formula(name):
    make, ref = MODULES[name]
    loss = make()
    assert loss.taps == {"student": "s.layer", "teacher": "t.layer"}
    assert loss.nonnegative is True
    s, t = pair()
    value = loss(*outputs(s, t))
    assert value.item() == pytest.approx(ref(s, t), rel=1e-9)
    terms = loss.named_terms(*outputs(s, t))
    assert sum(v.item() for v in terms.values()) == pytest.approx(value.item(), rel=1e-12)


def test_module_weights():
    s, t = pair()
    assert SPLoss("s.layer", "t.layer").weight == 3000.0
    assert PKTLoss("s.layer", "t.layer").weight == 30000.0
    assert CCLoss("s.layer", "t.layer").weight == 0.02
    rkd = RKDLoss("s.layer", "t.layer")
    assert (rkd.weight, rkd.distance_weight, rkd.angle_weight) == (1.0, 25.0, 50.0)
    assert SPLoss("s.layer", "t.layer", weight=2.0)(*outputs(s, t)).item() == pytest.approx(2 * sp_ref(s, t), rel=1e-9)


def test_rkd_named_terms():
    s, t = pair()
    loss = RKDLoss("s.layer", "t.layer", weight=2.0)
    total, named = loss(*outputs(s, t)), loss.named_terms(*outputs(s, t))
    assert set(named) == {"RKDLoss/distance", "RKDLoss/angle"}
    assert named["RKDLoss/distance"].item() == pytest.approx(2 * 25 * rkd_distance_ref(s, t), rel=1e-9)
    assert named["RKDLoss/angle"].item() == pytest.approx(2 * 50 * rkd_angle_ref(s, t), rel=1e-9)
    assert total.item() == pytest.approx(sum(v.item() for v in named.values()), rel=1e-12)


@pytest.mark.parametrize("name", list(MODULES))
def test_module_accepts_teacher_features_from_inference_mode(name):
    make, _ = MODULES[name]
    s, t = pair()
    with torch.inference_mode():
        t = t * 1.0
    s = s.clone().requires_grad_()
    make()(*outputs(s, t)).backward()
    assert torch.isfinite(s.grad).all()


@pytest.mark.parametrize("name", list(MODULES))
def test_missing_tap_names_what_is_there(name):
    make, _ = MODULES[name]
    s, t = pair()
    student, teacher, batch = outputs(s, t)
    with pytest.raises(KeyError, match="t.layer"):
        make()(student, Outputs(teacher.logits, {"other": t}), batch)


def test_batch_size_mismatch_is_explained():
    with pytest.raises(ValueError, match="same batch"):
        sp_loss(feats(4, 3), feats(5, 3))
    with pytest.raises(ValueError, match="batch axis"):
        rkd_loss(feats(4), feats(4, 3))


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: SPLoss("a", "b", weight=-1.0), "weight"),
        (lambda: PKTLoss("a", "b", weight=float("nan")), "weight"),
        (lambda: RKDLoss("a", "b", angle_weight=-2), "angle_weight"),
        (lambda: CCLoss("a", "b", gamma=0.0), "gamma"),
        (lambda: CCLoss("a", "b", order=-1), "order"),
        (lambda: CCLoss("a", "b", order=1.5), "order"),
        (lambda: CCLoss("a", "b", embed_dim=0), "embed_dim"),
        (lambda: SPLoss("", "b"), "student_layer"),
        (lambda: RKDLoss("a", None), "teacher_layer"),
    ],
)
def test_bad_arguments(make, match):
    with pytest.raises(ValueError, match=match):
        make()


# --------------------------------------------------------------------------- CC with embedding heads


def test_cc_embedding_heads_are_built_in_setup_and_trained():
    s, t = pair()
    loss = CCLoss("s.layer", "t.layer", embed_dim=4)
    student, teacher, batch = outputs(s, t)
    with pytest.raises(RuntimeError, match="setup"):
        loss(student, teacher, batch)
    loss.setup(student, teacher)
    assert (loss.embed_s.in_features, loss.embed_s.out_features) == (12, 4)
    assert (loss.embed_t.in_features, loss.embed_t.out_features) == (7, 4)
    assert loss.embed_s.weight.dtype == torch.float64
    expected = 0.02 * cc_ref(loss.embed_s(s.reshape(6, -1)), loss.embed_t(t))
    s_req = s.clone().requires_grad_()
    with torch.inference_mode():  # the Distiller's teacher runs in inference mode
        t_inf = t * 1.0
    value = loss(*outputs(s_req, t_inf))
    assert value.item() == pytest.approx(expected, rel=1e-9)
    value.backward()
    for p in (*loss.embed_s.parameters(), *loss.embed_t.parameters(), s_req):
        assert p.grad is not None and p.grad.abs().sum() > 0
    loss.setup(student, teacher)  # again with the same sizes: the heads are kept
    with pytest.raises(ValueError, match="set up for features"):
        loss.setup(*outputs(feats(6, 5), t)[:2])


def test_cc_without_embedding_has_no_parameters():
    loss = CCLoss("s.layer", "t.layer")
    loss.setup(*outputs(*pair())[:2])
    assert list(loss.parameters()) == []


# --------------------------------------------------------------------------- in a Distiller


def test_trains_inside_a_distiller():
    from kdistill import Distiller
    from kdistill.losses import WeightedSum

    torch.manual_seed(0)
    teacher = nn.Sequential()
    teacher.add_module("body", nn.Sequential(nn.Linear(6, 16), nn.ReLU()))
    teacher.add_module("head", nn.Linear(16, 3))
    student = nn.Sequential()
    student.add_module("body", nn.Sequential(nn.Linear(6, 8), nn.ReLU()))
    student.add_module("head", nn.Linear(8, 3))
    loss = WeightedSum({
        "sp": (SPLoss("body", "body"), 1.0),
        "rkd": (RKDLoss("body", "body"), 1.0),
        "pkt": (PKTLoss("body", "body"), 1.0),
        "cc": (CCLoss("body", "body", embed_dim=4), 1.0),
    })
    distiller = Distiller(student=student, teacher=teacher, device="cpu")
    distiller.compile(optimizer=torch.optim.SGD(student.parameters(), lr=0.01), distillation_loss_fn=loss, alpha=0.5)
    x = torch.randn(40, 6)
    y = torch.randint(0, 3, (40,))
    history = distiller.fit(x, y, epochs=1, batch_size=16, verbose=0)  # last batch has 8 samples
    assert math.isfinite(history.history["loss"][-1])
    params = {id(p) for g in distiller.optimizer.param_groups for p in g["params"]}
    assert all(id(p) in params for p in loss.parts["cc"].parameters())
