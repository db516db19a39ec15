"""The CIFAR model zoo (CRD/RepDistiller architectures): shapes, parameter counts, taps."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kdistill.models import MODELS, build_model, cifar_resnet, mobilenetv2, shufflenetv2, wide_resnet
from kdistill.models.vgg import cifar_vgg

# Parameter counts at 100 classes, in millions, as published with the CRD benchmark
# (Tian et al. 2020) and the papers that reuse its models; checked against RepDistiller's
# models/*.py, whose layer-by-layer structure these builders follow.
PUBLISHED_M = {
    "resnet8x4": 1.23,
    "resnet32x4": 7.43,
    "resnet20": 0.28,
    "resnet56": 0.86,
    "wrn_16_2": 0.70,
    "wrn_40_1": 0.57,
    "wrn_40_2": 2.25,
    "vgg8": 3.96,
    "vgg13": 9.46,
    "mobilenetv2": 0.81,
    "shufflenetv2": 1.36,
}
ZOO = sorted(PUBLISHED_M)

# (C, H, W) of each documented stage output for a (B, 3, 32, 32) input, and the width D
# of the penultimate (B, D) feature.
STAGE_SHAPES_32 = {
    "resnet20": ([(16, 32, 32), (32, 16, 16), (64, 8, 8)], 64),
    "resnet56": ([(16, 32, 32), (32, 16, 16), (64, 8, 8)], 64),
    "resnet8x4": ([(64, 32, 32), (128, 16, 16), (256, 8, 8)], 256),
    "resnet32x4": ([(64, 32, 32), (128, 16, 16), (256, 8, 8)], 256),
    "wrn_16_2": ([(32, 32, 32), (64, 16, 16), (128, 8, 8)], 128),
    "wrn_40_1": ([(16, 32, 32), (32, 16, 16), (64, 8, 8)], 64),
    "wrn_40_2": ([(32, 32, 32), (64, 16, 16), (128, 8, 8)], 128),
    "vgg8": ([(128, 16, 16), (256, 8, 8), (512, 4, 4), (512, 4, 4)], 512),
    "vgg13": ([(128, 16, 16), (256, 8, 8), (512, 4, 4), (512, 4, 4)], 512),
    "mobilenetv2": ([(12, 16, 16), (16, 8, 8), (48, 4, 4), (160, 2, 2)], 1280),
    "shufflenetv2": ([(116, 16, 16), (232, 8, 8), (464, 4, 4)], 1024),
}


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_zoo_is_registered():
    assert set(ZOO) <= set(MODELS)
    assert set(STAGE_SHAPES_32) == set(ZOO)


@pytest.mark.parametrize("name", ZOO)
@pytest.mark.parametrize(
    "num_classes,in_channels,input_size",
    [(100, 3, 32), (10, 1, 28), (10, 3, 16)],
    ids=["rgb32-100", "gray28-10", "rgb16-10"],
)
def test_builds_and_maps_images_to_logits(name, num_classes, in_channels, input_size):
    model = build_model(name, num_classes=num_classes, in_channels=in_channels, input_size=input_size).eval()
    assert model.kdistill_name == name
    assert model.input_shape == (in_channels, input_size, input_size)
    with torch.no_grad():
        out = model(torch.randn(2, in_channels, input_size, input_size))
    assert out.shape == (2, num_classes)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", ZOO)
def test_parameter_counts_match_published(name):
    n = _count(build_model(name, num_classes=100, in_channels=3, input_size=32))
    # published to two decimals: allow one unit of the last digit
    assert abs(n / 1e6 - PUBLISHED_M[name]) <= 0.01, f"{name}: {n:,} parameters, published {PUBLISHED_M[name]}M"


def test_resnet20_count_from_its_layers():
    # counted by hand: 3x3 convs without bias, BN (2 per channel), 1x1 projection
    # shortcuts with BN at the two stage changes, linear classifier with bias
    def conv(i, o, k=3):
        return i * o * k * k

    def bn(c):
        return 2 * c

    stem = conv(3, 16) + bn(16)
    stage = lambda i, o, n: conv(i, o) + bn(o) + conv(o, o) + bn(o) + (n - 1) * 2 * (conv(o, o) + bn(o))  # noqa: E731
    shortcuts = conv(16, 32, 1) + bn(32) + conv(32, 64, 1) + bn(64)
    expected = stem + stage(16, 16, 3) + stage(16, 32, 3) + stage(32, 64, 3) + shortcuts + 64 * 10 + 10
    assert expected == 272_474  # ResNet-20 with projection shortcuts, 10 classes
    assert _count(build_model("resnet20", num_classes=10, in_channels=3, input_size=32)) == expected


@pytest.mark.parametrize("name", ZOO)
def test_documented_taps_exist_and_have_expected_shapes(name):
    model = build_model(name, num_classes=100, in_channels=3, input_size=32).eval()
    modules = dict(model.named_modules())
    paths = [*model.feature_layers, model.penultimate_layer]
    for path in paths:
        assert path in modules, f"{name}: documented tap {path!r} is not a module path"
    assert "fc" in modules and isinstance(modules["fc"], nn.Linear)

    seen, copies = {}, {}

    def hook(path):
        def fn(_module, _inputs, output):
            seen[path] = output
            copies[path] = output.detach().clone()

        return fn

    handles = [modules[p].register_forward_hook(hook(p)) for p in paths]
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
    for h in handles:
        h.remove()

    stage_shapes, dim = STAGE_SHAPES_32[name]
    assert [tuple(seen[p].shape) for p in model.feature_layers] == [(2, *s) for s in stage_shapes]
    assert seen[model.penultimate_layer].shape == (2, dim) == (2, modules["fc"].in_features)
    # no later in-place op overwrote a tapped feature
    for p in paths:
        assert torch.equal(seen[p], copies[p]), f"{name}: tap {p!r} was modified in place"


def test_training_step_reaches_every_parameter():
    model = build_model("resnet8x4", num_classes=10, in_channels=1, input_size=28).train()
    loss = nn.functional.cross_entropy(model(torch.randn(4, 1, 28, 28)), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: cifar_resnet(9, (16, 16, 32, 64)), "depth must be 6n \\+ 2"),
        (lambda: cifar_resnet(20, (16, 32, 64)), "widths must be 4"),
        (lambda: wide_resnet(15, 2), "depth must be 6n \\+ 4"),
        (lambda: wide_resnet(16, 0), "widen_factor must be"),
        (lambda: wide_resnet(16, 2, dropout=1.0), "dropout must be in"),
        (lambda: cifar_vgg(((64,), (128,))), "5 non-empty"),
        (lambda: mobilenetv2(width_mult=0), "width_mult must be > 0"),
        (lambda: shufflenetv2(net_size=3), "net_size must be one of"),
        (lambda: build_model("resnet20", in_channels=0), "in_channels must be an integer >= 1, got 0"),
    ],
)
def test_bad_arguments_are_named(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_unknown_zoo_name_suggests_close_ones():
    with pytest.raises(ValueError, match="resnet8x4"):
        build_model("resnet8x3")
