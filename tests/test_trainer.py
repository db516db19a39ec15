"""Trainer: compile, fit on every kind of data, history, seeds, evaluate/predict, errors."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from kdistill.data.loader import ArrayLoader, make_loader
from kdistill.callbacks import Callback
from kdistill.distiller import Trainer
from kdistill.errors import ModelInputError, NonFiniteLossError
from kdistill.models import build_model
from kdistill.outputs import Batch


def blobs(n: int = 96, d: int = 4, c: int = 3, seed: int = 0):
    """Linearly separable Gaussian blobs: a problem a linear model learns in a few epochs."""
    g = np.random.default_rng(seed)
    centers = g.normal(scale=3.0, size=(c, d))
    y = np.arange(n) % c
    x = centers[y] + g.normal(size=(n, d))
    return x.astype(np.float32), y.astype(np.int64)


def linear(d: int = 4, c: int = 3, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, 16), nn.ReLU(), nn.Linear(16, c))


def params_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same_params(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------ compile
def test_compile_optimizer_by_name_with_learning_rate():
    t = Trainer(linear(), device="cpu")
    assert t.compile("SGD", learning_rate=0.05) is t
    assert isinstance(t.optimizer, torch.optim.SGD)
    assert t.optimizer.param_groups[0]["lr"] == 0.05
    t.compile("adam")
    assert isinstance(t.optimizer, torch.optim.Adam) and t.optimizer.param_groups[0]["lr"] == 1e-3
    n_params = len(list(t.model.parameters()))
    assert len(t.optimizer.param_groups[0]["params"]) == n_params


def test_compile_optimizer_instance_and_factory():
    model = linear()
    opt = torch.optim.RMSprop(model.parameters(), lr=0.01)
    t = Trainer(model, device="cpu").compile(opt)
    assert t.optimizer is opt
    with pytest.raises(ValueError, match="learning_rate is only used"):
        Trainer(model, device="cpu").compile(opt, learning_rate=0.1)
    t2 = Trainer(model, device="cpu").compile(lambda ps: torch.optim.AdamW(ps, lr=0.02))
    assert isinstance(t2.optimizer, torch.optim.AdamW) and t2.optimizer.param_groups[0]["lr"] == 0.02
    with pytest.raises(TypeError, match="factory returned list"):
        Trainer(model, device="cpu").compile(lambda ps: list(ps))
    with pytest.raises(TypeError, match="optimizer must be"):
        Trainer(model, device="cpu").compile(3)


def test_unknown_optimizer_name():
    with pytest.raises(ValueError, match=r"unknown optimizer 'adamm'.*'adam'.*'sgd'"):
        Trainer(linear(), device="cpu").compile("adamm")


def test_optimizer_over_other_parameters():
    other = nn.Linear(4, 3)
    with pytest.raises(ValueError, match="holds none of the parameters"):
        Trainer(linear(), device="cpu").compile(torch.optim.Adam(other.parameters()))


def test_model_must_be_a_module():
    with pytest.raises(TypeError, match="torch.nn.Module, got function"):
        Trainer(lambda x: x)


def test_unknown_metric_at_compile():
    with pytest.raises(ValueError, match="unknown metric"):
        Trainer(linear(), device="cpu").compile("sgd", metrics=["acuracy"])


def test_fit_before_compile_raises():
    x, y = blobs()
    with pytest.raises(RuntimeError, match=r"compile\(...\) before fit"):
        Trainer(linear(), device="cpu").fit(x, y, verbose=0)


# ------------------------------------------------------------------ fit on every kind of data
class ArrayDataset(Dataset):
    def __init__(self, x, y, as_dict=False):
        self.x, self.y, self.as_dict = x, y, as_dict

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        if self.as_dict:
            return {"inputs": torch.from_numpy(self.x[i]), "targets": int(self.y[i])}
        return torch.from_numpy(self.x[i]), int(self.y[i])


def _data(kind: str):
    x, y = blobs()
    if kind == "numpy":
        return (x, y), {}
    if kind == "numpy_float64":
        return (x.astype(np.float64), y.astype(np.int32)), {}
    if kind == "tensor":
        return (torch.from_numpy(x), torch.from_numpy(y)), {}
    if kind == "tensordataset":
        return (TensorDataset(torch.from_numpy(x), torch.from_numpy(y)),), {}
    if kind == "dataset":
        return (ArrayDataset(x, y),), {}
    if kind == "dict_dataset":
        return (ArrayDataset(x, y, as_dict=True),), {}
    if kind == "dataloader":
        return (DataLoader(ArrayDataset(x, y), batch_size=16, shuffle=True),), {}
    if kind == "dict_dataloader":
        return (DataLoader(ArrayDataset(x, y, as_dict=True), batch_size=16, shuffle=True),), {}
    raise AssertionError(kind)


KINDS = ["numpy", "numpy_float64", "tensor", "tensordataset", "dataset", "dict_dataset",
         "dataloader", "dict_dataloader"]


@pytest.mark.parametrize("kind", KINDS)
def test_fit_on_every_kind_of_data_learns(kind):
    args, _ = _data(kind)
    x, y = blobs()
    t = Trainer(linear(), device="cpu").compile("adam", learning_rate=0.02, metrics=["accuracy"])
    before = t.evaluate(x, y)
    h = t.fit(*args, epochs=8, batch_size=16, validation_data=(x, y), verbose=0)
    after = t.evaluate(x, y)
    assert set(h.history) == {"loss", "accuracy", "val_loss", "val_accuracy"}
    assert all(len(v) == 8 for v in h.history.values()) and h.epoch == list(range(8))
    assert h.history["loss"][-1] < h.history["loss"][0]
    assert after["loss"] < before["loss"]
    assert after["accuracy"] >= 0.9
    # the last epoch's val_ logs are what evaluate says
    assert h.history["val_loss"][-1] == pytest.approx(after["loss"], rel=1e-5)
    assert h.history["val_accuracy"][-1] == pytest.approx(after["accuracy"])


def test_tensordataset_takes_the_fast_path():
    x, y = blobs()
    assert isinstance(make_loader(TensorDataset(torch.from_numpy(x), torch.from_numpy(y)), batch_size=8),
                      ArrayLoader)


def test_validation_data_as_dataset_and_dataloader():
    x, y = blobs(30)
    t = Trainer(linear(), device="cpu").compile("sgd", metrics=["accuracy"])
    h1 = t.fit(x, y, epochs=1, validation_data=ArrayDataset(x, y), verbose=0)
    r = t.evaluate(x, y)
    assert h1.history["val_loss"][0] == pytest.approx(r["loss"], rel=1e-5)
    h2 = t.fit(x, y, epochs=1, validation_data=DataLoader(ArrayDataset(x, y), batch_size=7), verbose=0)
    assert "val_accuracy" in h2.history
    with pytest.raises(ValueError, match="validation_data must be"):
        t.fit(x, y, epochs=1, validation_data=(x, y, y), verbose=0)


def test_history_without_metrics_or_validation():
    x, y = blobs(20)
    t = Trainer(linear(), device="cpu").compile("sgd")
    h = t.fit(x, y, epochs=3, verbose=0)
    assert list(h.history) == ["loss"] and len(h.history["loss"]) == 3
    assert t.history is h


def test_epoch_loss_is_sample_weighted_mean_of_steps():
    x, y = blobs(10)
    t = Trainer(linear(), device="cpu").compile("sgd", learning_rate=0.0)  # weights never change
    h = t.fit(x, y, epochs=1, batch_size=4, shuffle=False, verbose=0)  # batches of 4, 4, 2
    with torch.no_grad():
        expected = F.cross_entropy(t.model(torch.from_numpy(x)), torch.from_numpy(y)).item()
    assert h.history["loss"][0] == pytest.approx(expected, rel=1e-5)


# ------------------------------------------------------------------ seeds
def _run_seeded(model, seed, **kw):
    x, y = blobs()
    t = Trainer(model, device="cpu").compile("adam", learning_rate=0.01, metrics=["accuracy"])
    h = t.fit(x, y, epochs=3, batch_size=10, seed=seed, verbose=0, **kw)
    return params_of(t.model), h.history


def test_seed_makes_runs_bit_identical_and_other_seed_differs():
    base = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 3))
    p1, h1 = _run_seeded(copy.deepcopy(base), seed=123)
    torch.manual_seed(999)  # disturb the global generator in between
    p2, h2 = _run_seeded(copy.deepcopy(base), seed=123)
    assert same_params(p1, p2)
    assert h1 == h2
    p3, h3 = _run_seeded(copy.deepcopy(base), seed=124)
    assert not same_params(p1, p3)
    assert h1 != h3


def test_bad_seed():
    x, y = blobs(8)
    with pytest.raises(ValueError, match="seed must be a non-negative integer, got -1"):
        Trainer(linear(), device="cpu").compile("sgd").fit(x, y, seed=-1, verbose=0)


def test_seeded_runs_with_a_dataset_are_identical():
    x, y = blobs(40)
    base = linear()

    def run(seed):
        t = Trainer(copy.deepcopy(base), device="cpu").compile("sgd", learning_rate=0.1)
        t.fit(ArrayDataset(x, y), epochs=2, batch_size=8, seed=seed, verbose=0)
        return params_of(t.model)

    assert same_params(run(5), run(5))
    assert not same_params(run(5), run(6))


# ------------------------------------------------------------------ evaluate / predict
def test_predict_and_evaluate_match_manual_computation():
    x, y = blobs(50)
    t = Trainer(linear(), device="cpu").compile("adam", learning_rate=0.02, metrics=["accuracy"])
    t.fit(x, y, epochs=2, batch_size=16, verbose=0)
    logits = t.predict(x, batch_size=16)
    assert logits.shape == (50, 3) and logits.device.type == "cpu"
    t.model.eval()
    with torch.no_grad():
        manual = t.model(torch.from_numpy(x))
    assert torch.allclose(logits, manual, atol=1e-6)
    r = t.evaluate(x, y, batch_size=16)
    acc = (manual.argmax(1) == torch.from_numpy(y)).float().mean().item()
    assert r["accuracy"] == pytest.approx(acc)
    assert r["loss"] == pytest.approx(F.cross_entropy(manual, torch.from_numpy(y)).item(), rel=1e-5)
    # predict on a (x, y) tuple, a tensor and a Dataset gives the same logits
    assert torch.allclose(t.predict((x, y)), logits, atol=1e-6)
    assert torch.allclose(t.predict(torch.from_numpy(x)), logits, atol=1e-6)
    assert torch.allclose(t.predict(ArrayDataset(x, y)), logits, atol=1e-6)


def test_predict_and_evaluate_restore_training_mode():
    x, y = blobs(10)
    model = nn.Sequential(nn.Linear(4, 3), nn.Dropout(0.5))
    t = Trainer(model, device="cpu").compile("sgd")
    model.train()
    a, b = t.predict(x), t.predict(x)
    assert torch.equal(a, b)  # dropout off while predicting
    assert model.training
    t.evaluate(x, y)
    assert model.training


def test_evaluate_without_compile_reports_loss():
    x, y = blobs(12)
    r = Trainer(linear(), device="cpu").evaluate(x, y, verbose=0)
    assert set(r) == {"loss"} and r["loss"] > 0


def test_evaluate_verbose_prints(capsys):
    x, y = blobs(12)
    t = Trainer(linear(), device="cpu").compile("sgd", metrics=["accuracy"])
    t.evaluate(x, y, verbose=1)
    out = capsys.readouterr().out
    assert "loss: " in out and "accuracy: " in out


# ------------------------------------------------------------------ temperature
def test_temperature_divides_logits_before_the_loss():
    x, y = blobs(8)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    T = 4.0
    t = Trainer(linear(), device="cpu").compile("sgd", learning_rate=0.1, temperature=T)
    with torch.no_grad():
        logits = t.model(xt)
    expected = F.cross_entropy(logits / T, yt).item()
    assert expected != pytest.approx(F.cross_entropy(logits, yt).item(), rel=1e-3)
    logs = t.train_step(Batch(xt, yt, torch.arange(8)))
    assert float(logs["loss"]) == pytest.approx(expected, rel=1e-6)
    # and through fit: one full batch, the loss logged is the tempered one
    t2 = Trainer(linear(), device="cpu").compile("sgd", learning_rate=0.1, temperature=T)
    h = t2.fit(x, y, epochs=1, batch_size=8, verbose=0)
    assert h.history["loss"][0] == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("bad", [0, -1.0, float("nan")])
def test_bad_temperature(bad):
    with pytest.raises(ValueError, match="temperature"):
        Trainer(linear(), device="cpu").compile("sgd", temperature=bad)


# ------------------------------------------------------------------ errors
def test_rejected_inputs_name_given_and_expected_shape():
    model = build_model("classic_student")
    t = Trainer(model, device="cpu").compile("adam")
    x = np.zeros((4, 3, 28, 28), np.float32)
    y = np.zeros(4, np.int64)
    with pytest.raises(ModelInputError, match=r"\(4, 3, 28, 28\)") as e:
        t.fit(x, y, epochs=1, verbose=0)
    assert "(batch, 1, 28, 28)" in str(e.value)
    assert isinstance(e.value, ValueError)


def test_rejected_inputs_after_a_successful_fit():
    model = build_model("classic_student", input_size=8)
    t = Trainer(model, device="cpu").compile("adam")
    t.fit(np.zeros((4, 1, 8, 8), np.float32), np.zeros(4, np.int64), epochs=1, verbose=0)
    with pytest.raises(ModelInputError, match=r"\(2, 1, 12, 12\).*\(batch, 1, 8, 8\)"):
        t.predict(np.zeros((2, 1, 12, 12), np.float32))
    with pytest.raises(ModelInputError, match=r"\(2, 3, 8, 8\)"):
        t.evaluate(np.zeros((2, 3, 8, 8), np.float32), np.zeros(2, np.int64))


def test_integer_images_get_dtype_advice():
    t = Trainer(build_model("classic_student", input_size=8), device="cpu").compile("adam")
    with pytest.raises(ModelInputError, match=r"dtype torch.uint8.*Convert the inputs to float"):
        t.fit(np.zeros((4, 1, 8, 8), np.uint8), np.zeros(4, np.int64), verbose=0)


def test_model_returning_wrong_output():
    class Scalar(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(1))

        def forward(self, x):
            return (x * self.w).sum()

    t = Trainer(Scalar(), device="cpu").compile("sgd")
    with pytest.raises(ModelInputError, match=r"returned Tensor of shape \(\).*\(B, C\) logits"):
        t.fit(np.zeros((4, 2), np.float32), np.zeros(4, np.int64), verbose=0)


def test_nan_loss_raises_and_leaves_weights_unchanged():
    x, y = blobs(20)
    x[13, 2] = np.nan  # in the second batch of 8
    t = Trainer(linear(), device="cpu").compile("adam", learning_rate=0.01)
    snapshots = []

    class Snap:
        def set_trainer(self, trainer):
            pass

        def on_train_begin(self, logs=None): ...
        def on_epoch_begin(self, epoch, logs=None): ...
        def on_epoch_end(self, epoch, logs=None): ...
        def on_train_end(self, logs=None): ...

        def on_train_batch_end(self, step, logs=None):
            snapshots.append(params_of(t.model))

    with pytest.raises(NonFiniteLossError) as e:
        t.fit(x, y, epochs=1, batch_size=8, shuffle=False, verbose=0, callbacks=[Snap()])
    msg = str(e.value)
    assert "'loss'" in msg and "epoch 1" in msg and "step 2" in msg and "nan" in msg
    assert isinstance(e.value, FloatingPointError)
    assert len(snapshots) == 1
    assert same_params(params_of(t.model), snapshots[0])  # the NaN step did not update


def test_nan_loss_on_first_step_keeps_initial_weights():
    x, y = blobs(8)
    x[0, 0] = np.inf
    t = Trainer(linear(), device="cpu").compile("sgd", learning_rate=0.1)
    before = params_of(t.model)
    with pytest.raises(NonFiniteLossError, match="epoch 1, step 1"):
        t.fit(x, y, epochs=2, verbose=0)
    assert same_params(before, params_of(t.model))


def test_unlabelled_samples_excluded_from_loss_and_accuracy():
    x, y = blobs(12)
    y_masked = y.copy()
    y_masked[::3] = -1  # a third has no label
    keep = y_masked != -1
    t = Trainer(linear(), device="cpu").compile("sgd", learning_rate=0.0, metrics=["accuracy"])
    with torch.no_grad():
        logits = t.model(torch.from_numpy(x))
    yt = torch.from_numpy(y)
    exp_loss = F.cross_entropy(logits[keep], yt[keep]).item()
    exp_acc = (logits[keep].argmax(1) == yt[keep]).float().mean().item()
    h = t.fit(x, y_masked, epochs=1, batch_size=5, shuffle=False, validation_data=(x, y_masked), verbose=0)
    assert h.history["loss"][0] == pytest.approx(exp_loss, rel=1e-5)
    assert h.history["accuracy"][0] == pytest.approx(exp_acc)
    assert h.history["val_loss"][0] == pytest.approx(exp_loss, rel=1e-5)
    assert h.history["val_accuracy"][0] == pytest.approx(exp_acc)
    r = t.evaluate(x, y_masked)
    assert r["accuracy"] == pytest.approx(exp_acc)


def test_unlabelled_samples_do_not_move_the_weights():
    x, y = blobs(6)
    t = Trainer(linear(), device="cpu").compile("sgd", learning_rate=0.5)
    before = params_of(t.model)
    h = t.fit(x, np.full(6, -1), epochs=1, batch_size=3, verbose=0)
    assert same_params(before, params_of(t.model))
    assert "loss" not in h.history  # nothing labelled: no loss to report


@pytest.mark.parametrize("epochs", [0, -1, 1.5])
def test_bad_epochs(epochs):
    x, y = blobs(8)
    with pytest.raises(ValueError, match=f"epochs must be a positive integer, got {epochs}"):
        Trainer(linear(), device="cpu").compile("sgd").fit(x, y, epochs=epochs, verbose=0)


@pytest.mark.parametrize("data", ["numpy", "dataset"])
@pytest.mark.parametrize("batch_size", [0, -4])
def test_bad_batch_size(data, batch_size):
    x, y = blobs(8)
    args = (x, y) if data == "numpy" else (ArrayDataset(x, y),)
    with pytest.raises(ValueError, match=f"batch_size must be a positive integer, got {batch_size}"):
        Trainer(linear(), device="cpu").compile("sgd").fit(*args, batch_size=batch_size, verbose=0)


@pytest.mark.parametrize("bad", [3, -2])
def test_label_out_of_range_is_explained(bad):
    x, _ = blobs(4)
    y = np.array([0, 1, bad, 2])
    with pytest.raises(ValueError, match=rf"class indices in \[0, 3\).*labels from {min(bad, 0)} to {max(bad, 2)}"):
        Trainer(linear(), device="cpu").compile("sgd").fit(x, y, verbose=0)


def test_length_mismatch():
    x, y = blobs(8)
    with pytest.raises(ValueError, match="8 samples but 7 labels"):
        Trainer(linear(), device="cpu").compile("sgd").fit(x, y[:7], verbose=0)


def test_unexpected_fit_keyword():
    x, y = blobs(8)
    with pytest.raises(TypeError, match="unexpected keyword arguments \\['bacth_size'\\]"):
        Trainer(linear(), device="cpu").compile("sgd").fit(x, y, bacth_size=4, verbose=0)


def test_training_without_labels_is_explained():
    x, _ = blobs(8)
    with pytest.raises(ValueError, match="training needs labels"):
        Trainer(linear(), device="cpu").compile("sgd").fit(x, verbose=0)


def test_initial_epoch_resumes_numbering():
    x, y = blobs(8)
    t = Trainer(linear(), device="cpu").compile("sgd")
    h = t.fit(x, y, epochs=5, initial_epoch=3, verbose=0)
    assert h.epoch == [3, 4] and len(h.history["loss"]) == 2


def test_steps_per_epoch_cycles_the_data_and_reshuffles():
    """An epoch of N steps draws batches pass after pass, continuing across epochs."""
    seen: list[torch.Tensor] = []

    class Record(Callback):
        def on_train_batch_end(self, step, logs=None):
            seen.append(self.trainer._last_index)

    class IndexTrainer(Trainer):
        def train_step(self, batch):
            self._last_index = batch.index.clone()
            return super().train_step(batch)

    torch.manual_seed(0)
    x, y = torch.randn(10, 4), torch.randint(0, 3, (10,))
    trainer = IndexTrainer(nn.Linear(4, 3), device="cpu").compile("sgd", learning_rate=0.1)
    history = trainer.fit(x, y, epochs=3, batch_size=4, steps_per_epoch=5, verbose=0, seed=0, callbacks=[Record()])
    assert len(history.history["loss"]) == 3 and len(seen) == 15
    # batches of 4, 4, 2 per pass: 15 steps are exactly 5 passes, each a permutation of 0..9
    passes = [torch.cat(seen[i : i + 3]) for i in range(0, 15, 3)]
    for p in passes:
        assert sorted(p.tolist()) == list(range(10))
    assert any(not torch.equal(passes[0], p) for p in passes[1:])  # reshuffled
    with pytest.raises(ValueError, match="steps_per_epoch must be a positive integer"):
        trainer.fit(x, y, steps_per_epoch=0, verbose=0)


def test_a_train_step_override_may_return_python_floats():
    class Custom(Trainer):
        def train_step(self, batch):
            logs = super().train_step(batch)
            return {**logs, "constant": 1.5}

    x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
    trainer = Custom(nn.Linear(4, 3), device="cpu").compile("sgd", metrics=["accuracy"], learning_rate=0.1)
    history = trainer.fit(x, y, epochs=2, batch_size=8, verbose=0, seed=0)
    assert history.history["constant"] == [1.5, 1.5]
    assert list(history.history)[:3] == ["loss", "accuracy", "constant"]
