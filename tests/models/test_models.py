"""Model builders: output shapes, Keras parameter counts, 'same' pooling, names."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kdistill.models import MODELS, build_model


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("num_classes,in_channels,input_size", [(10, 1, 28), (3, 3, 32), (10, 1, 8)])
def test_every_model_maps_images_to_logits(name, num_classes, in_channels, input_size):
    kwargs = {"filters": (4, 8)} if name == "classic_cnn" else {}
    model = build_model(name, num_classes=num_classes, in_channels=in_channels, input_size=input_size, **kwargs)
    assert model.kdistill_name == name
    x = torch.randn(2, in_channels, input_size, input_size)
    out = model(x)
    assert out.shape == (2, num_classes)
    assert torch.isfinite(out).all()


def _keras_count(a: int, b: int, in_channels: int = 1, side: int = 7, num_classes: int = 10) -> int:
    conv1 = in_channels * a * 3 * 3 + a
    conv2 = a * b * 3 * 3 + b
    dense = b * side * side * num_classes + num_classes
    return conv1 + conv2 + dense


def test_classic_parameter_counts_match_keras_example():
    teacher = build_model("classic_teacher")
    student = build_model("classic_student")
    n_t = sum(p.numel() for p in teacher.parameters())
    n_s = sum(p.numel() for p in student.parameters())
    assert n_t == _keras_count(256, 512) == 1_433_610
    assert n_s == _keras_count(16, 32) == 20_490


def test_same_maxpool_keeps_size_and_ignores_padding():
    model = build_model("classic_student", input_size=28)
    pad, pool = model[2], model[3]
    x = -torch.rand(2, 16, 14, 14) - 1.0  # all negative: a zero pad would win the max
    y = pool(pad(x))
    assert y.shape == x.shape
    assert (y < 0).all()
    # the bottom-right output only sees the bottom-right input
    assert torch.equal(y[:, :, -1, -1], x[:, :, -1, -1])
    # an interior output is the max of its 2x2 window
    assert torch.equal(y[:, :, 3, 5], x[:, :, 3:5, 5:7].amax(dim=(-1, -2)))


def test_same_maxpool_odd_size():
    model = build_model("classic_student", input_size=13)
    x = -torch.rand(1, 16, 7, 7) - 1.0
    assert model[3](model[2](x)).shape == (1, 16, 7, 7)
    assert model(torch.randn(1, 1, 13, 13)).shape == (1, 10)


def test_mlp_vector_inputs_and_hidden_sizes():
    model = build_model("mlp", num_classes=4, in_features=5, hidden=(6,))
    assert model(torch.randn(3, 5)).shape == (3, 4)
    assert model.input_shape == (5,)
    assert sum(p.numel() for p in model.parameters()) == (5 * 6 + 6) + (6 * 4 + 4)
    with pytest.raises(ValueError, match="dropout"):
        build_model("mlp", dropout=1.0)


def test_unknown_model_name_suggests():
    with pytest.raises(ValueError, match=r"unknown model 'classic_studnet'.*Did you mean 'classic_student'") as e:
        build_model("classic_studnet")
    assert "classic_teacher" in str(e.value)


def test_bad_num_classes():
    with pytest.raises(ValueError, match="num_classes must be >= 1, got 0"):
        build_model("classic_student", num_classes=0)


def test_input_shape_recorded():
    m = build_model("classic_teacher", in_channels=3, input_size=32)
    assert m.input_shape == (3, 32, 32)
    assert isinstance(m, nn.Module)
