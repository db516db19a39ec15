"""Feature losses (FitNets, AT, NST, VID, FT), each checked against its paper's formula
computed independently in float64 NumPy on small random maps."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.autograd import gradcheck
from torch.func import functional_call

from kdistill.adapters import MapAdapter
from kdistill.losses.features import (
    ATLoss,
    FTLoss,
    HintLoss,
    NSTLoss,
    Paraphraser,
    VIDLoss,
    at_loss,
    attention_map,
    ft_loss,
    hint_loss,
    match_spatial,
    nst_loss,
    vid_loss,
    vid_variance,
)
from kdistill.outputs import Batch, Outputs

S_LAYER, T_LAYER = "layer2", "block3.conv"


# --------------------------------------------------------------------------- helpers


def maps(*shape, seed=0, relu=False) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g, dtype=torch.float64)
    return x.clamp_min(0) if relu else x


def outputs(s: torch.Tensor, t: torch.Tensor) -> tuple[Outputs, Outputs, Batch]:
    b = s.shape[0]
    student = Outputs(torch.zeros(b, 3, dtype=s.dtype), features={S_LAYER: s})
    teacher = Outputs(torch.zeros(b, 3, dtype=t.dtype), features={T_LAYER: t})
    return student, teacher, Batch(torch.zeros(b, 1), torch.zeros(b, dtype=torch.long))


def block_mean(x: np.ndarray, h: int, w: int) -> np.ndarray:
    """Average pooling to (h, w) by explicit blocks (sizes must divide)."""
    b, c, hh, ww = x.shape
    return x.reshape(b, c, h, hh // h, w, ww // w).mean(axis=(3, 5))


def common_size(s: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    h, w = min(s.shape[2], t.shape[2]), min(s.shape[3], t.shape[3])
    return block_mean(s, h, w), block_mean(t, h, w)


def check_param_grads(loss: nn.Module, student: Outputs, teacher: Outputs, prefixes: tuple[str, ...]) -> None:
    """gradcheck of the loss as a function of its parameters whose names start with ``prefixes``."""
    params = {n: p for n, p in loss.named_parameters() if n.startswith(prefixes)}
    assert params, f"no parameters under {prefixes}"
    names = list(params)
    inputs = tuple(params[n].detach().clone().requires_grad_(True) for n in names)

    def fn(*values):
        return functional_call(loss, dict(zip(names, values)), (student, teacher, None))

    assert gradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-4)


# --------------------------------------------------------------------------- references


def hint_ref(a: np.ndarray, b: np.ndarray) -> float:
    return float(((a - b) ** 2).sum() / a.size)


def at_ref(s: np.ndarray, t: np.ndarray, p: float) -> float:
    """(1/(B*H*W)) sum_b sum_j (Q_s - Q_t)^2, Q = vec(sum_c |A_c|^p) / ||.||_2."""
    s, t = common_size(s, t)
    total, count = 0.0, 0
    for b in range(s.shape[0]):
        q = []
        for f in (s[b], t[b]):
            a = (np.abs(f) ** p).sum(axis=0).reshape(-1)  # sum over channels; normalising removes 1/C
            q.append(a / math.sqrt((a * a).sum()))
        total += ((q[0] - q[1]) ** 2).sum()
        count += q[0].size
    return total / count


def nst_ref(s: np.ndarray, t: np.ndarray) -> float:
    """Batch mean of MMD^2 with k(x, y) = (x.y)^2 between L2-normalised channel maps."""
    s, t = common_size(s, t)
    vals = []
    for b in range(s.shape[0]):
        fs = [v / np.linalg.norm(v) for v in s[b].reshape(s.shape[1], -1)]
        ft = [v / np.linalg.norm(v) for v in t[b].reshape(t.shape[1], -1)]
        k = lambda x, y: float(np.dot(x, y)) ** 2  # noqa: E731
        tt = sum(k(x, y) for x in ft for y in ft) / len(ft) ** 2
        ss = sum(k(x, y) for x in fs for y in fs) / len(fs) ** 2
        st = sum(k(x, y) for x in fs for y in ft) / (len(fs) * len(ft))
        vals.append(tt + ss - 2 * st)
    return float(np.mean(vals))


def vid_ref(mu: np.ndarray, t: np.ndarray, alpha: np.ndarray, eps: float) -> float:
    var = np.log1p(np.exp(alpha)) + eps
    total = 0.0
    for c in range(mu.shape[1]):
        d = t[:, c] - mu[:, c]
        total += (d * d / (2 * var[c]) + 0.5 * math.log(var[c])).sum()
    return total / mu.size


def ft_ref(fs: np.ndarray, ft: np.ndarray, p: float) -> float:
    fs, ft = common_size(fs, ft)
    total = 0.0
    for b in range(fs.shape[0]):
        us = fs[b].reshape(-1) / np.linalg.norm(fs[b])
        ut = ft[b].reshape(-1) / np.linalg.norm(ft[b])
        total += (np.abs(ut - us) ** p).sum() / us.size
    return total / fs.shape[0]


# --------------------------------------------------------------------------- FitNets


def test_hint_loss_is_the_mean_squared_error():
    s, t = maps(3, 4, 5, 5, seed=1), maps(3, 4, 5, 5, seed=2)
    assert hint_loss(s, t).item() == pytest.approx(hint_ref(s.numpy(), t.numpy()), rel=1e-12)
    assert hint_loss(t, t).item() == 0.0


def test_hint_loss_rejects_shapes_that_differ():
    with pytest.raises(ValueError, match=r"make_adapter"):
        hint_loss(maps(2, 3, 4, 4), maps(2, 5, 4, 4))


def test_hint_module_with_matching_shapes_uses_identity_and_weight_100():
    s, t = maps(2, 4, 4, 4, seed=1), maps(2, 4, 4, 4, seed=2)
    loss = HintLoss(S_LAYER, T_LAYER)
    assert loss.taps == {"student": S_LAYER, "teacher": T_LAYER}
    assert loss.weight == 100.0 and loss.nonnegative
    loss.setup(*outputs(s, t)[:2])
    assert isinstance(loss.adapter, nn.Identity)
    assert loss(*outputs(s, t)).item() == pytest.approx(100 * hint_ref(s.numpy(), t.numpy()), rel=1e-12)
    assert loss(*outputs(t, t)).item() == 0.0


def test_hint_module_adapts_channels_and_spatial_size_built_in_setup():
    s, t = maps(3, 2, 8, 8, seed=3), maps(3, 5, 4, 4, seed=4)
    loss = HintLoss(S_LAYER, T_LAYER, weight=2.0)
    student, teacher, batch = outputs(s, t)
    loss.setup(student, teacher)
    assert isinstance(loss.adapter, MapAdapter)
    assert loss.adapter.conv.weight.dtype == torch.float64
    value = loss(student, teacher, batch)
    with torch.no_grad():
        expected = 2.0 * hint_loss(loss.adapter(s), t)
    assert value.item() == pytest.approx(expected.item(), rel=1e-12)
    # the adapter is trained with the student: its gradients are right
    check_param_grads(loss, student, teacher, ("adapter.",))


def test_hint_setup_twice_keeps_the_trained_adapter():
    s, t = maps(2, 2, 4, 4), maps(2, 3, 4, 4)
    loss = HintLoss(S_LAYER, T_LAYER)
    loss.setup(*outputs(s, t)[:2])
    adapter = loss.adapter
    loss.setup(*outputs(s, t)[:2])
    assert loss.adapter is adapter


def test_hint_stage_follows_the_epoch():
    loss = HintLoss(S_LAYER, T_LAYER, hint_epochs=2)
    seen = []
    for epoch in range(4):
        loss.set_progress(epoch, epoch * 10)
        seen.append(loss.in_hint_stage)
    assert seen == [True, True, False, False]
    assert not HintLoss(S_LAYER, T_LAYER).in_hint_stage  # default: one stage, as in CRD


# --------------------------------------------------------------------------- AT


@pytest.mark.parametrize("p", [2.0, 3.0])
def test_at_loss_matches_the_formula(p):
    s, t = maps(3, 4, 6, 6, seed=5), maps(3, 7, 6, 6, seed=6)  # channel counts differ
    assert at_loss(s, t, p).item() == pytest.approx(at_ref(s.numpy(), t.numpy(), p), rel=1e-10)


def test_attention_map_is_unit_norm_per_sample():
    a = attention_map(maps(3, 4, 5, 6))
    assert a.shape == (3, 30)
    assert torch.allclose(a.norm(dim=1), torch.ones(3, dtype=torch.float64))


def test_at_loss_pools_the_larger_map():
    s, t = maps(2, 3, 8, 8, seed=7), maps(2, 5, 4, 4, seed=8)
    assert at_loss(s, t).item() == pytest.approx(at_ref(s.numpy(), t.numpy(), 2.0), rel=1e-10)
    assert at_loss(t, s).item() == pytest.approx(at_ref(t.numpy(), s.numpy(), 2.0), rel=1e-10)


def test_at_is_zero_for_equal_features_and_its_gradient_is_right():
    s = maps(2, 3, 4, 4, seed=9)
    assert at_loss(s, s.clone()).item() == pytest.approx(0.0, abs=1e-15)
    t = maps(2, 3, 4, 4, seed=10)
    assert gradcheck(lambda x: at_loss(x, t), (s.clone().requires_grad_(True),))


def test_at_module_is_weight_1000_times_the_function():
    s, t = maps(2, 3, 8, 8, seed=11), maps(2, 6, 4, 4, seed=12)
    loss = ATLoss(S_LAYER, T_LAYER)
    assert loss.weight == 1000.0 and loss.p == 2.0 and loss.nonnegative
    assert loss(*outputs(s, t)).item() == pytest.approx(1000 * at_ref(s.numpy(), t.numpy(), 2.0), rel=1e-10)


# --------------------------------------------------------------------------- NST


def test_nst_loss_matches_the_mmd_formula():
    s, t = maps(2, 3, 4, 4, seed=13, relu=True), maps(2, 5, 4, 4, seed=14, relu=True)
    assert nst_loss(s, t).item() == pytest.approx(nst_ref(s.numpy(), t.numpy()), rel=1e-10)


def test_nst_loss_pools_the_larger_map_and_is_zero_for_equal_features():
    s, t = maps(2, 3, 8, 8, seed=15), maps(2, 4, 4, 4, seed=16)
    assert nst_loss(s, t).item() == pytest.approx(nst_ref(s.numpy(), t.numpy()), rel=1e-10)
    assert nst_loss(t, t.clone()).item() == pytest.approx(0.0, abs=1e-12)
    assert nst_loss(s, t).item() > 0


def test_nst_gradient_is_right():
    s, t = maps(2, 3, 3, 3, seed=17), maps(2, 4, 3, 3, seed=18)
    assert gradcheck(lambda x: nst_loss(x, t), (s.clone().requires_grad_(True),))


def test_nst_module_is_weight_50_times_the_function():
    s, t = maps(2, 3, 4, 4, seed=19), maps(2, 5, 4, 4, seed=20)
    loss = NSTLoss(S_LAYER, T_LAYER)
    assert loss.weight == 50.0 and loss.degree == 2 and loss.c == 0.0 and loss.nonnegative
    assert loss(*outputs(s, t)).item() == pytest.approx(50 * nst_ref(s.numpy(), t.numpy()), rel=1e-10)


# --------------------------------------------------------------------------- VID


def test_vid_loss_matches_the_gaussian_negative_log_likelihood():
    mu, t = maps(2, 3, 4, 4, seed=21), maps(2, 3, 4, 4, seed=22)
    alpha = maps(3, seed=23)
    value = vid_loss(mu, t, vid_variance(alpha, 1e-5))
    assert value.item() == pytest.approx(vid_ref(mu.numpy(), t.numpy(), alpha.numpy(), 1e-5), rel=1e-12)


def test_vid_loss_at_a_perfect_mean_is_the_log_variance_term():
    t = maps(2, 3, 4, 4, seed=24)
    var = torch.tensor([0.5, 1.0, 5.0], dtype=torch.float64)
    assert vid_loss(t, t, var).item() == pytest.approx(0.5 * float(np.log([0.5, 1.0, 5.0]).mean()), rel=1e-12)
    # it is a likelihood, not a divergence: negative where the variance is below 1
    assert vid_loss(t, t, torch.full((3,), 0.5, dtype=torch.float64)).item() < 0


def test_vid_module_starts_at_init_pred_var_and_matches_the_function():
    s, t = maps(2, 3, 8, 8, seed=25), maps(2, 5, 4, 4, seed=26)
    loss = VIDLoss(S_LAYER, T_LAYER)
    assert loss.weight == 1.0 and loss.init_pred_var == 5.0 and loss.eps == 1e-5
    assert VIDLoss.nonnegative is False
    student, teacher, batch = outputs(s, t)
    loss.setup(student, teacher)
    assert torch.allclose(loss.variance(), torch.full((5,), 5.0, dtype=torch.float64), rtol=1e-12)
    convs = [m for m in loss.regressor if isinstance(m, nn.Conv2d)]
    assert [(m.in_channels, m.out_channels) for m in convs] == [(3, 5), (5, 5), (5, 5)]
    assert all(m.kernel_size == (1, 1) and m.bias is None for m in convs)
    value = loss(student, teacher, batch)
    with torch.no_grad():
        mu = loss.regressor(torch.from_numpy(block_mean(s.numpy(), 4, 4)))
    expected = vid_ref(mu.numpy(), t.numpy(), loss.alpha.detach().numpy(), 1e-5)
    assert value.item() == pytest.approx(expected, rel=1e-10)


def test_vid_regressor_and_variance_gradients_are_right():
    s, t = maps(2, 3, 3, 3, seed=27), maps(2, 4, 3, 3, seed=28)
    loss = VIDLoss(S_LAYER, T_LAYER, mid_channels=3)
    student, teacher, _ = outputs(s, t)
    loss.setup(student, teacher)
    check_param_grads(loss, student, teacher, ("regressor.", "alpha"))


# --------------------------------------------------------------------------- FT


@pytest.mark.parametrize("p", [1.0, 2.0])
def test_ft_loss_matches_the_formula(p):
    fs, ft = maps(3, 2, 4, 4, seed=29), maps(3, 2, 4, 4, seed=30)
    assert ft_loss(fs, ft, p).item() == pytest.approx(ft_ref(fs.numpy(), ft.numpy(), p), rel=1e-10)


def test_ft_loss_pools_and_is_zero_for_equal_factors():
    fs, ft = maps(2, 3, 8, 8, seed=31), maps(2, 3, 4, 4, seed=32)
    assert ft_loss(fs, ft).item() == pytest.approx(ft_ref(fs.numpy(), ft.numpy(), 1.0), rel=1e-10)
    assert ft_loss(ft, 3 * ft).item() == pytest.approx(0.0, abs=1e-15)  # scale-free
    with pytest.raises(ValueError, match="same number of channels"):
        ft_loss(maps(2, 2, 4, 4), maps(2, 3, 4, 4))


def test_ft_module_builds_paraphraser_and_translator_and_matches_the_function():
    s, t = maps(2, 3, 4, 4, seed=33), maps(2, 6, 4, 4, seed=34, relu=True)
    loss = FTLoss(S_LAYER, T_LAYER)
    assert loss.weight == 200.0 and loss.rate == 0.5 and loss.p == 1.0 and loss.nonnegative
    student, teacher, batch = outputs(s, t)
    loss.setup(student, teacher)
    assert isinstance(loss.paraphraser, Paraphraser)
    assert loss.paraphraser.encode(t).shape == (2, 3, 4, 4)  # int(6 * 0.5) factor channels
    assert loss.paraphraser(t).shape == t.shape
    value = loss(student, teacher, batch)
    with torch.no_grad():
        factor_s, factor_t = loss.translator(s), loss.paraphraser.encode(t)
    assert factor_s.shape == factor_t.shape == (2, 3, 4, 4)
    assert value.item() == pytest.approx(200 * ft_ref(factor_s.numpy(), factor_t.numpy(), 1.0), rel=1e-10)
    # stage 2: only the translator learns; the paraphraser is frozen
    value.backward()
    assert all(p.grad is None for p in loss.paraphraser.parameters())
    assert all(p.grad is not None for p in loss.translator.parameters())


def test_ft_paraphraser_loss_is_the_reconstruction_error_and_trains_the_paraphraser():
    t = maps(2, 4, 4, 4, seed=35, relu=True)
    loss = FTLoss(S_LAYER, T_LAYER)
    loss.setup(*outputs(maps(2, 3, 4, 4), t)[:2])
    value = loss.paraphraser_loss(t)
    with torch.no_grad():
        rec = loss.paraphraser(t)
    assert value.item() == pytest.approx(hint_ref(rec.numpy(), t.numpy()), rel=1e-12)
    value.backward()
    assert all(p.grad is not None for p in loss.paraphraser.parameters())
    assert all(p.grad is None for p in loss.translator.parameters())


def test_ft_translator_gradients_are_right():
    s, t = maps(2, 2, 3, 3, seed=36), maps(2, 4, 3, 3, seed=37)
    loss = FTLoss(S_LAYER, T_LAYER)
    student, teacher, _ = outputs(s, t)
    loss.setup(student, teacher)
    check_param_grads(loss, student, teacher, ("translator.",))


# --------------------------------------------------------------------------- shared contract


def all_losses():
    return [
        HintLoss(S_LAYER, T_LAYER),
        ATLoss(S_LAYER, T_LAYER),
        NSTLoss(S_LAYER, T_LAYER),
        VIDLoss(S_LAYER, T_LAYER),
        FTLoss(S_LAYER, T_LAYER),
    ]


@pytest.mark.parametrize("loss", all_losses(), ids=lambda l: l.name)
def test_a_missing_tap_is_a_key_error_naming_the_layer(loss):
    s, t = maps(2, 3, 4, 4), maps(2, 4, 4, 4)
    student, teacher, batch = outputs(s, t)
    del teacher.features[T_LAYER]
    with pytest.raises(KeyError, match=T_LAYER):
        loss.setup(student, teacher)
    with pytest.raises(KeyError, match=T_LAYER):
        loss(student, teacher, batch)


@pytest.mark.parametrize("cls", [HintLoss, VIDLoss, FTLoss])
def test_use_before_setup_says_to_call_setup(cls):
    with pytest.raises(RuntimeError, match=r"setup\(student_outputs, teacher_outputs\)"):
        cls(S_LAYER, T_LAYER)(*outputs(maps(2, 3, 4, 4), maps(2, 4, 4, 4)))


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: HintLoss(S_LAYER, T_LAYER, weight=-1), "weight"),
        (lambda: HintLoss(S_LAYER, T_LAYER, hint_epochs=-1), "hint_epochs"),
        (lambda: HintLoss(S_LAYER, T_LAYER, hint_epochs=1.5), "hint_epochs"),
        (lambda: ATLoss(S_LAYER, T_LAYER, p=0), "p must be"),
        (lambda: ATLoss(S_LAYER, T_LAYER, weight=float("nan")), "weight"),
        (lambda: NSTLoss(S_LAYER, T_LAYER, degree=0), "degree"),
        (lambda: NSTLoss(S_LAYER, T_LAYER, c=-1.0), "c must be"),
        (lambda: VIDLoss(S_LAYER, T_LAYER, eps=0), "eps"),
        (lambda: VIDLoss(S_LAYER, T_LAYER, init_pred_var=0.0), "init_pred_var"),
        (lambda: VIDLoss(S_LAYER, T_LAYER, mid_channels=0), "mid_channels"),
        (lambda: FTLoss(S_LAYER, T_LAYER, rate=0), "rate"),
        (lambda: FTLoss(S_LAYER, T_LAYER, p=-1), "p must be"),
        (lambda: at_loss(maps(2, 3, 4, 4), maps(2, 3, 4, 4), p=-2), "p must be"),
        (lambda: nst_loss(maps(2, 3, 4, 4), maps(2, 3, 4, 4), degree=2.5), "degree"),
        (lambda: ft_loss(maps(2, 3, 4, 4), maps(2, 3, 4, 4), p=0), "p must be"),
        (lambda: vid_loss(maps(2, 3, 4, 4), maps(2, 3, 4, 4), torch.zeros(3)), "positive"),
        (lambda: vid_loss(maps(2, 3, 4, 4), maps(2, 3, 4, 4), torch.ones(4)), "one value per channel"),
    ],
)
def test_bad_hyper_parameters_are_rejected_by_name(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_a_rate_that_leaves_no_factor_channel_is_rejected_at_setup():
    loss = FTLoss(S_LAYER, T_LAYER, rate=0.1)
    with pytest.raises(ValueError, match="factor channels"):
        loss.setup(*outputs(maps(2, 3, 4, 4), maps(2, 4, 4, 4))[:2])


@pytest.mark.parametrize("fn", [at_loss, nst_loss])
def test_maps_of_the_wrong_rank_or_batch_are_rejected(fn):
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        fn(maps(2, 12), maps(2, 3, 2, 2))
    with pytest.raises(ValueError, match="same batch"):
        fn(maps(2, 3, 4, 4), maps(3, 3, 4, 4))


def test_match_spatial_pools_each_side_to_the_smaller_size():
    s, t = match_spatial(maps(1, 2, 8, 4), maps(1, 3, 4, 8))
    assert s.shape == (1, 2, 4, 4) and t.shape == (1, 3, 4, 4)


def test_float32_features_give_float32_parts_and_a_scalar():
    s, t = maps(2, 3, 4, 4).float(), maps(2, 5, 4, 4).float()
    for loss in all_losses():
        student, teacher, batch = outputs(s, t)
        loss.setup(student, teacher)
        value = loss(student, teacher, batch)
        assert value.dim() == 0 and value.dtype == torch.float32 and torch.isfinite(value)
        assert all(p.dtype == torch.float32 for p in loss.parameters())


# --------------------------------------------------------------------------- inside the Distiller


def tiny_cnn(width: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1), nn.ReLU(),                      # 0, 1: (B, w, 8, 8)
        nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.ReLU(),    # 2, 3: (B, 2w, 4, 4)
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, 3),     # 4, 5, 6
    )


def tiny_data(n=48):
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 3, (n,), generator=g)
    x = 0.3 * torch.randn(n, 1, 8, 8, generator=g)
    x[torch.arange(n), 0, 2 * y, :] += 1.0
    return x, y


def distiller(loss):
    from kdistill import Distiller

    student, teacher = tiny_cnn(2, 1), tiny_cnn(4, 2)
    d = Distiller(student=student, teacher=teacher, device="cpu")
    d.compile(torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9), distillation_loss_fn=loss, alpha=0.5)
    return d


def test_fitnets_end_to_end_in_the_distiller():
    loss = HintLoss("2", "3")  # student (B, 4, 4, 4) -> teacher (B, 8, 4, 4)
    d = distiller(loss)
    teacher_before = {k: v.clone() for k, v in d.teacher.module.state_dict().items()}
    x, y = tiny_data()
    hist = d.fit(x, y, epochs=3, batch_size=16, verbose=0, seed=0)
    assert isinstance(loss.adapter, MapAdapter) and loss.adapter.conv.weight.shape == (8, 4, 1, 1)
    in_optimizer = {id(p) for g in d.optimizer.param_groups for p in g["params"]}
    assert all(id(p) in in_optimizer for p in loss.adapter.parameters())
    assert loss.epoch == 2 and not loss.in_hint_stage  # set_progress reached the loss
    losses = hist.history["distillation_loss"]
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
    assert all(torch.equal(v, teacher_before[k]) for k, v in d.teacher.module.state_dict().items())


def test_all_five_train_together_in_a_weighted_sum():
    from kdistill.losses import WeightedSum

    parts = {"hint": HintLoss("2", "2"), "at": ATLoss("0", "2"), "nst": NSTLoss("2", "2"),
             "vid": VIDLoss("0", "2"), "ft": FTLoss("2", "2")}
    loss = WeightedSum({k: (v, 1.0) for k, v in parts.items()})
    d = distiller(loss)
    x, y = tiny_data()
    hist = d.fit(x, y, epochs=1, batch_size=16, verbose=0, seed=0)
    for name in parts:
        assert math.isfinite(hist.history[f"distillation/{name}"][-1])
    assert parts["vid"].regressor is not None and parts["ft"].translator is not None


def test_ft_two_stages_as_documented_paraphraser_first_then_frozen():
    from kdistill.taps import FeatureTaps

    ft = FTLoss("2", "2")
    d = distiller(ft)
    x, y = tiny_data()
    d.setup(x[:16])  # builds the paraphraser and the translator
    teacher = d.teacher.module
    # stage 1: the paraphraser alone learns to reconstruct the teacher's feature
    opt = torch.optim.Adam(ft.paraphraser.parameters(), lr=0.01)
    with FeatureTaps(teacher, ["2"]) as taps:
        recon = []
        for _ in range(15):
            with torch.no_grad():
                teacher(x)
            loss = ft.paraphraser_loss(taps.pop()["2"])
            opt.zero_grad()
            loss.backward()
            opt.step()
            recon.append(loss.item())
    assert recon[-1] < recon[0]
    # stage 2: fit trains the translator with the student; the paraphraser stays as trained
    paraphraser = {k: v.clone() for k, v in ft.paraphraser.state_dict().items()}
    translator = {k: v.clone() for k, v in ft.translator.state_dict().items()}
    d.fit(x, y, epochs=1, batch_size=16, verbose=0, seed=0)
    assert all(torch.equal(v, paraphraser[k]) for k, v in ft.paraphraser.state_dict().items())
    assert not all(torch.equal(v, translator[k]) for k, v in ft.translator.state_dict().items())
