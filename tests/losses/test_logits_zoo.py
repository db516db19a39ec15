"""The logit zoo (DKD, DIST, logit standardisation, reverse KL, Jensen-Shannon), each checked
against its paper's formula computed independently here, in float64 Python loops."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from kdistill import Distiller
from kdistill.losses.logits import (
    DISTLoss,
    DKDLoss,
    JSDivergenceLoss,
    LogitStandardKDLoss,
    ReverseKLLoss,
    dist_loss,
    dkd_loss,
    js_divergence_loss,
    kd_loss,
    ls_kd_loss,
    reverse_kl_loss,
    standardize_logits,
)
from kdistill.outputs import Batch, Outputs

TEMPERATURES = [1.0, 2.5, 4.0]


# --------------------------------------------------------------------------- reference
# Plain Python floats (float64), one sample and one class at a time: nothing here calls
# the code under test or shares its vectorised tricks.


def rows(z: torch.Tensor) -> list[list[float]]:
    """(B, C) or (B, T, V) -> a list of rows of Python floats (positions flattened)."""
    return z.detach().to(torch.float64).reshape(-1, z.shape[-1]).tolist()


def softmax(row: list[float], temperature: float) -> list[float]:
    top = max(row)
    e = [math.exp((x - top) / temperature) for x in row]
    total = sum(e)
    return [x / total for x in e]


def kl(p: list[float], q: list[float]) -> float:
    """sum_c p_c log(p_c / q_c), with 0 log 0 = 0."""
    return sum(pc * math.log(pc / qc) for pc, qc in zip(p, q) if pc > 0)


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def ref_dkd(zs, zt, targets, alpha, beta, temperature) -> float:
    """Zhao et al. 2022, Eq. 7: T^2 * mean(alpha * KL(b_t||b_s) + beta * KL(p^_t||p^_s))."""
    per = []
    for s_row, t_row, label in zip(rows(zs), rows(zt), targets):
        g = t_row.index(max(t_row)) if label == -1 else label  # unlabelled: teacher's argmax
        ps, pt = softmax(s_row, temperature), softmax(t_row, temperature)
        rest_s = sum(p for c, p in enumerate(ps) if c != g)
        rest_t = sum(p for c, p in enumerate(pt) if c != g)
        tckd = kl([pt[g], rest_t], [ps[g], rest_s])
        hat_s = [p / rest_s for c, p in enumerate(ps) if c != g]
        hat_t = [p / rest_t for c, p in enumerate(pt) if c != g]
        nckd = kl(hat_t, hat_s)
        per.append(alpha * tckd + beta * nckd)
    return temperature**2 * mean(per)


def pearson(u: list[float], v: list[float], eps: float = 1e-8) -> float:
    """Pearson correlation; the reference code adds 1e-8 to the product of norms."""
    mu, mv = mean(u), mean(v)
    du, dv = [x - mu for x in u], [x - mv for x in v]
    num = sum(a * b for a, b in zip(du, dv))
    return num / (math.sqrt(sum(a * a for a in du)) * math.sqrt(sum(b * b for b in dv)) + eps)


def ref_dist(zs, zt, beta, gamma, temperature) -> float:
    """Huang et al. 2022: tau^2 * (beta * (1 - mean_i r(Y_s[i], Y_t[i]))
    + gamma * (1 - mean_j r(Y_s[:, j], Y_t[:, j])))."""
    ys = [softmax(r, temperature) for r in rows(zs)]
    yt = [softmax(r, temperature) for r in rows(zt)]
    inter = 1 - mean([pearson(a, b) for a, b in zip(ys, yt)])
    n_classes = len(ys[0])
    columns_s = [[y[j] for y in ys] for j in range(n_classes)]
    columns_t = [[y[j] for y in yt] for j in range(n_classes)]
    intra = 1 - mean([pearson(a, b) for a, b in zip(columns_s, columns_t)])
    return temperature**2 * (beta * inter + gamma * intra)


def zscore(row: list[float]) -> list[float]:
    """(z - mean) / (std + 1e-7): std with the C - 1 divisor (torch.std) and 1e-7, as in
    the authors' code."""
    m = mean(row)
    std = math.sqrt(sum((x - m) ** 2 for x in row) / (len(row) - 1))
    return [(x - m) / (std + 1e-7) for x in row]


def ref_ls_kd(zs, zt, temperature) -> float:
    """Sun et al. 2024: T^2 * mean KL(softmax(Z(z_t)/T) || softmax(Z(z_s)/T))."""
    return temperature**2 * mean(
        [kl(softmax(zscore(t), temperature), softmax(zscore(s), temperature)) for s, t in zip(rows(zs), rows(zt))]
    )


def ref_reverse_kl(zs, zt, temperature) -> float:
    return temperature**2 * mean(
        [kl(softmax(s, temperature), softmax(t, temperature)) for s, t in zip(rows(zs), rows(zt))]
    )


def ref_js(zs, zt, temperature) -> float:
    per = []
    for s, t in zip(rows(zs), rows(zt)):
        ps, pt = softmax(s, temperature), softmax(t, temperature)
        m = [(a + b) / 2 for a, b in zip(ps, pt)]
        per.append(0.5 * kl(ps, m) + 0.5 * kl(pt, m))
    return temperature**2 * mean(per)


def logits(*shape, seed=0, scale=3.0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def outs(z: torch.Tensor) -> Outputs:
    return Outputs(logits=z)


#: (name, function of (student, teacher, temperature), reference of the same) for the
#: losses whose only hyper-parameter is the temperature, DKD and DIST at their defaults.
LABELS = torch.tensor([0, 3, -1, 2, 4, -1])
FUNCTIONS = {
    "dkd": (lambda s, t, T: dkd_loss(s, t, LABELS, temperature=T), lambda s, t, T: ref_dkd(s, t, LABELS.tolist(), 1.0, 8.0, T)),
    "dist": (lambda s, t, T: dist_loss(s, t, temperature=T), lambda s, t, T: ref_dist(s, t, 2.0, 2.0, T)),
    "ls_kd": (lambda s, t, T: ls_kd_loss(s, t, T), ref_ls_kd),
    "reverse_kl": (lambda s, t, T: reverse_kl_loss(s, t, T), ref_reverse_kl),
    "js": (lambda s, t, T: js_divergence_loss(s, t, T), ref_js),
}


# --------------------------------------------------------------------------- formulas


@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_matches_the_papers_formula(name, temperature):
    fn, ref = FUNCTIONS[name]
    zs, zt = logits(6, 5, seed=1), logits(6, 5, seed=2)
    assert fn(zs, zt, temperature).item() == pytest.approx(ref(zs, zt, temperature), rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("alpha,beta", [(1.0, 8.0), (0.5, 2.0), (0.0, 1.0), (2.0, 0.0)])
def test_dkd_weights_and_an_unlabelled_sample(alpha, beta):
    zs, zt = logits(5, 7, seed=3), logits(5, 7, seed=4)
    targets = torch.tensor([6, -1, 0, 2, -1])
    expected = ref_dkd(zs, zt, targets.tolist(), alpha, beta, 3.0)
    assert dkd_loss(zs, zt, targets, alpha, beta, 3.0).item() == pytest.approx(expected, rel=1e-9)


def test_dkd_unlabelled_uses_the_teachers_argmax():
    zs, zt = logits(4, 6, seed=5), logits(4, 6, seed=6)
    argmax = zt.argmax(-1)
    all_unlabelled = torch.full((4,), -1)
    by_argmax = dkd_loss(zs, zt, argmax)
    assert dkd_loss(zs, zt, all_unlabelled).item() == pytest.approx(by_argmax.item(), rel=1e-12)
    assert dkd_loss(zs, zt, None).item() == pytest.approx(by_argmax.item(), rel=1e-12)
    # and a real label is not replaced by the argmax
    other = (argmax + 1) % 6
    assert dkd_loss(zs, zt, other).item() != pytest.approx(by_argmax.item(), rel=1e-6)


def test_dkd_is_exact_where_the_target_probability_rounds_to_one():
    # the teacher is sure of class 0 (p = 1 - 1e-40 in float64): log(1 - p) would be -inf
    zs = torch.tensor([[1.0, 0.5, -0.5]], dtype=torch.float64)
    zt = torch.tensor([[100.0, 8.0, 1.0]], dtype=torch.float64)
    value = dkd_loss(zs, zt, torch.tensor([0]), temperature=1.0)
    assert torch.isfinite(value)
    assert value.item() == pytest.approx(ref_dkd(zs, zt, [0], 1.0, 8.0, 1.0), rel=1e-9)


def test_dkd_sequences_with_token_labels_and_mask():
    zs, zt = logits(2, 3, 5, seed=7), logits(2, 3, 5, seed=8)
    targets = torch.tensor([[1, -1, 4], [0, 2, -1]])
    mask = torch.tensor([[True, True, False], [True, False, True]])
    kept = mask.reshape(-1)
    expected = ref_dkd(zs.reshape(6, 5)[kept], zt.reshape(6, 5)[kept], targets.reshape(-1)[kept].tolist(), 1.0, 8.0, 2.0)
    assert dkd_loss(zs, zt, targets, temperature=2.0, mask=mask).item() == pytest.approx(expected, rel=1e-9)


def test_dist_sequences_treat_every_unmasked_token_as_an_instance():
    zs, zt = logits(2, 3, 4, seed=9), logits(2, 3, 4, seed=10)
    mask = torch.tensor([[True, False, True], [True, True, False]])
    kept = mask.reshape(-1)
    expected = ref_dist(zs.reshape(6, 4)[kept], zt.reshape(6, 4)[kept], 1.0, 3.0, 2.0)
    assert dist_loss(zs, zt, 1.0, 3.0, 2.0, mask=mask).item() == pytest.approx(expected, rel=1e-9)
    assert dist_loss(zs, zt, mask=torch.zeros(2, 3, dtype=torch.bool)).item() == 0.0


@pytest.mark.parametrize("name", ["ls_kd", "reverse_kl", "js"])
def test_sequences_with_mask(name):
    fn = {"ls_kd": ls_kd_loss, "reverse_kl": reverse_kl_loss, "js": js_divergence_loss}[name]
    ref = FUNCTIONS[name][1]
    zs, zt = logits(2, 4, 6, seed=11), logits(2, 4, 6, seed=12)
    mask = torch.tensor([[True, False, True, True], [False, True, True, False]])
    kept = mask.reshape(-1)
    expected = ref(zs.reshape(8, 6)[kept], zt.reshape(8, 6)[kept], 2.0)
    assert fn(zs, zt, 2.0, mask=mask).item() == pytest.approx(expected, rel=1e-9)
    assert fn(zs, zt, 2.0).item() == pytest.approx(ref(zs, zt, 2.0), rel=1e-9)
    with pytest.raises(ValueError, match="mask has shape"):
        fn(zs, zt, 2.0, mask=torch.ones(2, dtype=torch.bool))


@pytest.mark.parametrize("fn", [reverse_kl_loss, js_divergence_loss, ls_kd_loss])
def test_temperature_squared_false_is_unscaled(fn):
    zs, zt = logits(4, 5, seed=13), logits(4, 5, seed=14)
    assert fn(zs, zt, 3.0, temperature_squared=False).item() == pytest.approx(fn(zs, zt, 3.0).item() / 9.0, rel=1e-12)


def test_standardize_logits_mean_zero_bessel_std_one():
    z = logits(3, 8, seed=15) + 5.0
    out = standardize_logits(z)
    assert torch.allclose(out.mean(-1), torch.zeros(3, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(out.std(-1), torch.ones(3, dtype=torch.float64), atol=1e-6)  # std + 1e-7


def test_half_precision_is_computed_in_float32():
    zs, zt = logits(6, 5, seed=16, dtype=torch.float16), logits(6, 5, seed=17, dtype=torch.float16)
    for name, (fn, ref) in FUNCTIONS.items():
        value = fn(zs, zt, 2.0)
        assert value.dtype == torch.float32, name
        assert value.item() == pytest.approx(ref(zs, zt, 2.0), rel=1e-4), name


# --------------------------------------------------------------------------- properties


@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_zero_when_student_equals_teacher(name, temperature):
    fn, _ = FUNCTIONS[name]
    z = logits(6, 5, seed=18)
    value = fn(z, z.clone(), temperature).item()
    # DIST's Pearson has 1e-8 in its denominator (as the reference code): 1 - r is not exactly 0
    assert value == pytest.approx(0.0, abs=1e-3 if name == "dist" else 1e-12)


@pytest.mark.parametrize("seed", range(5))
def test_never_negative(seed):
    zs, zt = logits(6, 5, seed=100 + seed, scale=5.0), logits(6, 5, seed=200 + seed, scale=5.0)
    for name, (fn, _) in FUNCTIONS.items():
        assert fn(zs, zt, 2.0).item() >= 0.0, name
    for cls in (DKDLoss, DISTLoss, LogitStandardKDLoss, ReverseKLLoss, JSDivergenceLoss):
        assert cls.nonnegative is True


def test_ls_kd_ignores_the_teachers_scale_and_shift():
    zs = logits(5, 6, seed=19)
    # a teacher whose logits are the student's, stretched and shifted per sample
    zt = 7.0 * zs + torch.arange(5, dtype=torch.float64).unsqueeze(1)
    assert ls_kd_loss(zs, zt).item() == pytest.approx(0.0, abs=1e-10)
    assert kd_loss(zs, zt).item() > 0.1  # plain KD asks the student to match the range too


def test_dkd_warmup_is_linear_then_saturates():
    zs, zt = logits(6, 5, seed=20), logits(6, 5, seed=21)
    batch = Batch(torch.zeros(6, 1), LABELS)
    full = dkd_loss(zs, zt, LABELS).item()
    loss = DKDLoss(warmup=20)
    values = []
    for epoch in range(26):
        loss.set_progress(epoch, epoch * 10)
        values.append(loss(outs(zs), outs(zt), batch).item())
    for epoch, value in enumerate(values):
        assert value == pytest.approx(full * min((epoch + 1) / 20, 1.0), rel=1e-12)
    steps = [b - a for a, b in zip(values[:19], values[1:20])]
    assert all(step == pytest.approx(full / 20, rel=1e-9) for step in steps)  # linear
    assert values[19:] == [pytest.approx(full, rel=1e-12)] * 7  # saturated from epoch 19 on
    no_warmup = DKDLoss(warmup=0)
    assert no_warmup(outs(zs), outs(zt), batch).item() == pytest.approx(full, rel=1e-12)


def test_js_is_symmetric_and_bounded_by_t2_log2():
    zs, zt = logits(6, 5, seed=22), logits(6, 5, seed=23)
    for t in TEMPERATURES:
        assert js_divergence_loss(zs, zt, t).item() == pytest.approx(js_divergence_loss(zt, zs, t).item(), rel=1e-12)
        assert 0.0 <= js_divergence_loss(zs, zt, t).item() <= t * t * math.log(2)
    # near-disjoint distributions reach the bound
    a = torch.tensor([[60.0, 0.0, 0.0]], dtype=torch.float64)
    b = torch.tensor([[0.0, 60.0, 0.0]], dtype=torch.float64)
    for t in (1.0, 2.0):
        value = js_divergence_loss(a, b, t).item()
        assert value <= t * t * math.log(2)
        assert value == pytest.approx(t * t * math.log(2), rel=1e-6)


def test_reverse_kl_is_forward_kl_with_the_arguments_swapped():
    zs, zt = logits(6, 5, seed=24), logits(6, 5, seed=25)
    reverse = reverse_kl_loss(zs, zt, 2.0).item()
    assert reverse != pytest.approx(kd_loss(zs, zt, 2.0).item(), rel=1e-3)
    assert reverse == pytest.approx(kd_loss(zt, zs, 2.0).item(), rel=1e-12)


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_gradients_reach_the_student_only(name):
    fn, _ = FUNCTIONS[name]
    zs = logits(6, 5, seed=26).requires_grad_()
    zt = logits(6, 5, seed=27).requires_grad_()
    fn(zs, zt, 2.0).backward()
    assert zt.grad is None
    assert zs.grad is not None and torch.isfinite(zs.grad).all() and zs.grad.abs().sum() > 0


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_gradients_match_finite_differences(name):
    fn, _ = FUNCTIONS[name]
    zs = logits(6, 5, seed=28).requires_grad_()
    zt = logits(6, 5, seed=29)
    assert torch.autograd.gradcheck(lambda s: fn(s, zt, 2.0), (zs,), eps=1e-6, atol=1e-5)


# --------------------------------------------------------------------------- modules


def test_module_defaults_are_the_papers_cifar100_settings():
    dkd = DKDLoss()
    assert (dkd.alpha, dkd.beta, dkd.temperature, dkd.warmup) == (1.0, 8.0, 4.0, 20)
    dist = DISTLoss()
    assert (dist.beta, dist.gamma, dist.temperature) == (2.0, 2.0, 4.0)
    ls = LogitStandardKDLoss()
    assert (ls.temperature, ls.weight) == (2.0, 9.0)
    assert ReverseKLLoss().temperature == 4.0
    assert JSDivergenceLoss().temperature == 4.0


def test_modules_match_their_functions():
    zs, zt = logits(6, 5, seed=30), logits(6, 5, seed=31)
    batch = Batch(torch.zeros(6, 1), LABELS)
    s, t = outs(zs), outs(zt)
    dkd = DKDLoss(0.5, 4.0, 3.0, warmup=4)
    dkd.set_progress(1, 0)
    assert dkd(s, t, batch).item() == pytest.approx(0.5 * dkd_loss(zs, zt, LABELS, 0.5, 4.0, 3.0).item(), rel=1e-12)
    assert DKDLoss()(s, t, None).item() == pytest.approx(dkd_loss(zs, zt, None).item() / 20, rel=1e-12)
    assert DISTLoss(1.0, 3.0, 2.0)(s, t, batch).item() == pytest.approx(dist_loss(zs, zt, 1.0, 3.0, 2.0).item(), rel=1e-12)
    assert LogitStandardKDLoss(3.0, 2.0)(s, t, batch).item() == pytest.approx(2.0 * ls_kd_loss(zs, zt, 3.0).item(), rel=1e-12)
    assert ReverseKLLoss(3.0)(s, t, batch).item() == pytest.approx(reverse_kl_loss(zs, zt, 3.0).item(), rel=1e-12)
    assert JSDivergenceLoss(3.0)(s, t, batch).item() == pytest.approx(js_divergence_loss(zs, zt, 3.0).item(), rel=1e-12)


def test_named_terms_sum_to_the_loss():
    zs, zt = logits(6, 5, seed=32), logits(6, 5, seed=33)
    batch = Batch(torch.zeros(6, 1), LABELS)
    for loss, names in ((DKDLoss(warmup=5), {"DKDLoss/tckd", "DKDLoss/nckd"}), (DISTLoss(), {"DISTLoss/inter", "DISTLoss/intra"})):
        loss.set_progress(2, 0)
        terms = loss.named_terms(outs(zs), outs(zt), batch)
        assert set(terms) == names
        assert sum(terms.values()).item() == pytest.approx(loss(outs(zs), outs(zt), batch).item(), rel=1e-12)


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "make,message",
    [
        (lambda: DKDLoss(alpha=-1.0), r"alpha must be a finite number >= 0, got -1\.0"),
        (lambda: DKDLoss(beta=-0.5), r"beta must be a finite number >= 0, got -0\.5"),
        (lambda: DKDLoss(beta=float("nan")), r"beta must be a finite number >= 0, got nan"),
        (lambda: DKDLoss(temperature=0), r"temperature must be a positive number, got 0"),
        (lambda: DKDLoss(warmup=-1), r"warmup must be a whole number of epochs >= 0, got -1"),
        (lambda: DKDLoss(warmup=2.5), r"warmup must be a whole number of epochs >= 0, got 2\.5"),
        (lambda: DISTLoss(beta=-1.0), r"beta must be a finite number >= 0, got -1\.0"),
        (lambda: DISTLoss(gamma=-2.0), r"gamma must be a finite number >= 0, got -2\.0"),
        (lambda: DISTLoss(temperature=-4.0), r"temperature must be a positive number, got -4\.0"),
        (lambda: LogitStandardKDLoss(weight=-9.0), r"weight must be a finite number >= 0, got -9\.0"),
        (lambda: LogitStandardKDLoss(temperature=0.0), r"temperature must be a positive number"),
        (lambda: LogitStandardKDLoss(weight=float("inf")), r"weight must be a finite number >= 0, got inf"),
        (lambda: ReverseKLLoss(0.0), r"temperature must be a positive number, got 0\.0"),
        (lambda: ReverseKLLoss(float("inf")), r"temperature must be a positive number, got inf"),
        (lambda: JSDivergenceLoss(-1.0), r"temperature must be a positive number, got -1\.0"),
    ],
)
def test_bad_hyper_parameters_are_rejected_by_the_modules(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_bad_hyper_parameters_are_rejected_by_the_functions():
    zs, zt = logits(4, 5, seed=34), logits(4, 5, seed=35)
    with pytest.raises(ValueError, match="alpha must be a finite number >= 0"):
        dkd_loss(zs, zt, None, alpha=-1.0)
    with pytest.raises(ValueError, match="gamma must be a finite number >= 0"):
        dist_loss(zs, zt, gamma=-0.1)
    for name, (fn, _) in FUNCTIONS.items():
        with pytest.raises(ValueError, match="temperature must be a positive number"):
            fn(zs, zt, 0.0)
    with pytest.raises(TypeError, match="alpha must be a number, got str"):
        DKDLoss(alpha="1")


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_class_count_mismatch_names_both_counts(name):
    fn, _ = FUNCTIONS[name]
    with pytest.raises(ValueError, match="the student predicts 5 classes and the teacher 4"):
        fn(logits(6, 5), logits(6, 4), 2.0)


def test_dkd_bad_targets():
    zs, zt = logits(3, 4, seed=36), logits(3, 4, seed=37)
    with pytest.raises(ValueError, match=r"class indices in \[0, 4\) or -1 .* from -1 to 4"):
        dkd_loss(zs, zt, torch.tensor([0, -1, 4]))
    with pytest.raises(ValueError, match=r"from -2 to 1"):
        dkd_loss(zs, zt, torch.tensor([-2, 0, 1]))
    with pytest.raises(TypeError, match="integer tensor"):
        dkd_loss(zs, zt, torch.tensor([0.0, 1.0, 2.0]))
    with pytest.raises(ValueError, match=r"targets has shape \(2,\) .* shape \(3,\)"):
        dkd_loss(zs, zt, torch.tensor([0, 1]))


def test_one_class_is_rejected_where_it_means_nothing():
    z = logits(3, 1)
    with pytest.raises(ValueError, match="DKD needs at least 2 classes"):
        dkd_loss(z, z.clone(), None)
    with pytest.raises(ValueError, match="at least 2 classes"):
        ls_kd_loss(z, z.clone())


# --------------------------------------------------------------------------- in the Distiller

MODULES = {
    "dkd": lambda: DKDLoss(),
    "dist": lambda: DISTLoss(),
    "ls_kd": lambda: LogitStandardKDLoss(),
    "reverse_kl": lambda: ReverseKLLoss(),
    "js": lambda: JSDivergenceLoss(),
}


def tiny_problem(loss, alpha: float):
    torch.manual_seed(0)
    student, teacher = nn.Linear(6, 5), nn.Linear(6, 5)
    with torch.no_grad():
        teacher.weight.mul_(4.0)  # a confident teacher
    d = Distiller(student=student, teacher=teacher, device="cpu")
    d.compile(torch.optim.Adam(student.parameters(), lr=0.05), distillation_loss_fn=loss, alpha=alpha)
    g = torch.Generator().manual_seed(1)
    targets = torch.randint(0, 5, (16,), generator=g)
    targets[[3, 9]] = -1  # two unlabelled samples
    return d, student, teacher, Batch(torch.randn(16, 6, generator=g), targets)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_train_step_in_a_distiller(name):
    loss = MODULES[name]()
    d, student, teacher, batch = tiny_problem(loss, alpha=0.5)
    before, teacher_before = copy.deepcopy(student), copy.deepcopy(teacher.state_dict())
    logs = d.train_step(batch)
    with torch.no_grad():
        expected = loss(outs(before(batch.inputs)), outs(teacher(batch.inputs)), batch).item()
    assert logs["distillation_loss"].item() == pytest.approx(expected, rel=1e-5)
    assert math.isfinite(logs["loss"].item())
    assert not torch.equal(student.weight, before.weight)  # the student learned
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, teacher_before[k])  # the teacher did not


@pytest.mark.parametrize("name", sorted(MODULES))
def test_distillation_brings_the_student_to_the_teacher(name):
    d, student, teacher, batch = tiny_problem(MODULES[name](), alpha=0.0)
    values = [d.train_step(batch)["distillation_loss"].item() for _ in range(30)]
    assert values[-1] < 0.5 * values[0], values
    with torch.no_grad():
        agree = (student(batch.inputs).argmax(-1) == teacher(batch.inputs).argmax(-1)).float().mean().item()
    assert agree >= 0.75


def test_dkd_in_a_distiller_follows_the_epoch_and_the_teachers_argmax():
    loss = DKDLoss(warmup=20)
    d, student, teacher, batch = tiny_problem(loss, alpha=0.5)
    d.epoch = 9  # as fit() sets it: the 10th epoch is half-way through the warm-up
    before = copy.deepcopy(student)
    logs = d.train_step(batch)
    assert loss.epoch == 9
    with torch.no_grad():
        zs, zt = before(batch.inputs), teacher(batch.inputs)
    # samples 3 and 9 are unlabelled: the reference decouples them on the teacher's argmax
    expected = 0.5 * ref_dkd(zs, zt, batch.targets.tolist(), 1.0, 8.0, 4.0)
    assert logs["distillation_loss"].item() == pytest.approx(expected, rel=1e-5)
