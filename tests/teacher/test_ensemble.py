"""Ensemble teachers: the combining rules against their formulas computed independently,
per-member feature taps, a Distiller given a list of teachers, caches as members, errors."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

import kdistill
from kdistill.losses import HintLoss, KDLoss, WeightedSum
from kdistill.outputs import Batch
from kdistill.teacher import EnsembleTeacher, LiveTeacher, TeacherCache, combine_logits, confidence_weights

N, D, C = 48, 6, 5


def _data(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, D, generator=g), torch.randint(0, C, (N,), generator=g)


def _net(seed: int, hidden: int = 16, classes: int = C) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(D, hidden), nn.ReLU(), nn.Linear(hidden, classes))


def _np_softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _logits(m: int = 3, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [3 * torch.randn(7, C, generator=g, dtype=torch.float64).float() for _ in range(m)]


# ---------------------------------------------------------------------------- the rules
@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_mean_probs_gives_logits_whose_softmax_at_t_is_the_mean_probability(temperature):
    zs = _logits()
    out = combine_logits(zs, "mean_probs", temperature)
    want = np.mean([_np_softmax(z.double().numpy() / temperature) for z in zs], axis=0)
    got = torch.softmax(out.double() / temperature, -1).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    # and the logits are T * log(mean probability) themselves
    np.testing.assert_allclose(out.double().numpy(), temperature * np.log(want), rtol=1e-5, atol=1e-5)


def test_fixed_weights_weigh_logits_and_probabilities():
    zs = _logits()
    w = [2.0, 1.0, 1.0]
    mean_logits = combine_logits(zs, "mean_logits", weights=w)
    want = 0.5 * zs[0] + 0.25 * zs[1] + 0.25 * zs[2]
    torch.testing.assert_close(mean_logits, want)
    out = combine_logits(zs, "mean_probs", 2.0, weights=w)
    p = [_np_softmax(z.double().numpy() / 2.0) for z in zs]
    np.testing.assert_allclose(torch.softmax(out.double() / 2.0, -1).numpy(), 0.5 * p[0] + 0.25 * p[1] + 0.25 * p[2],
                               rtol=1e-5, atol=1e-7)


def test_confidence_weights_are_a_softmax_of_negative_entropies_per_sample():
    zs = _logits(seed=3)
    t = 2.0
    p = np.stack([_np_softmax(z.double().numpy() / t) for z in zs])  # (M, B, C)
    neg_h = (p * np.log(p)).sum(-1)  # (M, B)
    a = np.exp(neg_h) / np.exp(neg_h).sum(0, keepdims=True)
    np.testing.assert_allclose(confidence_weights(zs, t).numpy(), a, rtol=1e-5)
    mix = (a[..., None] * p).sum(0)
    out = combine_logits(zs, "confidence", t)
    np.testing.assert_allclose(torch.softmax(out.double() / t, -1).numpy(), mix, rtol=1e-5, atol=1e-7)
    # a prior weight multiplies exp(-H) before normalising
    prior = np.array([0.6, 0.2, 0.2])[:, None]
    a2 = prior * np.exp(neg_h) / (prior * np.exp(neg_h)).sum(0, keepdims=True)
    np.testing.assert_allclose(confidence_weights(zs, t, [3, 1, 1]).numpy(), a2, rtol=1e-5)


def test_a_confident_member_outweighs_an_uncertain_one():
    sure = torch.tensor([[10.0, 0, 0, 0, 0]])
    unsure = torch.zeros(1, C)
    a = confidence_weights([sure, unsure])
    # exp(-0) : exp(-log 5): at most 5 : 1 with 5 classes
    assert a[0, 0] > 0.8 and torch.allclose(a.sum(0), torch.ones(1))


def test_one_member_combines_to_itself():
    z = _logits(1)[0]
    for mode in ("mean_logits", "mean_probs", "confidence"):
        out = combine_logits([z], mode, 3.0)
        torch.testing.assert_close(torch.softmax(out / 3.0, -1), torch.softmax(z / 3.0, -1))


def test_combine_refuses_bad_arguments():
    zs = _logits(2)
    with pytest.raises(ValueError, match=r"combine must be one of \['mean_logits', 'mean_probs', 'confidence'\], "
                                         r"got 'max'"):
        combine_logits(zs, "max")
    with pytest.raises(ValueError, match=r"weights has 3 values for 2 teachers"):
        combine_logits(zs, "mean_probs", weights=[1, 1, 1])
    with pytest.raises(ValueError, match=r"weights must be finite, >= 0 and not all 0, got \[-1.0, 2.0\]"):
        combine_logits(zs, "mean_probs", weights=[-1, 2])
    with pytest.raises(ValueError, match=r"differ in shape: \[\(7, 5\), \(7, 4\)\]"):
        combine_logits([zs[0], zs[1][:, :4]], "mean_logits")
    with pytest.raises(ValueError, match="temperature must be a positive number, got 0"):
        combine_logits(zs, "mean_probs", 0.0)


# ---------------------------------------------------------------------------- the teacher
def test_the_ensemble_serves_the_combined_logits_at_the_losses_temperature():
    x, _ = _data()
    a, b = _net(1), _net(2, hidden=8)
    ens = EnsembleTeacher([a, b], combine="mean_probs")
    ens.set_temperatures([4.0])
    out = ens(Batch(x))
    with torch.no_grad():
        want = combine_logits([a(x), b(x)], "mean_probs", 4.0)
    torch.testing.assert_close(out.logits, want)
    assert list(ens.parameters()) and all(not p.requires_grad for p in ens.parameters())
    with pytest.raises(ValueError, match=r"combine='mean_probs' .* the losses use \[2.0, 4.0\].*combine='mean_logits'"):
        ens.set_temperatures([2.0, 4.0])
    EnsembleTeacher([a, b], combine="mean_logits").set_temperatures([2.0, 4.0])  # exact at every T


def test_feature_taps_name_the_member():
    x, _ = _data()
    a, b = _net(1), _net(2, hidden=8)
    ens = EnsembleTeacher([a, b], names=["big", "small"])
    ens.set_taps(["small/1", "big/0"])
    out = ens(Batch(x))
    assert sorted(out.features) == ["big/0", "small/1"]
    assert out.features["small/1"].shape == (N, 8) and out.features["big/0"].shape == (N, 16)
    with pytest.raises(ValueError, match=r"teacher layer '1': .* <member> one of \['big', 'small'\] \(e.g. 'big/1'\)"):
        ens.set_taps(["1"])
    with pytest.raises(ValueError, match=r"teacher layer 'huge/1'.*one of \['big', 'small'\]"):
        ens.set_taps(["huge/1"])
    with pytest.raises(ValueError, match="'nope'"):  # the member's own error for a layer it lacks
        ens.set_taps(["big/nope"])
    ens.set_taps([])
    assert ens(Batch(x)).features == {}


def test_the_ensemble_refuses_bad_members_and_names():
    with pytest.raises(ValueError, match="an ensemble needs at least 2 teachers, got 1"):
        EnsembleTeacher([_net(1)])
    with pytest.raises(ValueError, match=r"distinct, non-empty and without '/', got \['a', 'a'\]"):
        EnsembleTeacher([_net(1), _net(2)], names=["a", "a"])
    with pytest.raises(ValueError, match=r"names has 1 entries for 2 teachers"):
        EnsembleTeacher([_net(1), _net(2)], names=["a"])
    with pytest.raises(TypeError, match="ensemble member 't1' must be an nn.Module or a teacher"):
        EnsembleTeacher([_net(1), "teacher.pt"])


def test_members_with_different_class_counts_are_named():
    x, y = _data()
    d = kdistill.Distiller(_net(3), teacher=[_net(1), _net(2, classes=C + 1)], device="cpu")
    d.compile(torch.optim.SGD(d.student.parameters(), lr=0.1))
    with pytest.raises(ValueError, match=r"different class counts: 't0' \(LiveTeacher\(Sequential.*\) 5 and 't1' "
                                         r"\(LiveTeacher\(Sequential.*\) 6"):
        d.fit(x, y, epochs=1, batch_size=16, verbose=0)


# ---------------------------------------------------------------------------- in the Distiller
def test_a_distiller_given_a_list_trains_from_the_mean_probabilities():
    x, y = _data()
    a, b, student = _net(1), _net(2, hidden=8), _net(3)
    before = [copy.deepcopy(m.state_dict()) for m in (a, b)]

    def run(teacher):
        s = copy.deepcopy(student)
        d = kdistill.Distiller(s, teacher=teacher, device="cpu")
        d.compile(torch.optim.SGD(s.parameters(), lr=0.1), distillation_loss_fn=KDLoss(temperature=4.0), alpha=0.2)
        hist = d.fit(x, y, epochs=2, batch_size=16, seed=0, verbose=0)
        return d, s.state_dict(), hist

    d, from_list, hist = run([a, b])
    assert isinstance(d.teacher, EnsembleTeacher) and d.teacher.combine == "mean_probs" and d.teacher.temperature == 4.0
    assert np.isfinite(hist.history["loss"]).all()
    for m, sd in zip((a, b), before):  # the teachers stay frozen
        for k, v in m.state_dict().items():
            assert torch.equal(v, sd[k])
    # the same as an explicit EnsembleTeacher
    _, explicit, _ = run(EnsembleTeacher([LiveTeacher(a), LiveTeacher(b)]))
    for k in explicit:
        torch.testing.assert_close(from_list[k], explicit[k], rtol=0, atol=1e-6)
    # and not the same as either teacher alone
    _, only_a, _ = run(a)
    assert any(not torch.allclose(from_list[k], only_a[k]) for k in only_a)


def test_a_feature_loss_reads_one_member_while_the_logit_loss_reads_the_ensemble():
    x, y = _data()
    a, b, student = _net(1), _net(2, hidden=8), _net(3)
    loss = WeightedSum({"kd": (KDLoss(temperature=2.0), 1.0), "hint": (HintLoss("1", "t1/1", weight=1.0), 1.0)})
    d = kdistill.Distiller(student, teacher=[a, b], device="cpu")
    d.compile(torch.optim.SGD(student.parameters(), lr=0.05), distillation_loss_fn=loss)
    hist = d.fit(x, y, epochs=1, batch_size=16, seed=0, verbose=0)
    assert np.isfinite(hist.history["loss"]).all()
    bad = WeightedSum({"kd": (KDLoss(temperature=2.0), 1.0), "hint": (HintLoss("1", "1", weight=1.0), 1.0)})
    d2 = kdistill.Distiller(_net(3), teacher=[a, b], device="cpu")
    d2.compile(torch.optim.SGD(d2.student.parameters(), lr=0.05), distillation_loss_fn=bad)
    with pytest.raises(ValueError, match=r"teacher layer '1': the teacher is an ensemble.*\['t0', 't1'\]"):
        d2.fit(x, y, epochs=1, batch_size=16, seed=0, verbose=0)


def test_caches_as_members_give_what_the_live_members_give(tmp_path):
    """A cache per member: distilling from two full-logit caches equals distilling from the
    two live teachers (float32 caches: exact logits)."""
    x, y = _data()
    a, b, student = _net(1), _net(2, hidden=8), _net(3)
    ca = TeacherCache.build(a, x, tmp_path / "a", dtype="float32", device="cpu")
    cb = TeacherCache.build(b, x, tmp_path / "b", dtype="float32", device="cpu")

    def run(teacher):
        s = copy.deepcopy(student)
        d = kdistill.Distiller(s, teacher=teacher, device="cpu")
        d.compile(torch.optim.SGD(s.parameters(), lr=0.1), distillation_loss_fn=KDLoss(temperature=3.0))
        d.fit(x, y, epochs=2, batch_size=16, seed=0, verbose=0)
        return s.state_dict()

    live = run(EnsembleTeacher([LiveTeacher(a, channels_last=False), LiveTeacher(b, channels_last=False)],
                               combine="confidence"))
    cached = run(EnsembleTeacher([ca, cb], combine="confidence"))
    for k in live:
        torch.testing.assert_close(cached[k], live[k], rtol=0, atol=1e-5)
