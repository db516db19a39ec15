"""Several runs side by side: rows, the Markdown table, the sweep plot."""

from __future__ import annotations

import copy

import pytest
from test_html import PNG_MAGIC, example_metrics, without_scratch

from kdistill.report import compare_runs, compare_table, plot_sweep


def _run(alpha: float, temperature: float, distilled: float, losses=("kd",)) -> dict:
    m = copy.deepcopy(example_metrics())
    d = m["config"]["stages"]["distil"]
    d["alpha"], d["temperature"] = alpha, temperature
    d["losses"] = [{"name": name, "weight": 1.0} if "." not in name else {"_component_": name, "weight": 1.0}
                   for name in losses]
    m["models"]["distil"]["test_accuracy"] = distilled
    scratch, teacher = m["models"]["scratch"]["test_accuracy"], m["models"]["teacher"]["test_accuracy"]
    m["distillation_gain_points"] = 100 * (distilled - scratch)
    m["accuracy_recovered"] = (distilled - scratch) / (teacher - scratch)
    return m


def test_compare_runs_rows():
    rows = compare_runs([("T=4", _run(0.1, 4, 0.85)), ("fitnet", _run(0.5, 2, 0.84, ("kd", "fitnet"))),
                         ("own", _run(0.5, 2, 0.84, ("my_losses.Cosine",)))])
    assert [r["run"] for r in rows] == ["T=4", "fitnet", "own"]
    first = rows[0]
    assert [r["method"] for r in rows] == ["kd", "kd+fitnet", "my_losses.Cosine"]
    assert (first["alpha"], first["temperature"]) == (0.1, 4)
    assert first["teacher_accuracy"] == 0.8734 and first["scratch_accuracy"] == 0.8312
    assert first["distilled_accuracy"] == 0.85
    assert first["gain_points"] == pytest.approx(1.88)
    assert first["recovered"] == pytest.approx(0.0188 / 0.0422)
    assert first["student_parameters"] == 21_000 and first["distilled_latency_ms"] == 0.3


def test_compare_runs_without_scratch():
    (row,) = compare_runs([("no scratch", without_scratch(example_metrics()))])
    assert row["scratch_accuracy"] is None and row["gain_points"] is None and row["recovered"] is None
    assert row["distilled_accuracy"] == 0.8523


def test_compare_table_values():
    rows = compare_runs([("T=4", _run(0.1, 4, 0.85)), ("a|b", without_scratch(example_metrics()))])
    rows[0]["params"] = {"alpha": 0.1, "temperature": 4, "lr": 0.003}
    lines = compare_table(rows).splitlines()
    assert lines[0] == ("| run | method | alpha | temperature | lr | teacher | scratch | distilled | gain (points) "
                        "| recovered | student parameters | distilled latency (ms) |")
    assert len(lines) == 4 and lines[1].count("---|") == 12
    assert lines[2] == "| T=4 | kd | 0.1 | 4 | 0.003 | 87.34% | 83.12% | 85.00% | +1.88 | 44.5% | 21,000 | 0.300 |"
    assert lines[3] == "| a\\|b | kd | 0.1 | 10 | - | 87.34% | - | 85.23% | - | - | 21,000 | 0.300 |"


def test_plot_sweep_numeric_and_categorical(tmp_path):
    rows = compare_runs([(f"T={t}", _run(0.1, t, acc)) for t, acc in ((1, 0.84), (4, 0.855), (10, 0.852), (4, 0.851))])
    path = plot_sweep(rows, "temperature", tmp_path / "sweep" / "temperature.png")
    assert path.read_bytes()[:8] == PNG_MAGIC and [p.name for p in path.parent.iterdir()] == ["temperature.png"]
    # values from params take precedence, and may be categories
    for row, opt in zip(rows, ("adam", "sgd", "adamw", "sgd")):
        row["params"] = {"optimizer": opt}
    assert plot_sweep(rows, "optimizer", tmp_path / "opt.png").read_bytes()[:8] == PNG_MAGIC
    assert plot_sweep(rows, "method", tmp_path / "method.png").read_bytes()[:8] == PNG_MAGIC
    with pytest.raises(ValueError, match="no row has a value for 'lr'"):
        plot_sweep(rows, "lr", tmp_path / "lr.png")


def test_plot_sweep_without_scratch(tmp_path):
    rows = compare_runs([("a", without_scratch(example_metrics()))])
    rows[0]["params"] = {"alpha": 0.5}
    assert plot_sweep(rows, "alpha", tmp_path / "a.png").read_bytes()[:8] == PNG_MAGIC
