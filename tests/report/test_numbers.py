"""The headline numbers: distillation gain and accuracy recovered, computed in one place."""

import pytest

from kdistill.run import measure
from kdistill.report import numbers


def _models(**accuracies: float) -> dict:
    return {name: {"test_accuracy": acc, "parameters": 10} for name, acc in accuracies.items()}


def test_gain_and_recovered_fraction_of_the_gap():
    gain, recovered = numbers.headline_numbers(_models(teacher=0.95, scratch=0.80, distil=0.90))
    assert gain == pytest.approx(10.0)
    assert recovered == pytest.approx((0.90 - 0.80) / (0.95 - 0.80))
    # beyond the teacher: more than the whole gap; below scratch: negative
    assert numbers.headline_numbers(_models(teacher=0.9, scratch=0.8, distil=0.95))[1] == pytest.approx(1.5)
    assert numbers.headline_numbers(_models(teacher=0.9, scratch=0.8, distil=0.75))[1] == pytest.approx(-0.5)


@pytest.mark.parametrize("teacher", [0.80, 0.78])
def test_recovered_is_undefined_without_a_gap(teacher):
    gain, recovered = numbers.headline_numbers(_models(teacher=teacher, scratch=0.80, distil=0.85))
    assert gain == pytest.approx(5.0) and recovered is None


def test_no_scratch_student_gives_no_numbers():
    assert numbers.headline_numbers(_models(teacher=0.9, distil=0.85)) == (None, None)
    assert numbers.headline_numbers(_models(teacher=0.9, assistant=0.88, distil=0.85)) == (None, None)


def test_the_runner_records_these_numbers(tmp_path):
    import json

    assert measure.headline_numbers is numbers.headline_numbers
    models = _models(teacher=0.870, scratch=0.873, distil=0.856)
    stale = {"models": models, "distillation_gain_points": 0.0, "accuracy_recovered": 6.69}
    fixed = measure.refresh_metrics(tmp_path, stale)
    assert fixed["distillation_gain_points"] == pytest.approx(-1.7) and fixed["accuracy_recovered"] is None
    assert json.loads((tmp_path / "metrics.json").read_text())["accuracy_recovered"] is None
