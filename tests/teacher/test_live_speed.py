"""LiveTeacher's speed options (channels_last, autocast, compile): outputs agree with the
plain forward, taps keep working (or are refused with a clear message), bad values are
refused, and distillation trains with the options on without touching the teacher."""

import copy
import os
import warnings

import pytest
import torch
from torch import nn

import kdistill
from kdistill.errors import ModelInputError
from kdistill.losses import HintLoss
from kdistill.outputs import Batch
from kdistill.teacher import LiveTeacher

C = 10


def conv_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(),                  # 0, 1: (B, 4, 8, 8)
        nn.Conv2d(4, 8, 3, stride=2, padding=1), nn.ReLU(),        # 2, 3: (B, 8, 4, 4)
        nn.Flatten(), nn.Linear(8 * 16, C),                        # 4, 5: (B, 128) -> (B, C)
    )


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, C))


class ViewAfterConv(nn.Module):
    """A teacher written with ``.view`` after a convolution (fails in channels-last)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 64, C)

    def forward(self, x):
        h = self.conv(x)
        return self.fc(h.view(h.size(0), -1))


def images(n: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


def plain_outputs(net: nn.Module, x: torch.Tensor, taps=()) -> kdistill.Outputs:
    t = LiveTeacher(copy.deepcopy(net), channels_last=False)
    t.set_taps(taps)
    return t(Batch(x, None, None))


def assert_ordinary(t: torch.Tensor) -> None:
    """What losses expect: float32, contiguous, out of inference mode, no grad."""
    assert t.dtype == torch.float32
    assert t.is_contiguous()
    assert not t.is_inference()
    assert not t.requires_grad


# --------------------------------------------------------------------------- channels_last
def test_all_options_off_is_bit_identical_to_the_modules_own_forward():
    net, x = conv_net(), images()
    with torch.inference_mode():
        want = net(x)
    t = LiveTeacher(copy.deepcopy(net), channels_last=False)
    out = t(Batch(x, None, None))
    assert torch.equal(out.logits, want)
    assert all(p.is_contiguous() for p in t.parameters())
    assert repr(t) == "LiveTeacher(Sequential, channels_last=False, autocast=None, compile=False)"


def test_auto_is_channels_last_for_a_conv_net_on_the_cpu_and_agrees_with_the_plain_forward():
    net, x = conv_net(), images()
    t = LiveTeacher(copy.deepcopy(net))  # default: "auto"
    assert t.channels_last and repr(t).startswith("LiveTeacher(Sequential, channels_last=True (auto)")
    assert t.module[0].weight.is_contiguous(memory_format=torch.channels_last)
    out = t(Batch(x, None, None))
    assert_ordinary(out.logits)
    torch.testing.assert_close(out.logits, plain_outputs(net, x).logits, rtol=1e-5, atol=1e-5)


def test_auto_leaves_a_network_without_convolutions_alone():
    net = mlp()
    t = LiveTeacher(copy.deepcopy(net))
    assert not t.channels_last and "channels_last=False (auto)" in repr(t)
    x = torch.randn(8, 8)
    assert torch.equal(t(Batch(x, None, None)).logits, plain_outputs(net, x).logits)
    # forced on, 2-D inputs stay as they are and the outputs are unchanged
    forced = LiveTeacher(copy.deepcopy(net), channels_last=True)
    assert torch.equal(forced(Batch(x, None, None)).logits, plain_outputs(net, x).logits)


def test_channels_last_taps_are_captured_as_ordinary_tensors_and_the_batch_is_untouched():
    net, x = conv_net(), images()
    taps = ["0:input", "2", "5:input"]
    t = LiveTeacher(copy.deepcopy(net), channels_last=True)
    t.set_taps(taps)
    batch = Batch(x, None, None)
    out = t(batch)
    want = plain_outputs(net, x, taps)
    assert sorted(out.features) == sorted(taps)
    for k in taps:
        assert_ordinary(out.features[k])
        torch.testing.assert_close(out.features[k], want.features[k], rtol=1e-5, atol=1e-5)
    assert torch.equal(out.features["0:input"], x)
    assert batch.inputs is x and x.is_contiguous()  # the student's view of the batch


def test_auto_falls_back_with_a_warning_when_the_forward_fails_in_channels_last():
    x = images()
    want = plain_outputs(ViewAfterConv(), x).logits
    t = LiveTeacher(ViewAfterConv())
    with pytest.warns(RuntimeWarning, match="channels_last='auto' is off"):
        out = t(Batch(x, None, None))
    assert torch.equal(out.logits, want)
    assert not t.channels_last and t.module.conv.weight.is_contiguous()
    assert torch.equal(t(Batch(x, None, None)).logits, want)  # and from then on


def test_forced_channels_last_refuses_a_forward_that_fails_in_it_with_the_fix():
    t = LiveTeacher(ViewAfterConv(), channels_last=True)
    with pytest.raises(ModelInputError, match=r"channels-last memory format.*channels_last=False"):
        t(Batch(images(), None, None))


def test_bad_inputs_under_channels_last_get_the_ordinary_input_error():
    t = LiveTeacher(conv_net(), channels_last=True)
    with pytest.raises(ModelInputError, match=r"rejected inputs of shape \(4, 3, 8, 8\)"):
        t(Batch(torch.randn(4, 3, 8, 8), None, None))
    assert t.channels_last and t.module[0].weight.is_contiguous(memory_format=torch.channels_last)


# --------------------------------------------------------------------------- autocast
@pytest.mark.parametrize("channels_last", [False, True])
def test_bfloat16_autocast_returns_float32_close_to_the_plain_forward(channels_last):
    net, x = conv_net(), images()
    t = LiveTeacher(copy.deepcopy(net), channels_last=channels_last, autocast="bfloat16")
    assert "autocast='bfloat16'" in repr(t)
    t.set_taps(["2"])
    out = t(Batch(x, None, None))
    want = plain_outputs(net, x, ["2"])
    assert_ordinary(out.logits)
    assert_ordinary(out.features["2"])
    # bfloat16 keeps ~3 significant digits
    torch.testing.assert_close(out.logits, want.logits, rtol=5e-2, atol=5e-2)
    torch.testing.assert_close(out.features["2"], want.features["2"], rtol=5e-2, atol=5e-2)
    assert LiveTeacher(copy.deepcopy(net), autocast=torch.bfloat16).autocast == torch.bfloat16


# --------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("kwargs, match", [
    ({"channels_last": "yes"}, r"channels_last must be True, False or 'auto', got 'yes'"),
    ({"channels_last": 1}, r"channels_last must be True, False or 'auto', got 1"),
    ({"autocast": "fp16"}, r"autocast must be None, 'bfloat16' or 'float16' \(CUDA only\), got 'fp16'"),
    ({"autocast": torch.int8}, r"autocast must be None, 'bfloat16' or 'float16'"),
    ({"autocast": "float16"}, r"autocast='float16' runs only on CUDA; this teacher is on 'cpu'.*'bfloat16'"),
    ({"compile": 1.5}, r"compile must be True, False or a torch.compile backend name, got 1.5"),
    ({"compile": "no-such-backend"}, r"compile='no-such-backend' is not a torch.compile backend.*'inductor'"),
])
def test_bad_option_values_are_refused_saying_what_is_accepted(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LiveTeacher(conv_net(), **kwargs)


def test_taps_are_refused_on_a_compiled_teacher():
    t = LiveTeacher(conv_net(), compile="eager")  # lazy: nothing compiles here
    with pytest.raises(ValueError, match=r"compile='eager'.*forward hooks.*compile=False"):
        t.set_taps(["2"])
    t.set_taps([])  # no taps: fine


# --------------------------------------------------------------------------- compile
def _failing_compile(module, **kwargs):
    def compiled(x):
        raise RuntimeError("backend compiler failed: no C++ compiler")
    return compiled


def test_a_failing_compile_warns_and_runs_eagerly_with_the_same_outputs(monkeypatch):
    monkeypatch.setattr(torch, "compile", _failing_compile)
    net, x = conv_net(), images()
    t = LiveTeacher(copy.deepcopy(net), channels_last=False, compile=True)
    first = t(Batch(x, None, None))  # the first batch of a shape runs eagerly (checked forward)
    with pytest.warns(RuntimeWarning, match=r"torch.compile of the teacher \(Sequential\) failed.*runs eagerly"):
        second = t(Batch(x, None, None))
    want = plain_outputs(net, x).logits
    assert torch.equal(first.logits, want) and torch.equal(second.logits, want)
    assert "compile=True (failed: eager)" in repr(t)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(t(Batch(x, None, None)).logits, want)  # warned once
    t.set_taps(["2"])  # eager again: taps allowed


def test_compile_unavailable_at_construction_warns_and_runs_eagerly(monkeypatch):
    def unavailable(module, **kwargs):
        raise RuntimeError("Dynamo is not supported on this Python")
    monkeypatch.setattr(torch, "compile", unavailable)
    with pytest.warns(RuntimeWarning, match="Dynamo is not supported"):
        t = LiveTeacher(conv_net(), compile=True)
    assert t(Batch(images(), None, None)).logits.shape == (16, C)


def test_bad_inputs_on_a_compiled_teacher_raise_the_input_error_and_do_not_disable_compile(monkeypatch):
    monkeypatch.setattr(torch, "compile", lambda module, **kw: module)  # "compiles" to itself
    t = LiveTeacher(conv_net(), compile=True)
    with pytest.raises(ModelInputError, match="rejected inputs"):
        t(Batch(torch.randn(4, 3, 8, 8), None, None))
    assert t.compile_error is None


def test_compile_with_the_eager_backend_agrees_with_the_plain_forward():
    net, x = conv_net(), images()
    t = LiveTeacher(copy.deepcopy(net), compile="eager")
    want = plain_outputs(net, x).logits
    for _ in range(2):  # eager first call, then dynamo-traced
        out = t(Batch(x, None, None))
        assert_ordinary(out.logits)
        torch.testing.assert_close(out.logits, want, rtol=1e-5, atol=1e-5)
    assert t.compile_error is None


@pytest.mark.skipif(not os.environ.get("KDISTILL_TEST_COMPILE"),
                    reason="torch.compile with inductor takes over a minute on a 2-core CPU; "
                           "set KDISTILL_TEST_COMPILE=1 to run it")
def test_inductor_compile_agrees_with_the_plain_forward():
    net, x = conv_net(), images()
    t = LiveTeacher(copy.deepcopy(net), compile=True)
    want = plain_outputs(net, x).logits
    for _ in range(3):
        torch.testing.assert_close(t(Batch(x, None, None)).logits, want, rtol=1e-5, atol=1e-5)
    assert t.compile_error is None


# --------------------------------------------------------------------------- distillation
@pytest.mark.parametrize("options", [
    {"channels_last": True},
    {"channels_last": True, "autocast": "bfloat16"},
    {"channels_last": False, "compile": "eager"},
])
def test_a_distiller_trains_with_the_options_on_and_leaves_the_teacher_as_it_was(options):
    net = conv_net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x, y = images(48, seed=2), torch.randint(0, C, (48,), generator=torch.Generator().manual_seed(3))
    torch.manual_seed(5)
    student = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 64, C))
    start = copy.deepcopy(student.state_dict())
    d = kdistill.Distiller(student=student, teacher=LiveTeacher(net, **options))
    history = d.compile("adam", alpha=0.1, temperature=4).fit(x, y, epochs=1, batch_size=16, verbose=0)
    assert history is not None
    assert not torch.equal(student.state_dict()["0.weight"], start["0.weight"])  # it trained
    assert all(torch.isfinite(p).all() for p in student.parameters())
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert not any(p.requires_grad for p in net.parameters())


def test_a_feature_loss_trains_against_a_channels_last_teacher():
    net = conv_net()
    x, y = images(32, seed=2), torch.randint(0, C, (32,), generator=torch.Generator().manual_seed(3))
    torch.manual_seed(5)
    student = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.Conv2d(2, 8, 3, stride=2, padding=1),
                            nn.ReLU(), nn.Flatten(), nn.Linear(8 * 16, C))
    teacher = LiveTeacher(net, channels_last=True)
    d = kdistill.Distiller(student=student, teacher=teacher)
    d.compile("adam", alpha=0.1, temperature=4, distillation_loss_fn=HintLoss("2", "2", weight=1.0))
    d.fit(x, y, epochs=1, batch_size=16, verbose=0)
    assert all(torch.isfinite(p).all() for p in student.parameters())
    # the hint the student was pulled towards is the plain forward's, to rounding
    teacher.set_taps(["2"])
    got = teacher(Batch(x, None, None)).features["2"]
    torch.testing.assert_close(got, plain_outputs(conv_net(), x, ["2"]).features["2"], rtol=1e-5, atol=1e-5)
