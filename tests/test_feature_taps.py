"""Feature taps, adapters inferred by a dry run, and feature losses inside the Distiller."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kdistill import Distiller, KDLoss, WeightedSum
from kdistill.adapters import MapAdapter, make_adapter
from kdistill.callbacks import Callback, TrainingCheckpoint
from kdistill.cli import main
from kdistill.outputs import Batch
from kdistill.losses import DistillationLoss
from kdistill.taps import FeatureTaps, list_layers, resolve_module


class HintLoss(DistillationLoss):
    """Test loss: MSE between adapter(student layer) and teacher layer (FitNets' form)."""

    def __init__(self, student_layer, teacher_layer):
        super().__init__()
        self.taps = {"student": student_layer, "teacher": teacher_layer}
        self.adapter = None
        self.setup_calls = 0

    def setup(self, student, teacher):
        s, t = self.features(student, teacher)
        self.adapter = make_adapter(s.shape, t.shape)
        self.setup_calls += 1

    def forward(self, student, teacher, batch):
        s, t = self.features(student, teacher)
        return F.mse_loss(self.adapter(s), t)


def cnn(width: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1), nn.ReLU(),                      # 0, 1: (B, w, 8, 8)
        nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.ReLU(),    # 2, 3: (B, 2w, 4, 4)
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, 3),     # 4, 5, 6
    )


def data(n=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    x = 0.3 * torch.randn(n, 1, 8, 8, generator=g)
    x[torch.arange(n), 0, 2 * y, :] += 1.0
    return x, y


def test_list_layers_and_unknown_paths():
    model = cnn(4, 0)
    rows = {r["path"]: r for r in list_layers(model, torch.zeros(2, 1, 8, 8))}
    assert rows["2"]["output_shape"] == [2, 8, 4, 4] and rows["6"]["output_shape"] == [2, 3]
    assert rows["0"]["parameters"] == 4 * 9 + 4
    with pytest.raises(ValueError, match=r"has no layer 'layr3'.*list_layers"):
        resolve_module(model, "layr3")
    net = nn.Sequential()
    net.add_module("layer3", nn.Linear(2, 2))
    with pytest.raises(ValueError, match="closest are: layer3"):
        resolve_module(net, "layer4")


def test_feature_taps_capture_outputs_and_inputs():
    model = cnn(4, 0)
    x = torch.randn(2, 1, 8, 8)
    with FeatureTaps(model, ["2", "6:input"]) as taps:
        logits = model(x)
    assert taps.captured["2"].shape == (2, 8, 4, 4)
    assert torch.equal(model[6](taps.captured["6:input"]), logits)  # the classifier's input
    assert not model[2]._forward_hooks and not model[6]._forward_pre_hooks  # removed on exit


@pytest.mark.parametrize("s, t, kind", [
    ((4, 16), (4, 32), nn.Linear), ((4, 16), (4, 16), nn.Identity),
    ((4, 5, 16), (4, 5, 8), nn.Linear), ((4, 8, 4, 4), (4, 16, 4, 4), MapAdapter),
    ((4, 8, 8, 8), (4, 16, 4, 4), MapAdapter),
])
def test_make_adapter_maps_to_the_teacher_shape(s, t, kind):
    adapter = make_adapter(s, t)
    assert isinstance(adapter, kind)
    assert adapter(torch.randn(*s)).shape == t


def test_make_adapter_refuses_different_kinds():
    with pytest.raises(ValueError, match=r"no adapter from .*\(4, 8, 4, 4\).*\(4, 32\)"):
        make_adapter((4, 8, 4, 4), (4, 32))


def _distiller(loss, lr=1e-2):
    student, teacher = cnn(4, 1), cnn(16, 2)
    d = Distiller(student=student, teacher=teacher, device="cpu")
    d.compile(torch.optim.Adam(student.parameters(), lr=lr), metrics=["accuracy"], distillation_loss_fn=loss, alpha=0.5,
              scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, 2, 0.5))
    return d


def test_adapters_are_built_by_a_dry_run_and_trained_with_the_student():
    loss = HintLoss("2", "2")
    d = _distiller(loss)
    teacher_before = {k: v.clone() for k, v in d.teacher.module.state_dict().items()}
    x, y = data()
    hist = d.fit(x, y, epochs=3, batch_size=16, verbose=0, seed=0)
    assert loss.setup_calls == 1 and isinstance(loss.adapter, MapAdapter)  # (B, 8, 4, 4) -> (B, 32, 4, 4)
    assert len(d.optimizer.param_groups) == 2  # the adapter's group
    assert {id(p) for p in d.optimizer.param_groups[1]["params"]} == {id(p) for p in loss.adapter.parameters()}
    assert len(d.scheduler.base_lrs) == 2  # rebuilt from its factory over both groups
    assert hist.history["distillation_loss"][-1] < hist.history["distillation_loss"][0]
    assert all(torch.equal(v, teacher_before[k]) for k, v in d.teacher.module.state_dict().items())
    # hooks are gone after fit, on both models
    assert not any(m._forward_hooks for m in d.student.modules())
    assert not any(m._forward_hooks for m in d.teacher.module.modules())
    # a second fit keeps the same adapter (no second set-up)
    adapter = loss.adapter
    d.fit(x, y, epochs=1, batch_size=16, verbose=0, seed=0)
    assert loss.adapter is adapter and loss.setup_calls == 1


def test_the_dry_run_does_not_shift_the_data_order():
    x, y = data()
    a = _distiller(HintLoss("2", "2"))
    a.fit(x, y, epochs=2, batch_size=16, verbose=0, seed=0)
    b = _distiller(HintLoss("2", "2"))
    torch.manual_seed(0)
    b.setup(x[:16])  # set up ahead: fit then skips its peek
    b.fit(x, y, epochs=2, batch_size=16, verbose=0, seed=0)
    for p, q in zip(a.student.parameters(), b.student.parameters()):
        assert torch.equal(p, q)


def test_several_losses_each_logged_and_the_tap_union_installed():
    loss = WeightedSum({"kd": (KDLoss(temperature=4), 1.0), "hint2": (HintLoss("2", "2"), 0.5),
                        "hint0": (HintLoss("0", "2"), 0.1)})
    d = _distiller(loss)
    assert d.tapped_layers() == {"student": ["0", "2"], "teacher": ["2"]}
    x, y = data()
    hist = d.fit(x, y, epochs=1, batch_size=16, verbose=0, seed=0)
    for name in ("kd", "hint2", "hint0"):
        assert f"distillation/{name}" in hist.history
    assert isinstance(loss.parts["hint0"].adapter, MapAdapter)  # (B, 4, 8, 8) -> (B, 32, 4, 4)


class Crash(Exception):
    pass


class CrashAt(Callback):
    def __init__(self, n):
        self.n = n

    def on_train_batch_end(self, step, logs=None):
        if self.trainer.global_step == self.n:
            raise Crash


def test_resume_restores_adapters_bit_for_bit(tmp_path):
    x, y = data()
    ref = _distiller(HintLoss("2", "2"))
    ref.fit(x, y, epochs=2, batch_size=16, verbose=0, seed=0)
    path = tmp_path / "last.pt"
    crashed = _distiller(HintLoss("2", "2"))
    with pytest.raises(Crash):
        crashed.fit(x, y, epochs=2, batch_size=16, verbose=0, seed=0,
                    callbacks=[TrainingCheckpoint(path, every_steps=2), CrashAt(9)])
    resumed_loss = HintLoss("2", "2")
    resumed = _distiller(resumed_loss)
    resumed.fit(x, y, epochs=2, batch_size=16, verbose=0, seed=0, resume_from=path)
    for p, q in zip(resumed.student.parameters(), ref.student.parameters()):
        assert torch.equal(p, q)
    ref_adapter = ref.distillation_loss.adapter.state_dict()
    for k, v in resumed_loss.adapter.state_dict().items():
        assert torch.equal(v, ref_adapter[k]), k


def test_a_loss_tapping_a_missing_layer_fails_with_the_closest_names():
    d = _distiller(HintLoss("layer2", "2"))
    x, y = data()
    with pytest.raises(ValueError, match="the student .* has no layer 'layer2'"):
        d.fit(x, y, epochs=1, verbose=0)


def test_train_step_in_your_own_loop_sets_up_on_its_first_batch():
    from kdistill.outputs import Batch

    loss = HintLoss("2", "2")
    d = _distiller(loss)
    x, y = data(16)
    logs = d.train_step(Batch(x, y))
    assert loss.setup_calls == 1 and "distillation_loss" in logs


def test_layers_cli(capsys):
    assert main(["layers", "classic_student", "--depth", "1"]) == 0
    out = capsys.readouterr().out
    assert "2x32x7x7" in out and "6:input" not in out and "<path>:input" in out
    assert main(["layers", "classic_studnet"]) == 1
    assert "did you mean classic_student" in capsys.readouterr().err
    # --kw takes one KEY=VALUE each time: the model named after it stays the model
    assert main(["layers", "--kw", "width=2", "classic_student", "--depth", "1"]) == 0
    assert "2x64x7x7" in capsys.readouterr().out  # width 2: 32 -> 64 channels


def test_fitnets_stage_one_trains_on_the_hint_alone():
    from kdistill.losses.features import HintLoss as FitNets

    hint = FitNets("2", "2", weight=1.0, hint_epochs=1)
    loss = WeightedSum({"kd": (KDLoss(temperature=4), 1.0), "hint": (hint, 1.0)})
    d = _distiller(loss)
    x, y = data()
    head = d.student[6].weight.detach().clone()
    d.fit(x, y, epochs=1, batch_size=16, verbose=0, seed=0)
    # stage 1: the layers after the guided one (the classifier) get no gradient at all
    assert torch.equal(d.student[6].weight, head)
    assert not torch.equal(d.student[2].weight, cnn(4, 1)[2].weight)  # the guided layer trained
    d.fit(x, y, epochs=2, batch_size=16, verbose=0, seed=0, initial_epoch=1)
    assert not torch.equal(d.student[6].weight, head)  # stage 2: everything trains


def test_factor_transfer_pretrains_its_paraphraser_once_inside_fit(tmp_path):
    from kdistill.losses import FTLoss

    ft = FTLoss("2", "2", pretrain_epochs=2, pretrain_lr=0.05)
    d = _distiller(ft)
    x, y = data()
    d.setup(x[:16])
    before = {k: v.clone() for k, v in ft.paraphraser.state_dict().items()}
    # its reconstruction error before and after the stage the Distiller runs
    with torch.no_grad():
        t = d.teacher(Batch(x))
        error_before = float(ft.paraphraser_loss(t.features["2"]))
    path = tmp_path / "last.pt"
    d.fit(x, y, epochs=1, batch_size=16, verbose=0, seed=0, callbacks=[TrainingCheckpoint(path)])
    assert bool(ft.pretrained) and not ft.needs_pretraining
    assert any(not torch.equal(v, before[k]) for k, v in ft.paraphraser.state_dict().items())
    with torch.no_grad(), FeatureTaps(d.teacher.module, ["2"]) as taps:  # fit removed its own taps
        d.teacher.module(x)
        error_after = float(ft.paraphraser_loss(taps.captured["2"]))
    assert error_after < error_before
    # a resumed run finds the stage done and does not repeat it
    ft2 = FTLoss("2", "2", pretrain_epochs=2, pretrain_lr=0.05)
    d2 = _distiller(ft2)
    d2.fit(x, y, epochs=1, batch_size=16, verbose=0, seed=0, resume_from=path)
    assert bool(ft2.pretrained)
    for k, v in ft2.paraphraser.state_dict().items():
        assert torch.equal(v, ft.paraphraser.state_dict()[k]), k
