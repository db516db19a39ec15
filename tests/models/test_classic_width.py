"""classic_student(width=...): filter counts, parameter counts, shapes, bad widths."""

from __future__ import annotations

import math

import pytest
import torch

from kdistill.models import build_model, classic_student, classic_teacher


def _params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _keras_count(a: int, b: int, in_channels: int = 1, side: int = 7, num_classes: int = 10) -> int:
    # conv1 (3x3) + conv2 (3x3) + dense over the (b, 7, 7) map, each with its bias
    return (in_channels * a * 9 + a) + (a * b * 9 + b) + (b * side * side * num_classes + num_classes)


@pytest.mark.parametrize(
    "width,filters,count",
    [(1, (16, 32), 20_490), (2, (32, 64), 50_186), (4, (64, 128), 137_226),
     (8, (128, 256), 421_898), (16, (256, 512), 1_433_610)],
)
def test_width_scales_filters_and_parameters(width, filters, count):
    model = classic_student(width=width)
    convs = [m for m in model if isinstance(m, torch.nn.Conv2d)]
    assert tuple(c.out_channels for c in convs) == filters
    assert _params(model) == _keras_count(*filters) == count


def test_default_width_is_the_keras_student_unchanged():
    torch.manual_seed(0)
    default = build_model("classic_student")
    torch.manual_seed(0)
    explicit = build_model("classic_student", width=1.0)
    assert [tuple(p.shape) for p in default.parameters()] == [tuple(p.shape) for p in explicit.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(default.state_dict().values(), explicit.state_dict().values()))
    assert str(default) == str(explicit)


def test_width_16_is_the_teachers_architecture():
    student, teacher = classic_student(width=16), classic_teacher()
    assert _params(student) == _params(teacher)
    assert [tuple(p.shape) for p in student.parameters()] == [tuple(p.shape) for p in teacher.parameters()]
    assert str(student) == str(teacher)


@pytest.mark.parametrize("width", [0.5, 1.5, 3])
@pytest.mark.parametrize("num_classes,in_channels,input_size", [(10, 1, 28), (3, 3, 32)])
def test_output_shape(width, num_classes, in_channels, input_size):
    model = build_model("classic_student", num_classes=num_classes, in_channels=in_channels,
                        input_size=input_size, width=width)
    out = model(torch.randn(2, in_channels, input_size, input_size))
    assert out.shape == (2, num_classes)
    assert torch.isfinite(out).all()


def test_fractional_width_rounds_filters():
    convs = [m for m in classic_student(width=1.5) if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [24, 48]


@pytest.mark.parametrize("width", [0, -1, -0.5, math.inf, math.nan])
def test_bad_width_is_refused_with_the_value_named(width):
    with pytest.raises(ValueError, match=r"width must be a finite number > 0.*got " + str(width).replace("-", r"\-")):
        classic_student(width=width)


def test_width_too_small_for_one_filter_is_refused():
    with pytest.raises(ValueError, match=r"width=0.01 gives filters \(0, 0\).*width > 1/32"):
        classic_student(width=0.01)


@pytest.mark.parametrize("width", ["2", None, True])
def test_width_of_another_type_is_refused(width):
    with pytest.raises(TypeError, match="width must be a number"):
        classic_student(width=width)
