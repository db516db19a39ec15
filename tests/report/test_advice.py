"""The report explains a run where distillation did not help."""

from kdistill.report.html import advice, render_html, render_markdown


def _metrics(teacher: float, scratch: float, distilled: float) -> dict:
    row = dict(parameters=1000, size_bytes=4000, latency_ms=1.0, latency_p90_ms=1.2, latency_batch=1,
               throughput=100.0, throughput_batch=256, train_seconds=1.0)
    models = {name: {**row, "test_accuracy": acc} for name, acc in
              (("teacher", teacher), ("scratch", scratch), ("distil", distilled))}
    return {"name": "x", "models": models, "stages": list(models), "distillation_gain_points": 100 * (distilled - scratch)}


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
    m["distillation_gain_points"] = None
    assert advice(m) is None


def test_advice_is_in_both_reports():
    m = _metrics(0.870, 0.873, 0.856)
    assert "Why no gain here" in render_markdown(m, {})
    assert "Why no gain here" in render_html(m, {})
    assert "Why no gain here" not in render_markdown(_metrics(0.95, 0.80, 0.90), {})


def test_accuracy_recovered_is_undefined_without_a_gap_to_recover(tmp_path):
    import json

    from kdistill.experiment import headline_numbers, refresh_metrics
    from kdistill.report.html import _recovered

    m = _metrics(0.870, 0.873, 0.856)  # teacher below scratch: no gap
    gain, recovered = headline_numbers(m["models"])
    assert gain == 100 * (0.856 - 0.873) and recovered is None
    assert _recovered(m) is None
    assert "teacher is no more accurate than the scratch student" in render_markdown(m, {})
    assert headline_numbers(_metrics(0.95, 0.80, 0.90)["models"])[1] == (0.90 - 0.80) / (0.95 - 0.80)
    # metrics written by the older definition are corrected by `kdistill report`
    stale = {**m, "accuracy_recovered": 6.69}
    (tmp_path / "metrics.json").write_text(json.dumps(stale))
    fixed = refresh_metrics(tmp_path, stale)
    assert fixed["accuracy_recovered"] is None
    assert json.loads((tmp_path / "metrics.json").read_text())["accuracy_recovered"] is None
