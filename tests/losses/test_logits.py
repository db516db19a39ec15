"""Losses on logits, checked against Hinton et al.'s formula computed independently."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from kdistill.errors import InvalidDivergenceError
from kdistill.losses import (
    KDLoss,
    KLDivergence,
    SoftTargetLoss,
    check_divergence,
    kd_loss,
    kl_divergence,
)
from kdistill.losses.logits import EPSILON
from kdistill.outputs import Batch, Outputs


# --------------------------------------------------------------------------- reference


def np_softmax(z: np.ndarray, temperature: float) -> np.ndarray:
    z = np.asarray(z, dtype=np.float64) / temperature
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def hinton_reference(zs, zt, temperature, *, squared=True, mask=None) -> float:
    """T^2 * mean over positions of sum_c p_t log(p_t / p_s), in float64 NumPy."""
    p_s = np_softmax(zs, temperature)
    p_t = np_softmax(zt, temperature)
    per_pos = (p_t * (np.log(p_t) - np.log(p_s))).sum(axis=-1)
    if mask is not None:
        m = np.asarray(mask, dtype=bool)
        value = per_pos[m].mean()
    else:
        value = per_pos.mean()
    return float(value * temperature**2 if squared else value)


def logits(*shape, seed=0, scale=3.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def outs(z: torch.Tensor) -> Outputs:
    return Outputs(logits=z)


def batch_of(n: int) -> Batch:
    return Batch(torch.zeros(n, 1), torch.zeros(n, dtype=torch.long), torch.arange(n))


# --------------------------------------------------------------------------- kd_loss


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0, 4.0, 10.0, 20.0])
def test_kd_loss_matches_hinton_formula_2d(temperature):
    zs, zt = logits(8, 5, seed=1), logits(8, 5, seed=2)
    got = kd_loss(zs, zt, temperature)
    want = hinton_reference(zs.numpy(), zt.numpy(), temperature)
    assert got.shape == ()
    assert float(got) == pytest.approx(want, rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_kd_loss_matches_hinton_formula_sequences(temperature):
    zs, zt = logits(3, 4, 7, seed=3), logits(3, 4, 7, seed=4)
    got = kd_loss(zs, zt, temperature)
    want = hinton_reference(zs.numpy(), zt.numpy(), temperature)
    assert float(got) == pytest.approx(want, rel=1e-5)


def test_kd_loss_float64_inputs_are_not_downcast():
    zs, zt = logits(6, 4, seed=5, dtype=torch.float64), logits(6, 4, seed=6, dtype=torch.float64)
    got = kd_loss(zs, zt, 2.0)
    assert got.dtype == torch.float64
    assert float(got) == pytest.approx(hinton_reference(zs.numpy(), zt.numpy(), 2.0), rel=1e-12)


def test_kd_loss_half_precision_is_computed_in_float32():
    zs, zt = logits(6, 4, seed=5), logits(6, 4, seed=6)
    got = kd_loss(zs.bfloat16(), zt.bfloat16(), 2.0)
    assert got.dtype == torch.float32
    want = hinton_reference(zs.bfloat16().float().numpy(), zt.bfloat16().float().numpy(), 2.0)
    assert float(got) == pytest.approx(want, rel=1e-5)


def test_kd_loss_mask_2d_leaves_rows_out():
    zs, zt = logits(6, 5, seed=7), logits(6, 5, seed=8)
    mask = torch.tensor([True, False, True, True, False, False])
    got = kd_loss(zs, zt, 2.0, mask=mask)
    want = hinton_reference(zs.numpy(), zt.numpy(), 2.0, mask=mask.numpy())
    assert float(got) == pytest.approx(want, rel=1e-5)
    # and it differs from the unmasked mean, so the mask really did something
    assert float(got) != pytest.approx(float(kd_loss(zs, zt, 2.0)), rel=1e-3)


def test_kd_loss_mask_sequences_and_masked_positions_cannot_leak():
    zs, zt = logits(2, 5, 6, seed=9), logits(2, 5, 6, seed=10)
    mask = torch.tensor([[True, True, True, False, False], [True, False, True, True, False]])
    want = hinton_reference(zs.numpy(), zt.numpy(), 3.0, mask=mask.numpy())
    assert float(kd_loss(zs, zt, 3.0, mask=mask)) == pytest.approx(want, rel=1e-5)
    # padding positions holding garbage (NaN) must not change a masked loss
    zs_pad = zs.clone()
    zs_pad[~mask] = float("nan")
    assert float(kd_loss(zs_pad, zt, 3.0, mask=mask)) == pytest.approx(want, rel=1e-5)


def test_kd_loss_mask_of_wrong_shape_raises():
    zs, zt = logits(4, 4, 6, seed=9), logits(4, 4, 6, seed=10)
    with pytest.raises(ValueError, match="mask has shape"):
        kd_loss(zs, zt, 2.0, mask=torch.ones(4, dtype=torch.bool))


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_temperature_squared_false_is_the_unscaled_kl(temperature):
    zs, zt = logits(5, 3, seed=11), logits(5, 3, seed=12)
    plain = kd_loss(zs, zt, temperature, temperature_squared=False)
    want = hinton_reference(zs.numpy(), zt.numpy(), temperature, squared=False)
    assert float(plain) == pytest.approx(want, rel=1e-5)
    assert float(kd_loss(zs, zt, temperature)) == pytest.approx(float(plain) * temperature**2, rel=1e-6)


def test_kd_loss_is_zero_for_equal_logits_and_per_row_shifts():
    zt = logits(7, 6, seed=13)
    shift = logits(7, 1, seed=14, scale=10.0)
    assert float(kd_loss(zt.clone(), zt, 4.0)) == pytest.approx(0.0, abs=1e-6)
    # softmax is invariant to a constant added to a row
    assert float(kd_loss(zt + shift, zt, 4.0)) == pytest.approx(0.0, abs=1e-5)


def test_kd_loss_is_positive_for_different_distributions():
    zt = logits(7, 6, seed=13)
    zs = zt.clone()
    zs[3, 2] += 1.0  # one logit of one row differs: not a per-row constant shift
    value = float(kd_loss(zs, zt, 2.0))
    assert value > 1e-5
    assert value == pytest.approx(hinton_reference(zs.numpy(), zt.numpy(), 2.0), rel=1e-4)


@pytest.mark.parametrize("temperature", [1.0, 2.5, 8.0])
def test_kd_loss_gradient_closed_form(temperature):
    """d/dz_s (T^2 KL(p_t || p_s)) averaged over B is T * (p_s - p_t) / B."""
    b = 6
    zs = logits(b, 5, seed=15, dtype=torch.float64).requires_grad_(True)
    zt = logits(b, 5, seed=16, dtype=torch.float64)
    kd_loss(zs, zt, temperature).backward()
    p_s = torch.softmax(zs.detach() / temperature, -1)
    p_t = torch.softmax(zt / temperature, -1)
    torch.testing.assert_close(zs.grad, temperature * (p_s - p_t) / b, rtol=1e-10, atol=1e-12)


def test_kd_loss_gradient_unscaled_is_t_times_smaller():
    """Without T^2 the same gradient is 1/T as large (why Hinton et al. scale by T^2)."""
    t = 5.0
    zs = logits(4, 3, seed=17, dtype=torch.float64).requires_grad_(True)
    zt = logits(4, 3, seed=18, dtype=torch.float64)
    kd_loss(zs, zt, t, temperature_squared=False).backward()
    p_s = torch.softmax(zs.detach() / t, -1)
    p_t = torch.softmax(zt / t, -1)
    torch.testing.assert_close(zs.grad, (p_s - p_t) / (t * 4), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
@pytest.mark.parametrize("temperature_squared", [True, False])
def test_kd_loss_detaches_the_teacher_and_keeps_value_and_student_gradient(dtype, temperature_squared):
    """The teacher's logits are a fixed target, as in every other logits loss: no gradient
    reaches them, while the value and the student's gradient are those of a teacher that
    never required one (bit for bit)."""
    mask = torch.tensor([True, False, True, True, False, True])
    zs_ref = logits(6, 5, seed=40, dtype=dtype).requires_grad_(True)
    zs = zs_ref.detach().clone().requires_grad_(True)
    zt = logits(6, 5, seed=41, dtype=dtype)
    zt_tracked = zt.clone().requires_grad_(True)

    expected = kd_loss(zs_ref, zt, 3.0, temperature_squared=temperature_squared, mask=mask)
    expected.backward()
    value = kd_loss(zs, zt_tracked, 3.0, temperature_squared=temperature_squared, mask=mask)
    value.backward()

    assert zt_tracked.grad is None
    assert torch.equal(value.detach(), expected.detach())
    assert torch.equal(zs.grad, zs_ref.grad)
    assert zs.grad.abs().sum() > 0


def test_kd_loss_module_sends_no_gradient_to_the_teacher():
    zs = logits(4, 3, seed=42).requires_grad_(True)
    zt = logits(4, 3, seed=43).requires_grad_(True)
    KDLoss(2.0)(outs(zs), outs(zt), batch_of(4)).backward()
    assert zt.grad is None
    assert zs.grad is not None and zs.grad.abs().sum() > 0


@pytest.mark.parametrize("bad", [0, 0.0, -1, -0.5, float("inf"), float("nan")])
def test_kd_loss_rejects_bad_temperature(bad):
    z = logits(2, 3)
    with pytest.raises(ValueError, match="temperature"):
        kd_loss(z, z, bad)
    with pytest.raises(ValueError, match="temperature"):
        KDLoss(bad)
    with pytest.raises(ValueError, match="temperature"):
        SoftTargetLoss("kl", bad)


def test_kd_loss_class_count_mismatch_names_both_counts():
    with pytest.raises(ValueError) as e:
        kd_loss(logits(4, 10), logits(4, 5), 2.0)
    assert "10" in str(e.value) and "5" in str(e.value)
    with pytest.raises(ValueError) as e:
        KDLoss(2.0)(outs(logits(4, 7)), outs(logits(4, 3)), batch_of(4))
    assert "7" in str(e.value) and "3" in str(e.value)


def test_kd_loss_shape_mismatch_with_same_class_count_names_shapes():
    with pytest.raises(ValueError) as e:
        kd_loss(logits(2, 3, 5), logits(2, 4, 5), 2.0)
    assert "(2, 3, 5)" in str(e.value) and "(2, 4, 5)" in str(e.value)


def test_kdloss_module_matches_function():
    zs, zt = logits(5, 4, seed=19), logits(5, 4, seed=20)
    m = KDLoss(3.0, temperature_squared=False)
    assert float(m(outs(zs), outs(zt), batch_of(5))) == pytest.approx(
        float(kd_loss(zs, zt, 3.0, temperature_squared=False)), rel=1e-6
    )


# --------------------------------------------------------------------------- KLDivergence


def test_kl_divergence_matches_clipped_formula():
    p_s = np_softmax(logits(6, 5, seed=21).numpy(), 1.0)
    p_t = np_softmax(logits(6, 5, seed=22).numpy(), 1.0)
    p_t[0] = [1.0, 0.0, 0.0, 0.0, 0.0]  # exact zeros: clipping keeps log finite
    p_s[1] = [0.0, 0.0, 0.5, 0.5, 0.0]
    t = np.clip(p_t, EPSILON, 1.0)
    s = np.clip(p_s, EPSILON, 1.0)
    per_row = (t * (np.log(t) - np.log(s))).sum(-1)
    got_rows = kl_divergence(torch.tensor(p_s), torch.tensor(p_t))
    np.testing.assert_allclose(got_rows.numpy(), per_row, rtol=1e-10)
    got = KLDivergence()(torch.tensor(p_s), torch.tensor(p_t))
    assert math.isfinite(float(got))
    assert float(got) == pytest.approx(per_row.mean(), rel=1e-10)


def test_kl_divergence_argument_order_is_student_then_teacher():
    p_s = torch.tensor([[0.7, 0.2, 0.1]], dtype=torch.float64)
    p_t = torch.tensor([[0.1, 0.3, 0.6]], dtype=torch.float64)
    want = float((p_t * (p_t.log() - p_s.log())).sum())  # KL(teacher || student)
    assert float(KLDivergence()(p_s, p_t)) == pytest.approx(want, rel=1e-10)
    assert float(KLDivergence()(p_t, p_s)) != pytest.approx(want, rel=1e-3)


# --------------------------------------------------------------------------- SoftTargetLoss


@pytest.mark.parametrize("fn", [KLDivergence(), "kl", "KL_Divergence"])
@pytest.mark.parametrize("squared", [True, False])
def test_soft_target_loss_with_kl_equals_kd_loss(fn, squared):
    zs, zt = logits(6, 5, seed=23), logits(6, 5, seed=24)
    loss = SoftTargetLoss(fn, 4.0, temperature_squared=squared)
    got = loss(outs(zs), outs(zt), batch_of(6))
    want = kd_loss(zs, zt, 4.0, temperature_squared=squared)
    assert float(got) == pytest.approx(float(want), rel=1e-6)


def test_soft_target_loss_calls_user_fn_with_student_then_teacher_probabilities():
    t = 2.0
    zs, zt = logits(5, 4, seed=25), logits(5, 4, seed=26)
    seen = []

    def recording(a, b):
        seen.append((a.detach().clone(), b.detach().clone()))
        torch.testing.assert_close(a.sum(-1), torch.ones(5), rtol=0, atol=1e-5)
        torch.testing.assert_close(b.sum(-1), torch.ones(5), rtol=0, atol=1e-5)
        assert bool((a >= 0).all()) and bool((b >= 0).all())
        return (b * (b.log() - a.log())).sum(-1).mean()

    value = SoftTargetLoss(recording, t)(outs(zs), outs(zt), batch_of(5))
    assert len(seen) == 1
    a, b = seen[0]
    torch.testing.assert_close(a, torch.softmax(zs / t, -1))  # first: the student's
    torch.testing.assert_close(b, torch.softmax(zt / t, -1))  # second: the teacher's
    assert float(value) == pytest.approx(hinton_reference(zs.numpy(), zt.numpy(), t), rel=1e-5)


def test_soft_target_loss_name_is_the_user_fn_name():
    def my_divergence(a, b):
        return (b * (b.log() - a.log())).sum(-1).mean()

    assert SoftTargetLoss(my_divergence, 2.0).name == "my_divergence"


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_soft_target_loss_with_torch_kldivloss_batchmean_equals_kd_loss(temperature):
    zs, zt = logits(6, 5, seed=27), logits(6, 5, seed=28)
    got = SoftTargetLoss(nn.KLDivLoss(reduction="batchmean"), temperature)(outs(zs), outs(zt), batch_of(6))
    assert float(got) == pytest.approx(float(kd_loss(zs, zt, temperature)), rel=1e-5)


def test_soft_target_loss_with_torch_kldivloss_log_target():
    zs, zt = logits(6, 5, seed=27), logits(6, 5, seed=28)
    fn = nn.KLDivLoss(reduction="batchmean", log_target=True)
    got = SoftTargetLoss(fn, 2.0)(outs(zs), outs(zt), batch_of(6))
    assert float(got) == pytest.approx(float(kd_loss(zs, zt, 2.0)), rel=1e-5)


def test_soft_target_loss_averages_per_sample_values():
    zs, zt = logits(6, 5, seed=29), logits(6, 5, seed=30)
    per_sample = SoftTargetLoss(kl_divergence, 3.0, temperature_squared=False)(outs(zs), outs(zt), batch_of(6))
    want = hinton_reference(zs.numpy(), zt.numpy(), 3.0, squared=False)
    assert float(per_sample) == pytest.approx(want, rel=1e-4)


def test_soft_target_loss_per_token_values_for_sequences():
    zs, zt = logits(2, 3, 5, seed=31), logits(2, 3, 5, seed=32)
    got = SoftTargetLoss(kl_divergence, 2.0)(outs(zs), outs(zt), batch_of(2))
    assert float(got) == pytest.approx(hinton_reference(zs.numpy(), zt.numpy(), 2.0), rel=1e-4)


@pytest.mark.parametrize(
    "fn",
    [
        lambda s, t: (t * (t.log() - s.log())),  # unreduced (B, C): forgot .sum(-1)
        lambda s, t: torch.zeros(3),  # neither scalar nor one per sample
        nn.KLDivLoss(reduction="none"),
    ],
)
def test_soft_target_loss_wrong_shaped_output_raises(fn):
    zs, zt = logits(6, 5, seed=33), logits(6, 5, seed=34)
    with pytest.raises(ValueError, match=r"returned shape"):
        SoftTargetLoss(fn, 2.0)(outs(zs), outs(zt), batch_of(6))


def test_soft_target_loss_non_tensor_output_raises():
    zs, zt = logits(6, 5), logits(6, 5)
    with pytest.raises(TypeError, match="torch.Tensor"):
        SoftTargetLoss(lambda s, t: 1.0, 2.0)(outs(zs), outs(zt), batch_of(6))


def test_soft_target_loss_unknown_name_lists_names():
    with pytest.raises(ValueError) as e:
        SoftTargetLoss("mse_of_doom", 2.0)
    msg = str(e.value)
    assert "mse_of_doom" in msg
    for name in ("kl", "kld", "kl_divergence"):
        assert f"'{name}'" in msg


def test_soft_target_loss_rejects_a_class_instead_of_an_instance():
    with pytest.raises(TypeError, match=r"KLDivergence\(\)"):
        SoftTargetLoss(KLDivergence, 2.0)


def test_soft_target_loss_rejects_non_callable():
    with pytest.raises(TypeError, match="callable"):
        SoftTargetLoss(42, 2.0)


# --------------------------------------------------------------------------- check_divergence


def test_check_divergence_raises_for_negative_and_names_the_loss():
    with pytest.raises(InvalidDivergenceError) as e:
        check_divergence("my_kl", -0.25)
    assert "my_kl" in str(e.value)
    assert "-0.25" in str(e.value)
    assert isinstance(e.value, ValueError)  # catchable as the built-in callers expect


@pytest.mark.parametrize("value", [-1e-7, 0.0, 1e-7, 3.5])
def test_check_divergence_passes_rounding_and_positive_values(value):
    check_divergence("kl", value)  # no exception
