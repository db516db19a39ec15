"""CheckedForward: rejected inputs are explained, each new input kind is checked once."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kdistill import ModelInputError, build_model
from kdistill.taps import CheckedForward, describe_expected_input


def test_describe_expected_input_from_input_shape_conv_and_linear():
    assert describe_expected_input(build_model("classic_student")) == "(batch, 1, 28, 28)"
    assert "3 input channels" in describe_expected_input(nn.Sequential(nn.Conv2d(3, 4, 3)))
    assert describe_expected_input(nn.Sequential(nn.Flatten(), nn.Linear(12, 2))) == "(batch, 12)"
    assert describe_expected_input(nn.Sequential(nn.ReLU())) == "the shape its first layer takes"


def test_rejected_inputs_name_role_shapes_and_fix():
    call = CheckedForward("teacher")
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 2))
    with pytest.raises(ModelInputError, match=r"the teacher \(Sequential\) rejected inputs of shape \(5, 13\).*\(batch, 12\).*Reshape"):
        call(model, torch.randn(5, 13))
    with pytest.raises(ModelInputError, match="Convert the inputs to float"):
        call(model, torch.zeros(5, 12, dtype=torch.uint8))


def test_each_new_input_kind_is_checked_and_remembered():
    call = CheckedForward()
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 2))
    assert call(model, torch.randn(4, 12)).shape == (4, 2)
    assert call(model, torch.randn(7, 3, 4)).shape == (7, 2)  # another shape that flattens to 12
    assert call.accepted == {((12,), torch.float32), ((3, 4), torch.float32)}
    with pytest.raises(ModelInputError):
        call(model, torch.randn(4, 11))


def test_outputs_that_are_not_logits_are_refused():
    call = CheckedForward("student")
    with pytest.raises(ModelInputError, match=r"returned Tensor of shape \(4,\).*\(B, C\) logits"):
        call(nn.Sequential(nn.Linear(3, 1), nn.Flatten(0)), torch.randn(4, 3))
