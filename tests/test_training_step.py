"""The training step: mixed precision, gradient accumulation and gradient clipping, in
the Trainer and the Distiller alike, resumable mid-epoch."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from kdistill import Distiller, Trainer
from kdistill.callbacks import Callback, TrainingCheckpoint
from kdistill.checkpoint import read_training_state
from kdistill.distiller import check_precision
from kdistill.losses import KDLoss
from kdistill.outputs import Batch


def _data(n=224, d=10, c=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    y = (x[:, :c] + 0.3 * torch.randn(n, c, generator=g)).argmax(1)
    return x, y


def _mlp(seed=1, d=10, c=4, hidden=32):  # no batch statistics, no dropout
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, hidden), nn.Tanh(), nn.Linear(hidden, c))


def _optimizer(name):
    return {"sgd": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
            "adam": lambda p: torch.optim.Adam(p, lr=1e-2)}[name]


def _trainer(kind, optimizer="adam", **compile_kw):
    if kind == "trainer":
        t = Trainer(_mlp(), device="cpu")
        return t.compile(_optimizer(optimizer), metrics=["accuracy"], **compile_kw)
    t = Distiller(_mlp(), _mlp(seed=7, hidden=64), device="cpu")
    return t.compile(_optimizer(optimizer), metrics=["accuracy"], distillation_loss_fn=KDLoss(temperature=4),
                     alpha=0.3, **compile_kw)


def _weights(t):
    return {k: v.detach().clone() for k, v in t.model.state_dict().items()}


def _assert_close_weights(a, b, atol=1e-6):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=atol, rtol=0), (k, (a[k] - b[k]).abs().max())


# ------------------------------------------------------------------ accumulation
@pytest.mark.parametrize("kind", ["trainer", "distiller"])
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_four_micro_batches_of_16_train_as_one_batch_of_64(kind, optimizer):
    # 224 samples: three optimizer steps of 64 and a last one of 32 (two micro-batches)
    x, y = _data()
    kw = dict(epochs=2, verbose=0, seed=0, validation_data=_data(40, seed=3))
    whole = _trainer(kind, optimizer)
    h_whole = whole.fit(x, y, batch_size=64, **kw)
    acc = _trainer(kind, optimizer, accumulate_steps=4)
    h_acc = acc.fit(x, y, batch_size=16, **kw)

    assert acc.global_step == whole.global_step == 8  # optimizer steps: 4 per epoch
    _assert_close_weights(_weights(acc), _weights(whole))
    assert h_acc.history.keys() == h_whole.history.keys()
    for key, values in h_whole.history.items():  # the logged loss (and its terms) included
        assert h_acc.history[key] == pytest.approx(values, rel=1e-6, abs=1e-6), key


def test_accumulation_weighs_the_hard_label_term_by_labelled_samples():
    # unlabelled samples shuffled in: micro-batches hold different numbers of labelled ones
    x, y = _data()
    x_unl = _data(96, seed=5)[0]
    kw = dict(epochs=1, verbose=0, seed=0, unlabelled=x_unl)
    whole = _trainer("distiller", "sgd")
    h_whole = whole.fit(x, y, batch_size=64, **kw)
    acc = _trainer("distiller", "sgd", accumulate_steps=4)
    h_acc = acc.fit(x, y, batch_size=16, **kw)
    _assert_close_weights(_weights(acc), _weights(whole))
    for key in ("student_loss", "distillation_loss", "accuracy"):
        assert h_acc.history[key] == pytest.approx(h_whole.history[key], rel=1e-6), key


def test_steps_schedules_and_callbacks_count_optimizer_steps():
    x, y = _data(n=160)  # 10 batches of 16: optimizer steps of 4, 4 and 2 batches

    class Seen(Callback):
        def __init__(self):
            self.steps, self.global_steps, self.samples = [], [], []

        def on_train_batch_end(self, step, logs=None):
            self.steps.append(step)
            self.global_steps.append(self.trainer.global_step)
            self.samples.append(self.trainer._last_batch_size)

    class Counting(Trainer):
        calls = 0

        def train_step(self, batch):
            Counting.calls += 1
            return super().train_step(batch)

    t = Counting(_mlp(), device="cpu")
    t.compile("sgd", learning_rate=0.1, accumulate_steps=4, scheduler_interval="step",
              scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5))
    seen = Seen()
    t.fit(x, y, epochs=2, batch_size=16, verbose=0, seed=0, callbacks=[seen])
    assert t._steps_per_epoch == 3 and Counting.calls == 20
    assert seen.steps == [0, 1, 2, 0, 1, 2] and seen.global_steps == [1, 2, 3, 4, 5, 6]
    assert seen.samples == [64, 64, 32] * 2
    assert t.optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5 ** 6)  # one scheduler step per optimizer step

    # steps_per_epoch: optimizer steps, each of accumulate_steps batches (the data cycles)
    Counting.calls = 0
    t.fit(x, y, epochs=1, batch_size=16, verbose=0, seed=0, steps_per_epoch=5)
    assert Counting.calls == 20 and t.global_step == 6 + 5


def test_train_step_outside_fit_steps_every_accumulate_steps_calls():
    x, y = _data(n=64)
    batches = [Batch(x[i:i + 16], y[i:i + 16]) for i in range(0, 64, 16)]
    acc = _trainer("trainer", "sgd", accumulate_steps=4)
    before = _weights(acc)
    for b in batches[:3]:
        acc.train_step(b)
    assert all(torch.equal(before[k], v) for k, v in _weights(acc).items())  # no step yet
    acc.train_step(batches[3])
    whole = _trainer("trainer", "sgd")
    whole.train_step(Batch(x, y))
    _assert_close_weights(_weights(acc), _weights(whole))


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_accumulate_steps_must_be_a_positive_integer(bad):
    with pytest.raises(ValueError, match="accumulate_steps must be an integer >= 1"):
        Trainer(_mlp(), device="cpu").compile("sgd", accumulate_steps=bad)


# ------------------------------------------------------------------ clipping
@pytest.mark.parametrize("kind", ["trainer", "distiller"])
def test_clipping_bounds_the_norm_and_logs_the_norm_before_it(kind):
    x, y = _data(n=64)
    batch = Batch(x, y, torch.arange(64))
    t = _trainer(kind, "sgd", max_grad_norm=0.05)
    ref = _trainer(kind, "sgd")  # same weights, no clipping: the same gradients
    logs = t.train_step(batch)
    ref.train_step(batch)
    params = [p for g in t.optimizer.param_groups for p in g["params"]]
    clipped = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))
    assert clipped <= 0.05 * (1 + 1e-5)
    ref_params = [p for g in ref.optimizer.param_groups for p in g["params"]]
    expected = torch.nn.utils.clip_grad_norm_(ref_params, 0.05)  # on the same (unclipped) gradients
    assert float(logs["grad_norm"]) == pytest.approx(float(expected), rel=1e-6)
    assert float(expected) > 0.05  # it did clip


def test_grad_norm_reaches_history_as_a_mean_over_optimizer_steps():
    x, y = _data(n=160)
    t = _trainer("trainer", "sgd", max_grad_norm=1.0, accumulate_steps=4)

    class Norms(Callback):
        def __init__(self):
            self.norms = []

        def on_train_batch_end(self, step, logs=None):
            self.norms.append(float(self.trainer._grad_norm))

    norms = Norms()
    h = t.fit(x, y, epochs=1, batch_size=16, verbose=0, seed=0, callbacks=[norms])
    assert len(norms.norms) == 3
    assert h.history["grad_norm"][0] == pytest.approx(sum(norms.norms) / 3, rel=1e-6)
    assert "grad_norm" not in _trainer("trainer", "sgd").fit(x, y, epochs=1, batch_size=16, verbose=0).history


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), float("inf"), "x"])
def test_max_grad_norm_must_be_positive(bad):
    with pytest.raises(ValueError, match="max_grad_norm must be a finite number > 0"):
        Trainer(_mlp(), device="cpu").compile("sgd", max_grad_norm=bad)


# ------------------------------------------------------------------ precision
def test_fp16_on_the_cpu_is_refused_with_a_pointer_to_bf16():
    for make in (lambda: Trainer(_mlp(), device="cpu").compile("adam", precision="fp16"),
                 lambda: _trainer("distiller", precision="fp16")):
        with pytest.raises(ValueError, match=r"precision='fp16' needs a CUDA device.*Use precision='bf16'"):
            make()
    with pytest.raises(ValueError, match="precision must be one of"):
        check_precision("fp8", "cpu")


@pytest.mark.parametrize("kind", ["trainer", "distiller"])
def test_bf16_trains_on_the_cpu_and_the_loss_decreases(kind):
    x, y = _data(n=256)
    t = _trainer(kind, "adam", precision="bf16")
    dtypes = []
    t.model[0].register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    h = t.fit(x, y, epochs=6, batch_size=32, verbose=0, seed=0)
    assert dtypes[0] == torch.bfloat16  # the student's layers ran in bfloat16
    assert all(p.dtype == torch.float32 for p in t.model.parameters())  # its weights stay float32
    loss = h.history["loss"]
    assert all(math.isfinite(v) for v in loss) and all(b < a for a, b in zip(loss, loss[1:]))
    fp32 = _trainer(kind, "adam").fit(x, y, epochs=6, batch_size=32, verbose=0, seed=0).history["loss"]
    assert loss[-1] == pytest.approx(fp32[-1], rel=0.05)  # and about where float32 training gets
    assert t.predict(x[:8]).dtype == torch.float32
    if kind == "distiller":  # the teacher keeps its own precision (float32 here)
        seen = []
        t.teacher.module[0].register_forward_hook(lambda m, i, o: seen.append(o.dtype))
        t.train_step(Batch(x[:16], y[:16], torch.arange(16)))
        assert seen == [torch.float32]


def _force_fp16_on_cpu(t):
    """The fp16 path (autocast in float16 + a GradScaler) on the CPU, which compile refuses
    for real training (CPU float16 is slow and gains nothing); here to test the machinery."""
    t.precision, t._autocast, t.scaler = "fp16", torch.float16, torch.amp.GradScaler("cpu")
    return t


def test_the_grad_scaler_is_part_of_the_training_state(tmp_path):
    x, y = _data(n=128)

    class StopAt(Callback):
        def on_train_batch_end(self, step, logs=None):
            if self.trainer.global_step == 3:
                raise KeyboardInterrupt

    kw = dict(epochs=2, batch_size=16, verbose=0, seed=0)
    ref = _force_fp16_on_cpu(_trainer("trainer", "sgd", accumulate_steps=2, max_grad_norm=1.0))
    ref.fit(x, y, **kw)
    path = tmp_path / "last.pt"
    crashed = _force_fp16_on_cpu(_trainer("trainer", "sgd", accumulate_steps=2, max_grad_norm=1.0))
    with pytest.raises(KeyboardInterrupt):
        crashed.fit(x, y, callbacks=[TrainingCheckpoint(path, every_steps=1), StopAt()], **kw)
    state = read_training_state(path)
    assert state["grad_scaler"]["scale"] == crashed.scaler.get_scale() and state["precision"] == "fp16"
    resumed = _force_fp16_on_cpu(_trainer("trainer", "sgd", accumulate_steps=2, max_grad_norm=1.0))
    resumed.fit(x, y, resume_from=path, **kw)
    assert resumed.scaler.get_scale() == ref.scaler.get_scale()
    _assert_close_weights(_weights(resumed), _weights(ref), atol=0)


# ------------------------------------------------------------------ resuming
class _Crash(Exception):
    pass


class _CrashAt(Callback):
    def __init__(self, n):
        self.n = n

    def on_train_batch_end(self, step, logs=None):
        if self.trainer.global_step == self.n:
            raise _Crash


@pytest.mark.parametrize("kind", ["trainer", "distiller"])
@pytest.mark.parametrize("crash_at", [2, 4, 5])  # mid-epoch, the epoch's end (4 steps), the next epoch
def test_resume_mid_epoch_with_accumulation_matches_uninterrupted(tmp_path, kind, crash_at):
    x, y = _data(n=112)  # 7 batches of 16: optimizer steps of 2, 2, 2 and 1 batches
    kw = dict(epochs=2, batch_size=16, verbose=0, seed=0, validation_data=_data(40, seed=3),
              augment=lambda v: v + 0.05 * torch.randn_like(v))
    compile_kw = dict(accumulate_steps=2, max_grad_norm=0.5, precision="bf16", scheduler_interval="step",
                      scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5))
    ref = _trainer(kind, **compile_kw)
    h_ref = ref.fit(x, y, **kw)

    path = tmp_path / "last.pt"
    crashed = _trainer(kind, **compile_kw)
    with pytest.raises(_Crash):
        crashed.fit(x, y, callbacks=[TrainingCheckpoint(path, every_steps=1), _CrashAt(crash_at)], **kw)
    state = read_training_state(path)
    assert state["accumulate_steps"] == 2
    # saved after optimizer steps 2, 3 (not the epoch's last: its end saves) and 1 of the next epoch
    assert state["data"]["consumed"] == {2: 4, 4: 6, 5: 2}[crash_at]  # whole steps: 2 batches each

    resumed = _trainer(kind, **compile_kw)
    h = resumed.fit(x, y, callbacks=[TrainingCheckpoint(path, every_steps=1)], resume_from=path, **kw)
    assert h.history == h_ref.history
    assert resumed.global_step == ref.global_step == 8
    _assert_close_weights(_weights(resumed), _weights(ref), atol=0)


def test_resume_refuses_another_accumulation(tmp_path):
    x, y = _data(n=64)
    path = tmp_path / "last.pt"
    _trainer("trainer", accumulate_steps=2).fit(x, y, epochs=1, batch_size=16, verbose=0,
                                                callbacks=[TrainingCheckpoint(path)])
    with pytest.raises(ValueError, match=r"saved with accumulate_steps=2 .* compiled with accumulate_steps=1"):
        _trainer("trainer").fit(x, y, epochs=2, batch_size=16, verbose=0, resume_from=path)
