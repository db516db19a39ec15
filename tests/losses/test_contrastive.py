"""CRD (Tian et al., ICLR 2020): the NCE objective against an independent float64
computation of the paper's formula, the memory bank's momentum update, the normalising
constant, gradients (gradcheck on the heads), checkpoints and the errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import kdistill.losses.contrastive as contrastive
from kdistill.losses.contrastive import (
    CRDLoss,
    EmbedHead,
    crd_loss,
    nce_loss,
    sample_contrast_index,
    update_memory_,
)
from kdistill.outputs import Batch, Outputs

N_DATA, FEAT, K = 20, 4, 6


# --------------------------------------------------------------------------- reference (float64, loops)


def scores_ref(anchor: np.ndarray, memory: np.ndarray, cidx: np.ndarray, tau: float) -> np.ndarray:
    """exp(memory[cidx[i, k]] . anchor[i] / tau), unnormalised."""
    b, k1 = cidx.shape
    return np.array(
        [[math.exp(float(np.dot(memory[cidx[i, k]], anchor[i])) / tau) for k in range(k1)] for i in range(b)]
    )


def nce_ref(scores: np.ndarray, z: float, n_data: int) -> float:
    """Paper eq. (18)-(20): h = P / (P + K/M), P = scores / Z;
    L = -(1/B)[sum_i log h_i0 + sum_{i,k>=1} log(1 - h_ik)]."""
    b, k1 = scores.shape
    c = (k1 - 1) / n_data
    total = 0.0
    for i in range(b):
        p = scores[i, 0] / z
        total += math.log(p / (p + c))
        for k in range(1, k1):
            p = scores[i, k] / z
            total += math.log(1.0 - p / (p + c))
    return -total / b


def z_ref(scores: np.ndarray, n_data: int) -> float:
    """CRD's normalising constant from one batch: M * mean(exp(a.b / tau))."""
    return n_data * float(scores.mean())


def crd_ref(vs, vt, mem_s, mem_t, cidx, tau, zs=None, zt=None):
    """Both directions: student anchored on the teacher's memory and vice versa."""
    n = mem_s.shape[0]
    ss, st = scores_ref(vs, mem_t, cidx, tau), scores_ref(vt, mem_s, cidx, tau)
    zs = z_ref(ss, n) if zs is None else zs
    zt = z_ref(st, n) if zt is None else zt
    return nce_ref(ss, zs, n) + nce_ref(st, zt, n), zs, zt


def embed_ref(head: EmbedHead, x: torch.Tensor) -> np.ndarray:
    w = head.linear.weight.detach().double().numpy()
    b = head.linear.bias.detach().double().numpy()
    x = x.detach().double().reshape(x.shape[0], -1).numpy()
    v = np.array([w @ row + b for row in x])
    return np.array([row / math.sqrt(float(np.dot(row, row))) for row in v])


def unit_rows(*shape, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g, dtype=torch.float64)
    return x / x.norm(dim=1, keepdim=True)


# --------------------------------------------------------------------------- fixtures


def make_loss(**kw) -> CRDLoss:
    torch.manual_seed(0)
    args = dict(feat_dim=FEAT, nce_k=K)
    args.update(kw)
    return CRDLoss("s.feat", "t.feat", N_DATA, **args).double()


def outputs(b=5, seed=0, index=None):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(b, 2, 3, generator=g, dtype=torch.float64)  # student maps: 6 values per sample
    t = torch.randn(b, 5, generator=g, dtype=torch.float64) * 2  # teacher vectors: 5 values
    index = torch.tensor([3, 17, 0, 8, 12][:b]) if index is None else index
    return (
        Outputs(torch.zeros(b, 3, dtype=torch.float64), {"s.feat": s}),
        Outputs(torch.zeros(b, 3, dtype=torch.float64), {"t.feat": t}),
        Batch(torch.zeros(b, 1), torch.zeros(b, dtype=torch.long), index),
    )


@pytest.fixture
def fixed_negatives(monkeypatch):
    """Replace the uniform sampler with a fixed draw, so the reference sees the same rows."""
    g = torch.Generator().manual_seed(42)
    draws = {}

    def fixed(index, n_data, nce_k, *, generator=None):
        key = (tuple(index.tolist()), n_data, nce_k)
        if key not in draws:
            neg = torch.randint(0, n_data, (index.shape[0], nce_k), generator=g)
            draws[key] = torch.cat([index.reshape(-1, 1), neg], dim=1)
        return draws[key]

    monkeypatch.setattr(contrastive, "sample_contrast_index", fixed)
    return fixed


def ready(loss: CRDLoss, b=5, seed=0):
    student, teacher, batch = outputs(b, seed)
    loss.setup(student, teacher)
    return student, teacher, batch


# --------------------------------------------------------------------------- the formula


@pytest.mark.parametrize("given_z", [False, True])
def test_crd_loss_matches_the_papers_nce_formula(given_z):
    vs, vt = unit_rows(5, FEAT, seed=1), unit_rows(5, FEAT, seed=2)
    mem_s, mem_t = unit_rows(N_DATA, FEAT, seed=3), unit_rows(N_DATA, FEAT, seed=4)
    negatives = torch.randint(0, N_DATA, (5, K), generator=torch.Generator().manual_seed(5))
    cidx = torch.cat([torch.tensor([[3], [17], [0], [8], [12]]), negatives], dim=1)
    zs, zt = (7.5, 11.0) if given_z else (None, None)
    expected, _, _ = crd_ref(vs.numpy(), vt.numpy(), mem_s.numpy(), mem_t.numpy(), cidx.numpy(), 0.07, zs, zt)
    log_z = None if not given_z else (math.log(zs), math.log(zt))
    value = crd_loss(vs, vt, mem_s, mem_t, cidx, temperature=0.07, log_normalizers=log_z)
    assert value.dtype == torch.float64
    assert value.item() == pytest.approx(expected, rel=1e-10)
    assert value.item() > 0


@pytest.mark.parametrize("nce_k", [1, 6, 40])  # rows gathered (small K) or the whole bank scored
def test_contrast_logits_both_ways(nce_k):
    from kdistill.losses.contrastive import contrast_logits

    anchor, memory = unit_rows(5, FEAT, seed=6), unit_rows(N_DATA, FEAT, seed=7).float()
    g = torch.Generator().manual_seed(0)
    cidx = sample_contrast_index(torch.tensor([1, 2, 3, 4, 5]), N_DATA, nce_k, generator=g)
    expected = np.log(scores_ref(anchor.numpy(), memory.double().numpy(), cidx.numpy(), 0.5))
    value = contrast_logits(anchor, memory, cidx, 0.5)
    assert value.shape == (5, nce_k + 1) and value.dtype == torch.float64
    assert value.numpy() == pytest.approx(expected, rel=1e-12)
    assert torch.autograd.gradcheck(lambda a: contrast_logits(a, memory.double(), cidx, 0.5), (anchor.requires_grad_(),))


def test_nce_loss_is_stable_where_the_division_form_overflows():
    logits = torch.tensor([[200.0, -200.0, 150.0]], dtype=torch.float64)
    value = nce_loss(logits, 0.0, 10)
    assert math.isfinite(value.item()) and value.item() >= 0
    with pytest.raises(ValueError, match=r"\(B, 1 \+ K\)"):
        nce_loss(torch.zeros(3, 1), 0.0, 10)


def test_module_matches_the_reference_and_sets_z_on_the_first_batch(fixed_negatives):
    loss = make_loss()
    student, teacher, batch = ready(loss)
    assert torch.isnan(loss.log_normalizers).all()
    mem_s, mem_t = loss.student_memory.clone().numpy(), loss.teacher_memory.clone().numpy()
    vs = embed_ref(loss.embed_s, student.features["s.feat"])
    vt = embed_ref(loss.embed_t, teacher.features["t.feat"])
    cidx = fixed_negatives(batch.index, N_DATA, K).numpy()
    expected, zs, zt = crd_ref(vs, vt, mem_s, mem_t, cidx, 0.07)
    value = loss(student, teacher, batch)
    assert value.item() == pytest.approx(0.8 * expected, rel=1e-9)
    assert loss.log_normalizers.tolist() == pytest.approx([math.log(zs), math.log(zt)], rel=1e-12)
    # 2nd batch: Z stays fixed (estimated once), and the loss uses it with the updated memory
    student2, teacher2, batch2 = outputs(5, seed=1)
    mem_s, mem_t = loss.student_memory.clone().numpy(), loss.teacher_memory.clone().numpy()
    vs2 = embed_ref(loss.embed_s, student2.features["s.feat"])
    vt2 = embed_ref(loss.embed_t, teacher2.features["t.feat"])
    expected2, _, _ = crd_ref(vs2, vt2, mem_s, mem_t, cidx, 0.07, zs, zt)
    assert loss(student2, teacher2, batch2).item() == pytest.approx(0.8 * expected2, rel=1e-9)
    assert loss.log_normalizers.tolist() == pytest.approx([math.log(zs), math.log(zt)], rel=1e-12)


def test_named_terms_are_the_two_directions(fixed_negatives):
    loss = make_loss(weight=2.0)
    student, teacher, batch = ready(loss)
    vs = embed_ref(loss.embed_s, student.features["s.feat"])
    vt = embed_ref(loss.embed_t, teacher.features["t.feat"])
    mem_s, mem_t = loss.student_memory.numpy().copy(), loss.teacher_memory.numpy().copy()
    cidx = fixed_negatives(batch.index, N_DATA, K).numpy()
    ss, st = scores_ref(vs, mem_t, cidx, 0.07), scores_ref(vt, mem_s, cidx, 0.07)
    terms = loss.named_terms(student, teacher, batch)
    assert set(terms) == {"CRDLoss/student_anchor", "CRDLoss/teacher_anchor"}
    assert terms["CRDLoss/student_anchor"].item() == pytest.approx(2 * nce_ref(ss, z_ref(ss, N_DATA), N_DATA), rel=1e-9)
    assert terms["CRDLoss/teacher_anchor"].item() == pytest.approx(2 * nce_ref(st, z_ref(st, N_DATA), N_DATA), rel=1e-9)


def test_defaults_are_repdistillers_cifar100_settings():
    loss = CRDLoss("a", "b", 10)
    assert (loss.weight, loss.feat_dim, loss.nce_k, loss.nce_t, loss.nce_m) == (0.8, 128, 16384, 0.07, 0.5)
    assert loss.taps == {"student": "a", "teacher": "b"}
    assert loss.nonnegative is True
    assert loss.student_memory.shape == loss.teacher_memory.shape == (10, 128)
    bound = 1 / math.sqrt(128 / 3)
    assert loss.student_memory.abs().max() <= bound and not torch.equal(loss.student_memory, loss.teacher_memory)


# --------------------------------------------------------------------------- the memory bank


def test_memory_update_touches_only_the_indexed_rows_with_the_momentum_formula(fixed_negatives):
    loss = make_loss(nce_m=0.3)
    student, teacher, batch = ready(loss)
    old_s, old_t = loss.student_memory.clone(), loss.teacher_memory.clone()
    vs = embed_ref(loss.embed_s, student.features["s.feat"])
    vt = embed_ref(loss.embed_t, teacher.features["t.feat"])
    loss(student, teacher, batch)
    idx = batch.index.tolist()
    for old, new, v in ((old_s, loss.student_memory, vs), (old_t, loss.teacher_memory, vt)):
        for row in range(N_DATA):
            if row in idx:
                blend = 0.3 * old[row].numpy() + 0.7 * v[idx.index(row)]
                expected = blend / math.sqrt(float(np.dot(blend, blend)))
                assert new[row].numpy() == pytest.approx(expected, rel=1e-12, abs=1e-12)
            else:
                assert torch.equal(new[row], old[row])
    assert not loss.student_memory.requires_grad and loss.student_memory.grad_fn is None
    assert not loss.teacher_memory.requires_grad and loss.teacher_memory.grad_fn is None


def test_update_memory_is_outside_autograd():
    memory = torch.zeros(4, 2)
    embed = torch.tensor([[3.0, 4.0]], requires_grad=True)
    update_memory_(memory, torch.tensor([2]), embed * 2, 0.5)
    assert memory.grad_fn is None and not memory.requires_grad
    assert memory[2].tolist() == pytest.approx([0.6, 0.8])
    assert memory[[0, 1, 3]].abs().sum() == 0


def test_eval_mode_changes_no_state(fixed_negatives):
    loss = make_loss()
    student, teacher, batch = ready(loss)
    loss.eval()
    before = {k: v.clone() for k, v in loss.state_dict().items()}
    value = loss(student, teacher, batch)
    assert math.isfinite(value.item())
    for k, v in loss.state_dict().items():
        assert torch.equal(v, before[k]) or (torch.isnan(v).all() and torch.isnan(before[k]).all()), k


def test_uniform_negatives_with_the_positive_first():
    index = torch.tensor([4, 0, 9])
    g = torch.Generator().manual_seed(0)
    cidx = sample_contrast_index(index, 10, 20000, generator=g)
    assert cidx.shape == (3, 20001) and cidx.dtype == torch.long
    assert cidx[:, 0].tolist() == [4, 0, 9]
    counts = torch.bincount(cidx[:, 1:].reshape(-1), minlength=10).double()
    assert cidx[:, 1:].min() >= 0 and cidx[:, 1:].max() < 10
    expected = 3 * 20000 / 10
    assert ((counts - expected).abs() < 5 * math.sqrt(expected)).all()  # uniform within 5 sigma


def test_memory_and_normaliser_are_buffers_saved_in_the_state_dict(fixed_negatives):
    loss = make_loss()
    student, teacher, batch = ready(loss)
    loss(student, teacher, batch)
    state = loss.state_dict()
    saved = {"student_memory", "teacher_memory", "log_normalizers", "embed_s.linear.weight", "embed_t.linear.bias"}
    assert saved <= set(state)
    assert {n for n, _ in loss.named_buffers()} == {"student_memory", "teacher_memory", "log_normalizers"}
    restored = CRDLoss("s.feat", "t.feat", N_DATA, feat_dim=FEAT, nce_k=K).double()
    restored.setup(student, teacher)
    restored.load_state_dict(state)
    loss.eval(), restored.eval()
    assert restored(student, teacher, batch).item() == loss(student, teacher, batch).item()


# --------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("nce_k", [1, K])  # rows gathered, or the whole bank scored
def test_gradients_reach_the_student_and_both_heads(nce_k):
    loss = make_loss(nce_k=nce_k)
    student, teacher, batch = ready(loss)
    s = student.features["s.feat"].clone().requires_grad_()
    with torch.inference_mode():  # the Distiller's teacher runs in inference mode
        t = teacher.features["t.feat"] * 1.0
    value = loss(Outputs(student.logits, {"s.feat": s}), Outputs(teacher.logits, {"t.feat": t}), batch)
    value.backward()  # after the in-place memory update: the bank is not in the graph
    for p in (s, *loss.embed_s.parameters(), *loss.embed_t.parameters()):
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0


def test_gradcheck_on_the_heads(fixed_negatives):
    loss = make_loss()
    student, teacher, batch = ready(loss, b=3)
    loss(student, teacher, batch)  # first batch: sets Z
    loss.eval()  # no memory updates between gradcheck's evaluations
    names = ["embed_s.linear.weight", "embed_s.linear.bias", "embed_t.linear.weight", "embed_t.linear.bias"]
    params = dict(loss.named_parameters())
    inputs = tuple(params[n].detach().clone().requires_grad_() for n in names)

    def fn(*tensors):
        return torch.func.functional_call(loss, dict(zip(names, tensors)), (student, teacher, batch))

    assert torch.autograd.gradcheck(fn, inputs)


def test_setup_builds_heads_from_feature_sizes():
    loss = make_loss()
    student, teacher, batch = outputs()
    with pytest.raises(RuntimeError, match="setup"):
        loss(student, teacher, batch)
    loss.setup(student, teacher)
    assert (loss.embed_s.linear.in_features, loss.embed_s.linear.out_features) == (6, FEAT)
    assert (loss.embed_t.linear.in_features, loss.embed_t.linear.out_features) == (5, FEAT)
    assert loss.embed_s.linear.weight.dtype == torch.float64
    first = loss.embed_s.linear.weight
    loss.setup(student, teacher)
    assert loss.embed_s.linear.weight is first  # set up once: trained weights are kept
    with pytest.raises(ValueError, match="set up for features"):
        loss.setup(Outputs(student.logits, {"s.feat": torch.zeros(5, 9)}), teacher)


# --------------------------------------------------------------------------- errors


def test_missing_index_is_explained():
    loss = make_loss()
    student, teacher, batch = ready(loss)
    with pytest.raises(ValueError, match="batch.index is None"):
        loss(student, teacher, Batch(batch.inputs, batch.targets, None))


@pytest.mark.parametrize("bad", [[3, 17, 0, 8, 20], [3, -1, 0, 8, 12]])
def test_index_out_of_range_is_explained(bad):
    loss = make_loss()
    student, teacher, batch = ready(loss)
    before = loss.student_memory.clone()
    with pytest.raises(ValueError, match=r"n_data=20"):
        loss(student, teacher, Batch(batch.inputs, batch.targets, torch.tensor(bad)))
    assert torch.equal(loss.student_memory, before)


def test_index_of_wrong_shape_or_dtype():
    loss = make_loss()
    student, teacher, batch = ready(loss)
    with pytest.raises(ValueError, match=r"shape \(5,\)"):
        loss(student, teacher, Batch(batch.inputs, batch.targets, torch.arange(4)))
    with pytest.raises(ValueError, match="integer"):
        loss(student, teacher, Batch(batch.inputs, batch.targets, torch.arange(5.0)))


def test_missing_tap_names_what_is_there():
    loss = make_loss()
    student, teacher, batch = outputs()
    with pytest.raises(KeyError, match="s.feat"):
        loss.setup(Outputs(student.logits), teacher)
    loss.setup(student, teacher)
    with pytest.raises(KeyError, match="t.feat"):
        loss(student, Outputs(teacher.logits, {"x": teacher.features["t.feat"]}), batch)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(n_data=0), "n_data"),
        (dict(n_data=2.5), "n_data"),
        (dict(nce_k=0), "nce_k"),
        (dict(feat_dim=0), "feat_dim"),
        (dict(nce_t=0.0), "nce_t"),
        (dict(nce_m=1.0), "nce_m"),
        (dict(nce_m=-0.1), "nce_m"),
        (dict(weight=-1.0), "weight"),
    ],
)
def test_bad_arguments(kw, match):
    args = dict(n_data=10)
    args.update(kw)
    n = args.pop("n_data")
    with pytest.raises(ValueError, match=match):
        CRDLoss("a", "b", n, **args)


# --------------------------------------------------------------------------- in a Distiller


def test_trains_inside_a_distiller():
    from kdistill import Distiller

    torch.manual_seed(0)
    teacher = nn.Sequential()
    teacher.add_module("body", nn.Sequential(nn.Linear(6, 16), nn.ReLU()))
    teacher.add_module("head", nn.Linear(16, 3))
    student = nn.Sequential()
    student.add_module("body", nn.Sequential(nn.Linear(6, 8), nn.ReLU()))
    student.add_module("head", nn.Linear(8, 3))
    loss = CRDLoss("body", "body", n_data=40, feat_dim=8, nce_k=16)
    memory_before = loss.student_memory.clone()
    distiller = Distiller(student=student, teacher=teacher, device="cpu")
    distiller.compile(optimizer=torch.optim.SGD(student.parameters(), lr=0.01), distillation_loss_fn=loss, alpha=0.5)
    history = distiller.fit(torch.randn(40, 6), torch.randint(0, 3, (40,)), epochs=1, batch_size=16, verbose=0)
    assert math.isfinite(history.history["loss"][-1])
    params = {id(p) for g in distiller.optimizer.param_groups for p in g["params"]}
    assert all(id(p) in params for p in (*loss.embed_s.parameters(), *loss.embed_t.parameters()))
    assert not torch.isnan(loss.log_normalizers).any()
    assert not torch.equal(loss.student_memory, memory_before)  # every row was visited once
    assert (loss.student_memory != memory_before).any(dim=1).all()
