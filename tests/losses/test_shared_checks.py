"""The checks every loss family shares (one owner: kdistill.losses.base)."""

import pytest
import torch

from kdistill.losses import ATLoss, CRDLoss, DKDLoss, HintLoss, LogitStandardKDLoss, PKTLoss, RKDLoss, SPLoss
from kdistill.losses.base import check_weight, compute_dtype


@pytest.mark.parametrize(
    "dtype, expected",
    [
        (torch.float16, torch.float32),
        (torch.bfloat16, torch.float32),
        (torch.float32, torch.float32),
        (torch.float64, torch.float64),
        (torch.int64, torch.float32),
    ],
)
def test_compute_dtype_upcasts_half_precision_and_keeps_float64(dtype, expected):
    assert compute_dtype(torch.zeros(2, dtype=dtype)) == expected


def test_check_weight_returns_a_float_and_accepts_zero():
    assert check_weight("weight", 3) == 3.0 and isinstance(check_weight("weight", 3), float)
    assert check_weight("weight", 0) == 0.0


@pytest.mark.parametrize("bad", [-1.0, float("inf"), float("nan")])
def test_check_weight_rejects_negative_and_non_finite_values_with_the_meaning(bad):
    with pytest.raises(ValueError, match=r"alpha must be a finite number >= 0, got .*: it weights TCKD"):
        check_weight("alpha", bad, "it weights TCKD")


@pytest.mark.parametrize("bad", ["1", None, b"1", [1.0]])
def test_check_weight_rejects_non_numbers_with_a_type_error(bad):
    with pytest.raises(TypeError, match=r"weight must be a number, got .*give e\.g\. weight=1\.0"):
        check_weight("weight", bad)


@pytest.mark.parametrize(
    "make",
    [
        lambda w: HintLoss("a", "b", weight=w),
        lambda w: ATLoss("a", "b", weight=w),
        lambda w: SPLoss("a", "b", weight=w),
        lambda w: PKTLoss("a", "b", weight=w),
        lambda w: RKDLoss("a", "b", distance_weight=w),
        lambda w: CRDLoss("a", "b", 10, weight=w),
        lambda w: DKDLoss(alpha=w),
        lambda w: LogitStandardKDLoss(weight=w),
    ],
)
def test_every_loss_family_checks_its_weights_the_same_way(make):
    with pytest.raises(ValueError, match=r"(weight|alpha) must be a finite number >= 0, got -1\.0"):
        make(-1.0)
    with pytest.raises(TypeError, match=r"must be a number, got str"):
        make("1")
