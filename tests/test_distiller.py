"""The Distiller: a frozen teacher, the combined loss, and the Keras-style loop."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from kdistill import (
    Callback,
    DistillationLoss,
    Distiller,
    InvalidDivergenceError,
    KDLoss,
    NonFiniteLossError,
    Trainer,
    build_model,
    kd_loss,
)
from kdistill.outputs import UNLABELLED, Batch, Outputs

D, C = 8, 4  # input features, classes


# --------------------------------------------------------------------------- helpers


def make_data(n=64, *, seed=0, classes=C):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D, generator=g)
    w = torch.randn(D, classes, generator=g)
    y = (x @ w).argmax(1)
    return x, y


def make_teacher(*, seed=1, classes=C) -> nn.Module:
    """A teacher with BatchNorm and Dropout, whose running stats are not the defaults."""
    torch.manual_seed(seed)
    t = nn.Sequential(
        nn.Linear(D, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, classes)
    )
    t.train()
    with torch.no_grad():
        for _ in range(3):
            t(torch.randn(32, D) * 2 + 1)
    return t


def make_student(*, seed=2, classes=C, dropout=False) -> nn.Module:
    torch.manual_seed(seed)
    layers = [nn.Linear(D, 12), nn.ReLU()]
    if dropout:
        layers.append(nn.Dropout(0.2))
    layers.append(nn.Linear(12, classes))
    return nn.Sequential(*layers)


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} changed"


def distiller(student=None, teacher=None, **compile_kw) -> Distiller:
    d = Distiller(student or make_student(), teacher or make_teacher(), device="cpu")
    compile_kw.setdefault("optimizer", "adam")
    compile_kw.setdefault("metrics", ["accuracy"])
    return d.compile(**compile_kw)


def teacher_logits(teacher: nn.Module, x: torch.Tensor) -> torch.Tensor:
    was = teacher.training
    teacher.eval()
    with torch.no_grad():
        out = teacher(x)
    teacher.train(was)
    return out


# --------------------------------------------------------------------------- the frozen teacher


def test_teacher_is_frozen_and_stays_in_eval_mode():
    teacher, student = make_teacher(), make_student()
    d = distiller(student, teacher)
    assert all(not p.requires_grad for p in teacher.parameters())
    assert not teacher.training
    student.train()
    assert not teacher.training
    assert student.training
    # even a teacher flipped to train mode by the caller runs in eval mode
    teacher.train()
    x, y = make_data(32)
    d.fit(x, y, epochs=1, batch_size=16, verbose=0, seed=0)
    assert not teacher.training


def test_teacher_weights_and_batchnorm_stats_are_bit_identical_after_fit():
    teacher = make_teacher()
    before = snapshot(teacher)
    assert any("running_mean" in k for k in before) and any("num_batches_tracked" in k for k in before)
    d = distiller(make_student(), teacher, optimizer="sgd", learning_rate=0.5, alpha=0.0)
    teacher.train()  # flipped back by the caller: BatchNorm must still not update its statistics
    x, y = make_data(64)
    d.fit(x * 3 + 2, y, epochs=3, batch_size=16, verbose=0, seed=0)
    assert_same_state(before, snapshot(teacher))


def test_teacher_parameters_are_not_in_the_optimizer():
    teacher, student = make_teacher(), make_student()
    d = distiller(student, teacher)
    in_opt = {id(p) for g in d.optimizer.param_groups for p in g["params"]}
    assert in_opt == {id(p) for p in student.parameters()}
    assert not in_opt & {id(p) for p in teacher.parameters()}


def test_optimizer_holding_teacher_parameters_is_refused():
    teacher, student = make_teacher(), make_student()
    d = Distiller(student, teacher, device="cpu")
    opt = torch.optim.Adam(list(student.parameters()) + list(teacher.parameters()))
    with pytest.raises(ValueError, match="teacher"):
        d.compile(optimizer=opt)
    # the failed compile left nothing half-configured behind
    x, y = make_data(16)
    with pytest.raises(RuntimeError, match="compile"):
        d.fit(x, y, verbose=0)


def test_teacher_and_student_must_be_different_modules():
    m = make_student()
    with pytest.raises(ValueError, match="same module"):
        Distiller(m, m, device="cpu")


def test_train_step_before_compile_raises():
    d = Distiller(make_student(), make_teacher(), device="cpu")
    x, y = make_data(8)
    with pytest.raises(RuntimeError, match="compile"):
        d.train_step(Batch(x, y))


# --------------------------------------------------------------------------- the combined loss


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_train_step_logs_and_combines_the_terms(alpha):
    d = distiller(alpha=alpha, temperature=2.0)
    x, y = make_data(16)
    logs = d.train_step(Batch(x, y, torch.arange(16)))
    assert set(logs) == {"loss", "student_loss", "distillation_loss", "accuracy"}
    assert all(v.dim() == 0 and not v.requires_grad for v in logs.values())
    assert float(logs["distillation_loss"]) > 0 and float(logs["student_loss"]) > 0
    want = alpha * float(logs["student_loss"]) + (1 - alpha) * float(logs["distillation_loss"])
    assert float(logs["loss"]) == pytest.approx(want, rel=1e-6)


def test_train_step_terms_are_computed_on_the_batch_before_the_update():
    teacher, student = make_teacher(), make_student()
    d = distiller(student, teacher, alpha=0.25, temperature=3.0)
    x, y = make_data(16)
    with torch.no_grad():
        s_logits = student(x)
    want_ce = F.cross_entropy(s_logits, y)
    want_kd = kd_loss(s_logits, teacher_logits(teacher, x), 3.0)
    logs = d.train_step(Batch(x, y))
    assert float(logs["student_loss"]) == pytest.approx(float(want_ce), rel=1e-6)
    assert float(logs["distillation_loss"]) == pytest.approx(float(want_kd), rel=1e-6)
    assert float(logs["accuracy"]) == pytest.approx(float((s_logits.argmax(1) == y).float().mean()))


def test_alpha_one_trains_exactly_like_the_plain_trainer():
    init = make_student(dropout=True)  # dropout: the random streams must line up too
    s_plain, s_dist = copy.deepcopy(init), copy.deepcopy(init)
    x, y = make_data(80)
    x_val, y_val = make_data(32, seed=5)

    plain = Trainer(s_plain, device="cpu").compile(
        optimizer=torch.optim.SGD(s_plain.parameters(), lr=0.1, momentum=0.9), metrics=["accuracy"]
    )
    h_plain = plain.fit(x, y, epochs=2, batch_size=16, validation_data=(x_val, y_val), verbose=0, seed=3)

    dist = Distiller(s_dist, make_teacher(), device="cpu").compile(
        optimizer=torch.optim.SGD(s_dist.parameters(), lr=0.1, momentum=0.9),
        metrics=["accuracy"], alpha=1.0, temperature=4.0,
    )
    h_dist = dist.fit(x, y, epochs=2, batch_size=16, validation_data=(x_val, y_val), verbose=0, seed=3)

    assert_same_state(snapshot(s_plain), snapshot(s_dist))
    assert not torch.equal(init[0].weight, s_dist[0].weight)  # it did train
    assert h_dist.history["student_loss"] == h_plain.history["loss"]
    assert h_dist.history["accuracy"] == h_plain.history["accuracy"]
    assert h_dist.history["val_loss"] == h_plain.history["val_loss"]


@pytest.mark.parametrize("alpha", [-0.1, 1.5, float("nan")])
def test_alpha_outside_unit_interval_raises(alpha):
    d = Distiller(make_student(), make_teacher(), device="cpu")
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\]"):
        d.compile(alpha=alpha)


@pytest.mark.parametrize("temperature", [0, -2.0, float("inf"), float("nan")])
def test_bad_temperature_raises(temperature):
    d = Distiller(make_student(), make_teacher(), device="cpu")
    with pytest.raises(ValueError, match="temperature"):
        d.compile(temperature=temperature)


@pytest.mark.parametrize("squared", [True, False])
def test_temperature_squared_scales_the_distillation_term(squared):
    t = 4.0
    teacher, student = make_teacher(), make_student()
    d = distiller(student, teacher, temperature=t, temperature_squared=squared, alpha=0.5)
    x, y = make_data(16)
    with torch.no_grad():
        s_logits = student(x)
    t_logits = teacher_logits(teacher, x)
    unscaled = float(kd_loss(s_logits, t_logits, t, temperature_squared=False))
    logged = float(d.train_step(Batch(x, y))["distillation_loss"])
    assert logged == pytest.approx(unscaled * (t * t if squared else 1.0), rel=1e-5)


def test_class_count_mismatch_names_both_counts():
    teacher, student = make_teacher(classes=10), make_student(classes=5)
    d = distiller(student, teacher)
    x, y = make_data(16, classes=5)
    with pytest.raises(ValueError) as e:
        d.fit(x, y, verbose=0)
    msg = str(e.value)
    assert "10 classes" in msg and " 5" in msg and "num_classes=10" in msg


def test_class_count_mismatch_with_built_models():
    d = Distiller(
        build_model("mlp", num_classes=5, in_features=D, hidden=(8,)),
        build_model("mlp", num_classes=10, in_features=D, hidden=(8,)),
        device="cpu",
    ).compile()
    x, _ = make_data(8)
    with pytest.raises(ValueError, match=r"10 classes.*5"):
        d.train_step(Batch(x, torch.zeros(8, dtype=torch.long)))


# --------------------------------------------------------------------------- wrong losses stop training


def wrong_kl(s, t):
    """KL with the log on the student forgotten: comes out negative."""
    return (t * (t.log() - s)).sum(-1).mean()


@pytest.mark.parametrize("fn, name", [(wrong_kl, "wrong_kl"), (lambda s, t: (t * (t.log() - s)).sum(-1).mean(), "<lambda>")])
def test_negative_divergence_raises_naming_the_loss(fn, name):
    student = make_student()
    d = distiller(student, distillation_loss_fn=fn, temperature=2.0)
    before = snapshot(student)
    x, y = make_data(32)
    with pytest.raises(InvalidDivergenceError) as e:
        d.fit(x, y, epochs=1, batch_size=16, verbose=0, seed=0)
    assert name in str(e.value)
    assert_same_state(before, snapshot(student))  # stopped before the first update


class _Snapshots(Callback):
    def __init__(self, module):
        self.module, self.states = module, []

    def on_train_batch_end(self, step, logs=None):
        self.states.append(snapshot(self.module))


def test_nan_distillation_loss_raises_naming_step_and_term_and_keeps_weights():
    calls = {"n": 0}

    def flaky(s, t):
        calls["n"] += 1
        value = (t * (t.log() - s.log())).sum(-1).mean()
        return value * float("nan") if calls["n"] == 3 else value

    student = make_student()
    d = distiller(student, distillation_loss_fn=flaky, optimizer="sgd", learning_rate=0.5)
    snaps = _Snapshots(student)
    x, y = make_data(64)
    with pytest.raises(NonFiniteLossError) as e:
        d.fit(x, y, epochs=1, batch_size=16, verbose=0, seed=0, callbacks=[snaps])
    msg = str(e.value)
    assert "distillation_loss" in msg and "step 3" in msg and "epoch 1" in msg
    assert len(snaps.states) == 2
    assert not torch.equal(snaps.states[0]["0.weight"], snaps.states[1]["0.weight"])  # steps 1-2 trained
    assert_same_state(snaps.states[-1], snapshot(student))  # step 3 did not


def test_nan_student_loss_is_named():
    student = make_student()
    d = distiller(student, student_loss_fn=lambda logits, y: F.cross_entropy(logits, y) * float("nan"))
    before = snapshot(student)
    x, y = make_data(16)
    with pytest.raises(NonFiniteLossError, match="'student_loss'"):
        d.fit(x, y, verbose=0)
    assert_same_state(before, snapshot(student))


# --------------------------------------------------------------------------- unlabelled samples


def test_all_unlabelled_with_alpha_one_leaves_the_student_unchanged():
    student = make_student()
    before = snapshot(student)
    d = distiller(student, alpha=1.0)
    x, _ = make_data(48)
    y = torch.full((48,), UNLABELLED)
    d.fit(x, y, epochs=2, batch_size=16, verbose=0, seed=0)
    assert_same_state(before, snapshot(student))


def test_unlabelled_with_alpha_zero_still_trains_the_student():
    student = make_student()
    before = snapshot(student)
    d = distiller(student, alpha=0.0)
    x, _ = make_data(48)
    d.fit(x, torch.full((48,), UNLABELLED), epochs=1, batch_size=16, verbose=0, seed=0)
    assert not torch.equal(before["0.weight"], student[0].weight)


def test_student_loss_on_a_mixed_batch_is_ce_over_labelled_rows_only():
    student = make_student()
    d = distiller(student, alpha=0.5)
    x, y = make_data(12)
    y_mixed = y.clone()
    y_mixed[[1, 4, 5, 9]] = UNLABELLED
    keep = y_mixed != UNLABELLED
    with torch.no_grad():
        s_logits = student(x)
    logs = d.train_step(Batch(x, y_mixed))
    assert float(logs["student_loss"]) == pytest.approx(float(F.cross_entropy(s_logits[keep], y[keep])), rel=1e-6)
    # accuracy, too, counts the labelled rows only
    assert float(logs["accuracy"]) == pytest.approx(float((s_logits[keep].argmax(1) == y[keep]).float().mean()))


def test_fit_unlabelled_contributes_only_the_distillation_loss():
    """One full batch, SGD: the update is -lr * grad of
    alpha * CE(labelled) + (1 - alpha) * KD(labelled + unlabelled)."""
    alpha, t, lr = 0.4, 2.0, 0.3
    teacher, student = make_teacher(), make_student()
    reference = copy.deepcopy(student)
    x_all, y_all = make_data(40)
    x_l, y_l, x_u = x_all[:10], y_all[:10], x_all[10:]

    d = distiller(student, teacher, optimizer=torch.optim.SGD(student.parameters(), lr=lr),
                  alpha=alpha, temperature=t)
    hist = d.fit(x_l, y_l, unlabelled=x_u, epochs=1, batch_size=40, shuffle=False, verbose=0, seed=0)

    # by hand, on the reference copy
    t_logits = teacher_logits(teacher, x_all)
    logits = reference(x_all)
    ce = F.cross_entropy(logits[:10], y_l)
    kd = kd_loss(logits, t_logits, t)
    opt = torch.optim.SGD(reference.parameters(), lr=lr)
    (alpha * ce + (1 - alpha) * kd).backward()
    opt.step()

    assert hist.history["student_loss"][0] == pytest.approx(float(ce.detach()), rel=1e-6)
    assert hist.history["distillation_loss"][0] == pytest.approx(float(kd.detach()), rel=1e-6)
    for (k, a), b in zip(student.state_dict().items(), reference.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=k)


# --------------------------------------------------------------------------- evaluation


class _CountCalls:
    def __init__(self, module):
        self.n = 0
        module.register_forward_hook(self)

    def __call__(self, *args):
        self.n += 1


def test_evaluate_measures_the_student_alone():
    teacher, student = make_teacher(), make_student(dropout=True)
    d = distiller(student, teacher, alpha=0.2)
    x, y = make_data(64)
    x_val, y_val = make_data(40, seed=7)
    d.fit(x, y, epochs=2, batch_size=16, verbose=0, seed=0)

    calls = _CountCalls(teacher)
    result = d.evaluate(x_val, y_val, batch_size=16)
    assert calls.n == 0  # the teacher is not consulted
    assert student.training  # evaluate puts the student back in the mode it found it in

    alone = Trainer(student, device="cpu").compile(metrics=["accuracy"]).evaluate(x_val, y_val, batch_size=16)
    assert result["loss"] == pytest.approx(alone["loss"], rel=1e-6)
    assert result["accuracy"] == pytest.approx(alone["accuracy"])
    assert result["student_loss"] == result["loss"]
    with torch.no_grad():
        student.eval()
        want = F.cross_entropy(student(x_val), y_val)
    assert result["loss"] == pytest.approx(float(want), rel=1e-5)


def test_test_step_returns_student_metrics_only():
    d = distiller()
    x, y = make_data(16)
    logs = d.test_step(Batch(x, y))
    assert set(logs) == {"loss", "student_loss", "accuracy"}


# --------------------------------------------------------------------------- input kinds


class PairDataset(Dataset):
    """A generic map-style dataset returning (x, y) with a Python int label."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i])


def _inputs(kind, x, y):
    if kind == "numpy":
        return (x.double().numpy(), y.numpy()), {}
    if kind == "tensor":
        return (x, y), {}
    if kind == "tensordataset":
        return (TensorDataset(x, y),), {}
    if kind == "dataset":
        return (PairDataset(x, y),), {}
    if kind == "dataloader":
        return (DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True,
                           generator=torch.Generator().manual_seed(0)),), {}
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["numpy", "tensor", "tensordataset", "dataset", "dataloader"])
def test_fit_accepts_every_input_kind(kind):
    x, y = make_data(48)
    x_val, y_val = make_data(24, seed=9)
    student = make_student()
    before = snapshot(student)
    d = distiller(student, alpha=0.3)
    args, kw = _inputs(kind, x, y)
    hist = d.fit(*args, epochs=2, batch_size=16, validation_data=(x_val.numpy(), y_val.numpy()),
                 verbose=0, seed=0, **kw)
    expected = {"loss", "student_loss", "distillation_loss", "accuracy",
                "val_loss", "val_student_loss", "val_accuracy"}
    assert set(hist.history) == expected
    for k in expected:
        assert len(hist.history[k]) == 2 and all(math.isfinite(v) for v in hist.history[k]), k
    assert 0.0 <= hist.history["val_accuracy"][-1] <= 1.0
    assert not torch.equal(before["0.weight"], student[0].weight)


def test_fit_on_equal_data_of_different_kinds_gives_equal_epoch_logs():
    """Arrays and a TensorDataset go through the same fast path: same seed, same result."""
    x, y = make_data(48)
    init, teacher = make_student(), make_teacher()
    runs = []
    for args in [(x, y), (x.numpy(), y.numpy()), (TensorDataset(x, y),)]:
        d = distiller(copy.deepcopy(init), teacher)
        runs.append(d.fit(*args, epochs=1, batch_size=16, verbose=0, seed=4).history)
    assert runs[0] == runs[1] == runs[2]


# --------------------------------------------------------------------------- user losses


class LogitMSE(DistillationLoss):
    """Mean squared error between raw logits (Ba & Caruana, 2014)."""

    nonnegative = True

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, student: Outputs, teacher: Outputs, batch: Batch) -> torch.Tensor:
        self.calls.append((student, teacher, batch))
        return F.mse_loss(student.logits, teacher.logits)


def test_user_distillation_loss_module_gets_outputs_and_batch():
    teacher, student = make_teacher(), make_student()
    loss = LogitMSE()
    d = distiller(student, teacher, distillation_loss_fn=loss, alpha=0.0, optimizer="adam", learning_rate=1e-2)
    x, y = make_data(64)
    t_logits = teacher_logits(teacher, x)
    with torch.no_grad():
        mse_before = float(F.mse_loss(student(x), t_logits))

    hist = d.fit(x, y, epochs=5, batch_size=16, verbose=0, seed=0)

    assert len(loss.calls) == 5 * 4
    s, t, b = loss.calls[0]
    assert isinstance(s, Outputs) and isinstance(t, Outputs) and isinstance(b, Batch)
    assert s.logits.shape == t.logits.shape == (16, C)
    assert s.logits.requires_grad and not t.logits.requires_grad
    assert b.inputs.shape == (16, D) and b.targets.shape == (16,) and b.index.shape == (16,)
    torch.testing.assert_close(t.logits, t_logits[b.index])  # the teacher's eval-mode logits
    assert set(hist.history) >= {"loss", "student_loss", "distillation_loss"}
    with torch.no_grad():
        mse_after = float(F.mse_loss(student(x), t_logits))
    assert mse_after < 0.5 * mse_before  # the student moved towards the teacher


def test_user_loss_that_may_be_negative_is_not_checked():
    class NegCosine(DistillationLoss):
        nonnegative = False

        def forward(self, student, teacher, batch):
            return -F.cosine_similarity(student.logits, teacher.logits, dim=-1).mean()

    d = distiller(distillation_loss_fn=NegCosine(), alpha=0.0, learning_rate=0.05)
    x, y = make_data(32)
    hist = d.fit(x, y, epochs=10, batch_size=16, verbose=0, seed=0)
    values = hist.history["distillation_loss"]
    assert values[-1] < 0  # negative, allowed, and training went on
    assert values[-1] < values[0]


def test_kdloss_module_as_distillation_loss_uses_its_own_temperature():
    teacher, student = make_teacher(), make_student()
    with pytest.raises(ValueError, match="conflicts with"):  # a different value is refused, not ignored
        distiller(student, teacher, distillation_loss_fn=KDLoss(2.0), temperature=9.0)
    d = distiller(student, teacher, distillation_loss_fn=KDLoss(2.0))
    assert d.temperature == 2.0
    x, y = make_data(16)
    with torch.no_grad():
        s_logits = student(x)
    logged = float(d.train_step(Batch(x, y))["distillation_loss"])
    assert logged == pytest.approx(float(kd_loss(s_logits, teacher_logits(teacher, x), 2.0)), rel=1e-6)


def test_string_and_module_distillation_losses_agree():
    x, y = make_data(16)
    init, teacher = make_student(), make_teacher()
    values = []
    for fn in [None, "kl", KDLoss(3.0), nn.KLDivLoss(reduction="batchmean")]:
        d = distiller(copy.deepcopy(init), teacher, distillation_loss_fn=fn, temperature=3.0)
        values.append(float(d.train_step(Batch(x, y))["distillation_loss"]))
    assert values == pytest.approx([values[0]] * 4, rel=1e-5)


def test_unknown_distillation_loss_name_is_refused_at_compile():
    d = Distiller(make_student(), make_teacher(), device="cpu")
    with pytest.raises(ValueError, match=r"unknown distillation loss 'kll'.*'kl'"):
        d.compile(distillation_loss_fn="kll")


def test_fit_without_labels_distils_from_the_teacher_alone():
    """Data with no labels at all (y=None) trains on the distillation term only."""
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 4))
    student = nn.Sequential(nn.Linear(6, 4))
    x = torch.randn(256, 6)
    distiller = Distiller(student, teacher, device="cpu")
    distiller.compile("adam", alpha=0.5, temperature=2.0, learning_rate=1e-2)
    with torch.no_grad():
        before = kd_loss(student(x), teacher(x), 2.0)
    history = distiller.fit(x, epochs=5, batch_size=64, verbose=0, seed=0)
    with torch.no_grad():
        after = kd_loss(student(x), teacher(x), 2.0)
    assert "student_loss" not in history.history  # no labelled sample, nothing to average
    assert history.history["loss"][0] == pytest.approx(0.5 * history.history["distillation_loss"][0])
    assert after < 0.5 * before


def test_a_teacher_that_rejects_the_inputs_is_named():
    from kdistill.errors import ModelInputError

    teacher = kdistill_build("classic_teacher", in_channels=3)
    student = kdistill_build("classic_student", in_channels=1)
    distiller = Distiller(student, teacher, device="cpu")
    distiller.compile("adam")
    x, y = torch.rand(8, 1, 28, 28), torch.randint(0, 10, (8,))
    with pytest.raises(ModelInputError, match=r"the teacher \(Sequential\) rejected inputs of shape \(8, 1, 28, 28\).*expects \(batch, 3, 28, 28\)"):
        distiller.fit(x, y, epochs=1, verbose=0)


def kdistill_build(name, **kwargs):
    from kdistill import build_model

    return build_model(name, **kwargs)


def test_label_loss_weight_weighs_the_terms_independently():
    import torch.nn.functional as F

    from kdistill import Distiller, KDLoss, kd_loss
    from kdistill.outputs import Batch

    torch.manual_seed(0)
    student, teacher = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    d = Distiller(student=student, teacher=teacher, device="cpu")
    d.compile(torch.optim.SGD(student.parameters(), lr=0.0), distillation_loss_fn=KDLoss(temperature=2.0),
              alpha=0.9, label_loss_weight=0.25)
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    logs = d.train_step(Batch(x, y))
    with torch.no_grad():
        s, t = student(x), teacher(x)
    expected = 0.25 * F.cross_entropy(s, y) + kd_loss(s, t, temperature=2.0)
    assert logs["loss"] == pytest.approx(float(expected), rel=1e-5)
    with pytest.raises(ValueError, match="label_loss_weight must be >= 0"):
        d.compile("adam", label_loss_weight=-1)
    # Keras 3's student_loss_weight (in [0, 1]) is alpha here: the name has no second meaning
    import inspect

    assert "student_loss_weight" not in inspect.signature(Distiller.compile).parameters
    with pytest.raises(TypeError, match="student_loss_weight"):
        d.compile("adam", student_loss_weight=0.5)


def test_alpha_zero_logs_the_label_loss_without_training_on_it():
    torch.manual_seed(0)
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    teacher = nn.Linear(6, 3)
    grads = {}
    for alpha in (0.0, None):
        student = nn.Linear(6, 3)
        torch.nn.init.constant_(student.weight, 0.1)
        torch.nn.init.zeros_(student.bias)
        d = Distiller(student, teacher, device="cpu")
        if alpha is None:  # the reference: the distillation loss alone, by hand
            loss = kd_loss(student(x), teacher(x).detach(), 2.0)
            loss.backward()
            grads[alpha] = student.weight.grad.clone()
            continue
        d.compile(torch.optim.SGD(student.parameters(), lr=0.0), alpha=alpha,
                  distillation_loss_fn=KDLoss(2.0))
        logs = d.train_step(Batch(x, y))
        assert float(logs["student_loss"]) > 0  # logged
        grads[alpha] = student.weight.grad.clone()
    assert torch.allclose(grads[0.0], grads[None], atol=1e-7)
