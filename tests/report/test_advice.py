"""The report explains a run where distillation did not help."""

import copy

from test_html import example_metrics

from kdistill.report.content import advice
from kdistill.report.html import render_html
from kdistill.report.markdown import render_markdown
from kdistill.report.numbers import headline_numbers


def _metrics(teacher: float, scratch: float, distilled: float) -> dict:
    """A run's metrics with these test accuracies, and the numbers the runner records from them."""
    m = copy.deepcopy(example_metrics())
    for name, acc in (("teacher", teacher), ("scratch", scratch), ("distil", distilled)):
        m["models"][name]["test_accuracy"] = acc
    m["distillation_gain_points"], m["accuracy_recovered"] = headline_numbers(m["models"])
    return m


def test_weak_teacher_is_named():
    text = advice(_metrics(0.870, 0.873, 0.856))
    assert "no more accurate than" in text and "stages.teacher.epochs" in text and "data.subset" in text
    assert "only slightly more accurate" in advice(_metrics(0.875, 0.870, 0.86))


def test_slow_student_is_named():
    assert "stages.distil.epochs" in advice(_metrics(0.95, 0.80, 0.79))


def test_no_advice_when_distillation_helped_or_no_baseline():
    assert advice(_metrics(0.95, 0.80, 0.90)) is None
    m = _metrics(0.95, 0.80, 0.70)
    del m["models"]["scratch"]
    m["stages"].remove("scratch")
    m["distillation_gain_points"], m["accuracy_recovered"] = headline_numbers(m["models"])
    assert advice(m) is None


def test_advice_is_in_both_reports():
    m = _metrics(0.870, 0.873, 0.856)
    assert "Why no gain here" in render_markdown(m, {})
    assert "Why no gain here" in render_html(m, {})
    assert "Why no gain here" not in render_markdown(_metrics(0.95, 0.80, 0.90), {})


def test_an_undefined_accuracy_recovered_is_explained():
    m = _metrics(0.870, 0.873, 0.856)  # teacher below scratch: no gap to recover
    assert m["accuracy_recovered"] is None
    for page in (render_markdown(m, {}), render_html(m, {})):
        assert "accuracy recovered: the teacher is no more accurate than the scratch student" in page
        assert "-1.70 points" in page


def test_the_report_shows_the_recorded_numbers():
    m = _metrics(0.95, 0.80, 0.90)
    m["distillation_gain_points"], m["accuracy_recovered"] = 12.34, 0.4321
    text = render_markdown(m, {})
    assert "**+12.34 points**" in text and "**43.2%**" in text
