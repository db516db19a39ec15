"""Token-level losses for language models: each checked against its paper's formula computed
independently here (plain Python floats, float64), the chunked computation against the
unchunked one (values and gradients), and GKD's generalized JSD against TRL's."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from kdistill.config import builtin_losses, resolve_callable, validate_config
from kdistill.experiment import build_losses
from kdistill.losses import (
    GeneralizedJSDLoss,
    JSDivergenceLoss,
    KDLoss,
    ReverseKLLoss,
    SkewKLLoss,
    SkewReverseKLLoss,
    TokenKLLoss,
    TotalVariationLoss,
    generalized_jsd_loss,
    js_divergence_loss,
    kd_loss,
    reverse_kl_loss,
    skew_kl_loss,
    token_kl_loss,
    total_variation_loss,
)
from kdistill.losses import tokens
from kdistill.outputs import IGNORE_INDEX, Batch, Outputs

TEMPERATURES = [1.0, 2.0]


# --------------------------------------------------------------------------- reference
# Plain Python floats, one position and one vocabulary entry at a time: nothing here calls
# the code under test or shares its vectorised tricks (no log-space mixtures either).


def rows(z: torch.Tensor) -> list[list[float]]:
    """(B, T, V) -> a list of rows of Python floats (positions flattened)."""
    return z.detach().to(torch.float64).reshape(-1, z.shape[-1]).tolist()


def softmax(row: list[float], temperature: float) -> list[float]:
    top = max(row)
    e = [math.exp((x - top) / temperature) for x in row]
    total = sum(e)
    return [x / total for x in e]


def kl(p: list[float], q: list[float]) -> float:
    """sum_v p_v log(p_v / q_v), with 0 log 0 = 0."""
    return sum(pv * math.log(pv / qv) for pv, qv in zip(p, q) if pv > 0)


def mix(w: float, p: list[float], q: list[float]) -> list[float]:
    return [w * pv + (1 - w) * qv for pv, qv in zip(p, q)]


def ref_forward_kl(ps, pt, **_):
    return kl(pt, ps)


def ref_reverse_kl(ps, pt, **_):
    return kl(ps, pt)


def ref_gjsd(ps, pt, *, beta):
    """Agarwal et al. 2024, Eq. 1; beta = 0 forward KL and beta = 1 reverse KL (TRL's ends)."""
    if beta == 0:
        return kl(pt, ps)
    if beta == 1:
        return kl(ps, pt)
    m = mix(beta, pt, ps)
    return beta * kl(pt, m) + (1 - beta) * kl(ps, m)


def ref_skew_forward(ps, pt, *, lam):
    """Ko et al. 2024: KL(p_t || lam p_t + (1 - lam) p_s)."""
    return kl(pt, mix(lam, pt, ps))


def ref_skew_reverse(ps, pt, *, lam):
    """Ko et al. 2024: KL(p_s || lam p_s + (1 - lam) p_t)."""
    return kl(ps, mix(lam, ps, pt))


def ref_tv(ps, pt, **_):
    return 0.5 * sum(abs(a - b) for a, b in zip(pt, ps))


def reference(divergence, zs, zt, temperature, *, mask=None, squared=True, reduction="mean", **params) -> float:
    keep = [True] * (zs.numel() // zs.shape[-1]) if mask is None else mask.reshape(-1).tolist()
    values = [
        divergence(softmax(s, temperature), softmax(t, temperature), **params)
        for s, t, k in zip(rows(zs), rows(zt), keep)
        if k
    ]
    total = sum(values)
    if reduction == "mean":
        total = total / len(values) if values else 0.0
    return total * (temperature**2 if squared else 1.0)


# (name, function under test, its keyword arguments, the reference, the reference's parameters)
CASES = [
    ("forward_kl", token_kl_loss, {}, ref_forward_kl, {}),
    ("reverse_kl", token_kl_loss, {"direction": "reverse"}, ref_reverse_kl, {}),
    ("gjsd_0", generalized_jsd_loss, {"beta": 0.0}, ref_gjsd, {"beta": 0.0}),
    ("gjsd_0.3", generalized_jsd_loss, {"beta": 0.3}, ref_gjsd, {"beta": 0.3}),
    ("gjsd_0.5", generalized_jsd_loss, {"beta": 0.5}, ref_gjsd, {"beta": 0.5}),
    ("gjsd_1", generalized_jsd_loss, {"beta": 1.0}, ref_gjsd, {"beta": 1.0}),
    ("skew_kl", skew_kl_loss, {"lam": 0.1}, ref_skew_forward, {"lam": 0.1}),
    ("skew_kl_0.4", skew_kl_loss, {"lam": 0.4}, ref_skew_forward, {"lam": 0.4}),
    ("skew_reverse_kl", skew_kl_loss, {"lam": 0.1, "direction": "reverse"}, ref_skew_reverse, {"lam": 0.1}),
    ("total_variation", total_variation_loss, {}, ref_tv, {}),
]
IDS = [c[0] for c in CASES]
FUNCTIONS = {c[0]: (c[1], c[2]) for c in CASES}


def logits(*shape, dtype=torch.float64, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(*shape, generator=g, dtype=torch.float64)).to(dtype)


def pair(b=2, t=5, v=7, dtype=torch.float64, seed=0):
    zs = logits(b, t, v, dtype=dtype, seed=seed).requires_grad_()
    zt = logits(b, t, v, dtype=dtype, seed=seed + 100)
    return zs, zt


def some_mask(b=2, t=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(b, t, generator=g) > 0.35
    m[0, 0] = True
    m[-1, -1] = False
    return m


# --------------------------------------------------------------------------- formulas


@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("chunk_size", [0, 3])
def test_each_loss_matches_its_formula(case, temperature, chunk_size):
    _, fn, kwargs, ref, params = case
    zs, zt = pair()
    mask = some_mask()
    for m in (None, mask):
        got = fn(zs, zt, temperature=temperature, mask=m, chunk_size=chunk_size, **kwargs)
        want = reference(ref, zs, zt, temperature, mask=m, **params)
        assert got.item() == pytest.approx(want, rel=1e-10, abs=1e-12)
    # unscaled form and the sum over the counted positions
    got = fn(zs, zt, temperature=temperature, mask=mask, temperature_squared=False, reduction="sum",
             chunk_size=chunk_size, **kwargs)
    want = reference(ref, zs, zt, temperature, mask=mask, squared=False, reduction="sum", **params)
    assert got.item() == pytest.approx(want, rel=1e-10, abs=1e-12)


def test_forward_kl_is_kd_loss_and_gjsd_half_is_jensen_shannon():
    zs, zt = pair()
    mask = some_mask()
    assert token_kl_loss(zs, zt, 2.0, mask=mask).item() == pytest.approx(kd_loss(zs, zt, 2.0, mask=mask).item(), rel=1e-12)
    assert generalized_jsd_loss(zs, zt, 0.5, 2.0, mask=mask).item() == pytest.approx(
        js_divergence_loss(zs, zt, 2.0, mask=mask).item(), rel=1e-12)
    assert token_kl_loss(zs, zt, 2.0, direction="reverse", mask=mask).item() == pytest.approx(
        reverse_kl_loss(zs, zt, 2.0, mask=mask).item(), rel=1e-12)
    # the ends of the generalized JSD are the two KLs
    assert generalized_jsd_loss(zs, zt, 0.0).item() == pytest.approx(token_kl_loss(zs, zt).item(), rel=1e-12)
    assert generalized_jsd_loss(zs, zt, 1.0).item() == pytest.approx(
        token_kl_loss(zs, zt, direction="reverse").item(), rel=1e-12)
    # no skew is the plain KL
    assert skew_kl_loss(zs, zt, 0.0).item() == pytest.approx(token_kl_loss(zs, zt).item(), rel=1e-12)


@pytest.mark.parametrize("name", IDS)
def test_divergences_are_zero_for_equal_distributions_and_nonnegative(name):
    fn, kwargs = FUNCTIONS[name]
    zs, zt = pair()
    assert fn(zt, zt, **kwargs).item() == pytest.approx(0.0, abs=1e-12)
    assert fn(zs, zt, **kwargs).item() > 0


def test_sum_is_mean_times_the_counted_positions():
    zs, zt = pair()
    mask = some_mask()
    for name in IDS:
        fn, kwargs = FUNCTIONS[name]
        mean = fn(zs, zt, mask=mask, **kwargs)
        total = fn(zs, zt, mask=mask, reduction="sum", **kwargs)
        assert total.item() == pytest.approx(mean.item() * int(mask.sum()), rel=1e-12)


@pytest.mark.parametrize("chunk_size", [0, 2])
@pytest.mark.parametrize("name", IDS)
def test_no_counted_position_gives_zero_and_a_zero_gradient(name, chunk_size):
    fn, kwargs = FUNCTIONS[name]
    zs, zt = pair()
    for reduction in ("mean", "sum"):
        loss = fn(zs, zt, mask=torch.zeros(2, 5, dtype=torch.bool), reduction=reduction, chunk_size=chunk_size, **kwargs)
        assert loss.item() == 0.0
        (grad,) = torch.autograd.grad(loss, zs)
        assert not grad.isnan().any() and (grad == 0).all()


def test_masked_positions_take_no_part_even_when_not_finite():
    zs, zt = pair()
    mask = some_mask()
    bad_s, bad_t = zs.detach().clone(), zt.clone()
    bad_s[~mask] = float("nan")
    bad_t[~mask] = float("inf")
    bad_s.requires_grad_()
    for chunk_size in (0, 3):
        for name in IDS:
            fn, kwargs = FUNCTIONS[name]
            want = fn(zs, zt, mask=mask, chunk_size=chunk_size, **kwargs)
            got = fn(bad_s, bad_t, mask=mask, chunk_size=chunk_size, **kwargs)
            assert got.item() == pytest.approx(want.item(), rel=1e-12)
            (grad,) = torch.autograd.grad(got, bad_s)
            assert (grad[~mask] == 0).all() and grad.isfinite().all()


def test_a_teacher_that_rules_tokens_out_with_minus_inf_gives_finite_losses_and_gradients():
    zs, zt = pair()
    zt = zt.clone()
    zt[..., 0] = float("-inf")  # the teacher never predicts entry 0
    for chunk_size in (0, 3):
        for name in ("forward_kl", "gjsd_0.5", "skew_kl", "skew_reverse_kl", "total_variation"):
            fn, kwargs = FUNCTIONS[name]
            loss = fn(zs, zt, chunk_size=chunk_size, **kwargs)
            (grad,) = torch.autograd.grad(loss, zs)
            assert loss.isfinite() and grad.isfinite().all(), name


# --------------------------------------------------------------------------- chunked == unchunked


def value_and_grad(fn, zs, zt, **kwargs):
    zs = zs.detach().requires_grad_()
    loss = fn(zs, zt, **kwargs)
    (grad,) = torch.autograd.grad(loss, zs)
    return loss.detach(), grad


@pytest.mark.parametrize("name", IDS)
@pytest.mark.parametrize("chunk_size", [1, 3, 4, 7, 100])  # 10 positions: uneven last chunks, one chunk
def test_chunked_equals_unchunked_in_float64(name, chunk_size):
    fn, kwargs = FUNCTIONS[name]
    zs, zt = pair()
    for mask in (None, some_mask()):
        for temperature in TEMPERATURES:
            v0, g0 = value_and_grad(fn, zs, zt, temperature=temperature, mask=mask, chunk_size=0, **kwargs)
            v1, g1 = value_and_grad(fn, zs, zt, temperature=temperature, mask=mask, chunk_size=chunk_size, **kwargs)
            assert v1.dtype == v0.dtype == torch.float64 and g1.dtype == torch.float64
            assert abs(v1.item() - v0.item()) <= 1e-10
            assert (g1 - g0).abs().max().item() <= 1e-10


@pytest.mark.parametrize("name", IDS)
def test_chunked_equals_unchunked_in_float32(name):
    fn, kwargs = FUNCTIONS[name]
    zs, zt = pair(b=3, t=20, v=50, dtype=torch.float32)
    mask = some_mask(3, 20)
    v0, g0 = value_and_grad(fn, zs, zt, temperature=2.0, mask=mask, chunk_size=0, **kwargs)
    v1, g1 = value_and_grad(fn, zs, zt, temperature=2.0, mask=mask, chunk_size=7, **kwargs)
    assert v1.dtype == torch.float32 and g1.dtype == torch.float32
    assert v1.item() == pytest.approx(v0.item(), rel=1e-6, abs=1e-7)
    assert torch.allclose(g1, g0, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["forward_kl", "gjsd_0.5", "skew_reverse_kl", "total_variation"])
def test_half_precision_logits_are_computed_in_float32_chunk_by_chunk(name, dtype):
    fn, kwargs = FUNCTIONS[name]
    zs, zt = pair(b=2, t=9, v=33, dtype=dtype)
    mask = some_mask(2, 9)
    v0, g0 = value_and_grad(fn, zs, zt, temperature=2.0, mask=mask, chunk_size=0, **kwargs)
    v1, g1 = value_and_grad(fn, zs, zt, temperature=2.0, mask=mask, chunk_size=4, **kwargs)
    assert v0.dtype == v1.dtype == torch.float32  # computed in float32
    assert g1.dtype == dtype  # the gradient buffer is in the logits' dtype
    assert v1.item() == pytest.approx(v0.item(), rel=1e-6)
    # both gradients are float32 values rounded once to the half dtype
    assert torch.allclose(g1.float(), g0.float(), rtol=1e-2, atol=1e-6)
    # and the value is the float64 formula's, to float32 accuracy
    v64 = fn(zs.detach().double(), zt.double(), temperature=2.0, mask=mask, **kwargs)
    assert v1.item() == pytest.approx(v64.item(), rel=1e-5)


def test_the_gradient_is_scaled_by_what_flows_back():
    zs, zt = pair()
    for chunk_size in (0, 3):
        zs_ = zs.detach().requires_grad_()
        (0.25 * generalized_jsd_loss(zs_, zt, 0.3, chunk_size=chunk_size)).backward()
        if chunk_size == 0:
            plain = zs_.grad
    assert torch.allclose(zs_.grad, plain, rtol=0, atol=1e-12)
    # a graph kept for a second backward gives the same gradient twice
    zs_ = zs.detach().requires_grad_()
    loss = token_kl_loss(zs_, zt, chunk_size=3)
    (g1,) = torch.autograd.grad(loss, zs_, retain_graph=True)
    (g2,) = torch.autograd.grad(loss, zs_)
    assert torch.equal(g1, g2)


def test_the_gradient_buffer_is_freed_by_backward():
    zs, zt = pair()
    loss = token_kl_loss(zs, zt, chunk_size=3)
    assert loss.grad_fn.saved_tensors[0].shape == (10, 7)  # the (N, V) buffer, until backward
    loss.backward()
    with pytest.raises(RuntimeError, match="freed"):
        loss.grad_fn.saved_tensors


def test_automatic_chunks_bound_the_logits_per_chunk(monkeypatch):
    zs, zt = pair(b=2, t=10, v=8)
    want = value_and_grad(token_kl_loss, zs, zt, chunk_size=0)
    calls = []
    real = tokens._ChunkedTokenLoss.apply
    monkeypatch.setattr(tokens._ChunkedTokenLoss, "apply", lambda *a: calls.append(a[5]) or real(*a))
    # all 20 positions fit in one default chunk: the plain computation
    value_and_grad(token_kl_loss, zs, zt)
    assert calls == []
    monkeypatch.setattr(tokens, "DEFAULT_CHUNK_ELEMENTS", 8 * 6)  # 6 positions per chunk
    got = value_and_grad(token_kl_loss, zs, zt)
    assert calls == [6]
    assert torch.allclose(got[0], want[0], rtol=0, atol=1e-12) and torch.allclose(got[1], want[1], rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", IDS)
def test_gradcheck_of_the_chunked_function(name):
    fn, kwargs = FUNCTIONS[name]
    zs, zt = pair(b=2, t=3, v=5)
    mask = torch.tensor([[True, False, True], [True, True, False]])
    assert torch.autograd.gradcheck(
        lambda z: fn(z, zt, temperature=2.0, mask=mask, chunk_size=2, **kwargs), (zs,), eps=1e-6, atol=1e-7)


def test_without_grad_no_gradient_is_computed_and_the_teacher_is_never_trained():
    zs, zt = pair()
    value = token_kl_loss(zs.detach(), zt, chunk_size=3)
    assert not value.requires_grad
    assert value.item() == pytest.approx(token_kl_loss(zs, zt, chunk_size=0).item(), rel=1e-12)
    zt = zt.clone().requires_grad_()
    for chunk_size in (0, 3):
        zs_ = zs.detach().requires_grad_()
        generalized_jsd_loss(zs_, zt, 0.5, chunk_size=chunk_size).backward()
        assert zt.grad is None and zs_.grad is not None


def test_classifier_logits_work_too():
    zs, zt = logits(6, 4).requires_grad_(), logits(6, 4, seed=3)
    want = reference(ref_gjsd, zs, zt, 3.0, beta=0.2)
    assert generalized_jsd_loss(zs, zt, 0.2, 3.0, chunk_size=4).item() == pytest.approx(want, rel=1e-10)
    loss = GeneralizedJSDLoss(0.2, 3.0)(Outputs(zs), Outputs(zt), Batch(torch.zeros(6, 2), torch.arange(6) % 4))
    assert loss.item() == pytest.approx(want, rel=1e-10)


# --------------------------------------------------------------------------- bad input


def test_vocabulary_mismatch_message():
    zs, zt = torch.zeros(1, 2, 10), torch.zeros(1, 2, 12)
    for call in (lambda: token_kl_loss(zs, zt), lambda: TotalVariationLoss()(Outputs(zs), Outputs(zt), None)):
        with pytest.raises(ValueError) as e:
            call()
        msg = str(e.value)
        assert "the student's vocabulary has 10 entries and the teacher's 12" in msg
        assert "vocab_size=<tokenizer size> to Distiller.compile" in msg and "same tokenizer" in msg
    with pytest.raises(ValueError, match=r"shape \(1, 2, 10\) and teacher logits \(1, 3, 10\)"):
        token_kl_loss(zs, torch.zeros(1, 3, 10))


def test_bad_arguments_name_the_value_and_the_range():
    zs, zt = pair()
    with pytest.raises(ValueError, match=r"beta must be in \[0, 1\], got 1.5"):
        generalized_jsd_loss(zs, zt, 1.5)
    with pytest.raises(ValueError, match=r"lam must be in \[0, 1\), got 1"):
        SkewKLLoss(lam=1)
    with pytest.raises(ValueError, match="direction must be 'forward'"):
        TokenKLLoss("backward")
    with pytest.raises(ValueError, match="reduction must be 'mean'"):
        total_variation_loss(zs, zt, reduction="batchmean")
    with pytest.raises(ValueError, match="chunk_size must be a whole number"):
        token_kl_loss(zs, zt, chunk_size=-1)
    with pytest.raises(ValueError, match="temperature must be a positive number"):
        GeneralizedJSDLoss(temperature=0)
    with pytest.raises(ValueError, match=r"mask has shape \(2,\) but the logits have \(2, 5\) positions"):
        token_kl_loss(zs, zt, mask=torch.ones(2, dtype=torch.bool))


# --------------------------------------------------------------------------- modules


MODULES = [
    (TokenKLLoss(temperature=2.0), "forward_kl"),
    (TokenKLLoss("reverse", temperature=2.0), "reverse_kl"),
    (GeneralizedJSDLoss(0.3, 2.0), "gjsd_0.3"),
    (SkewKLLoss(0.1, 2.0), "skew_kl"),
    (SkewReverseKLLoss(0.1, 2.0), "skew_reverse_kl"),
    (TotalVariationLoss(2.0), "total_variation"),
]


@pytest.mark.parametrize("module, name", MODULES, ids=[m[1] for m in MODULES])
def test_modules_average_over_the_batch_s_trained_on_tokens(module, name):
    fn, kwargs = FUNCTIONS[name]
    zs, zt = pair()
    mask = some_mask()
    targets = torch.where(mask, torch.randint(0, 7, (2, 5)), torch.full((2, 5), IGNORE_INDEX))
    batch = Batch({"input_ids": torch.zeros(2, 5, dtype=torch.long)}, targets)
    got = module(Outputs(zs), Outputs(zt), batch)
    assert got.item() == pytest.approx(fn(zs, zt, temperature=2.0, mask=mask, **kwargs).item(), rel=1e-12)
    # without per-token targets every position counts
    assert module(Outputs(zs), Outputs(zt), None).item() == pytest.approx(
        fn(zs, zt, temperature=2.0, **kwargs).item(), rel=1e-12)
    assert module(Outputs(zs), Outputs(zt), Batch(torch.zeros(2, 5))).item() == pytest.approx(
        fn(zs, zt, temperature=2.0, **kwargs).item(), rel=1e-12)
    # what the engine reads
    assert module.temperature == 2.0 and module.nonnegative
    got.backward()
    assert zs.grad is not None and (zs.grad[~mask] == 0).all()


def test_temperature_squared_switch():
    zs, zt = pair()
    scaled = GeneralizedJSDLoss(0.5, 2.0)(Outputs(zs), Outputs(zt))
    plain = GeneralizedJSDLoss(0.5, 2.0, temperature_squared=False)(Outputs(zs), Outputs(zt))
    assert scaled.item() == pytest.approx(4.0 * plain.item(), rel=1e-12)


def test_names_resolve_to_these_classes_without_taking_other_losses_names():
    table = builtin_losses()
    mine = {
        TokenKLLoss: ("forward_kl", "token_kl", "TokenKLLoss"),
        GeneralizedJSDLoss: ("generalized_jsd", "gkd", "jsd_beta", "GeneralizedJSDLoss"),
        SkewKLLoss: ("skew_kl", "skew_forward_kl", "SkewKLLoss"),
        SkewReverseKLLoss: ("skew_reverse_kl", "SkewReverseKLLoss"),
        TotalVariationLoss: ("total_variation", "tv", "TotalVariationLoss"),
    }
    for cls, names in mine.items():
        for name in names:
            assert resolve_callable(table[name]) is cls, name
    # the classifier losses keep their names
    assert resolve_callable(table["reverse_kl"]) is ReverseKLLoss
    assert resolve_callable(table["js_divergence"]) is JSDivergenceLoss
    assert resolve_callable(table["kd"]) is KDLoss


def test_yaml_names_build_the_losses_with_their_arguments():
    cfg = validate_config({"stages": {"distil": {"temperature": 2.0, "losses": [
        {"name": "gkd", "beta": 0.9, "chunk_size": 64},
        {"name": "skew_reverse_kl", "lam": 0.2, "weight": 0.5},
        {"name": "token_kl", "direction": "reverse", "temperature": 1.0},
    ]}}})
    loss = build_losses(cfg.stages.distil)
    gkd, skew, rkl = loss.parts.values()
    assert isinstance(gkd, GeneralizedJSDLoss) and gkd.beta == 0.9 and gkd.chunk_size == 64
    assert gkd.temperature == 2.0  # the stage's temperature, owned by the loss
    assert isinstance(skew, SkewReverseKLLoss) and skew.direction == "reverse" and skew.lam == 0.2
    assert loss.weights["skew_reverse_kl"] == 0.5
    assert isinstance(rkl, TokenKLLoss) and rkl.direction == "reverse" and rkl.temperature == 1.0


# --------------------------------------------------------------------------- TRL parity


def test_generalized_jsd_equals_trl_gkd():
    pytest.importorskip("trl")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gkd_trainer = pytest.importorskip("trl.experimental.gkd.gkd_trainer")
    trl_loss = gkd_trainer.GKDTrainer.generalized_jsd_loss
    labels = torch.randint(0, 19, (3, 7), generator=torch.Generator().manual_seed(5))
    labels[some_mask(3, 7)] = IGNORE_INDEX
    mask = labels != IGNORE_INDEX
    # float64: the same numbers; float32: to 1e-6 of the loss's size (float32 rounding)
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-6)):
        zs, zt = pair(b=3, t=7, v=19, dtype=dtype)
        for beta in (0.0, 0.5, 1.0):
            for temperature in TEMPERATURES:
                for chunk_size in (0, 4):
                    want, want_grad = value_and_grad(
                        lambda s, t: trl_loss(s, t, labels=labels, beta=beta, temperature=temperature), zs, zt)
                    got, grad = value_and_grad(generalized_jsd_loss, zs, zt, beta=beta, temperature=temperature,
                                               temperature_squared=False, mask=mask, chunk_size=chunk_size)
                    assert abs(got.item() - want.item()) <= tol * max(1.0, abs(want.item())), (dtype, beta, temperature)
                    assert (grad - want_grad).abs().max().item() <= tol, (dtype, beta, temperature)
