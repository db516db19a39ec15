"""Mistakes found before any training: the run stops in a second with a message that
names the stage, the value and the fix, and no stage has trained."""

from __future__ import annotations

import json

import numpy as np
import pytest

from experiment_configs import tiny_config
from kdistill.config import validate_config
from kdistill.errors import ConfigError, RunDirectoryError
from kdistill.experiment import run_experiment

pytest.importorskip("sklearn")


def _run(raw, **kw):
    return run_experiment(validate_config(raw), verbose=0, log=lambda m: None, **kw)


def _nothing_trained(out):
    assert json.loads((out / "run.json").read_text())["status"] == "failed before training"
    assert not any((out / "stages").glob("*/done.json")) and not any((out / "stages").glob("*/last.pt"))


@pytest.mark.parametrize("change, message", [
    # a tapped layer that does not exist: listed with the layers that do
    ({"stages": {"distil": {"losses": [{"name": "fitnets", "student_layer": "nope", "teacher_layer": "net.0"}]}}},
     r"stages.distil: .*nope"),
    # a student that scores another number of classes than the teacher
    ({"student": {"_component_": "user_components.seven_class_mlp"}}, r"stages.distil: .*7 classes.*num_classes=10"),
    # a loss's own setting out of range
    ({"stages": {"distil": {"losses": [{"name": "kd", "temperature": 0.0}]}}}, r"stages.distil: .*temperature"),
    # the assistant's architecture scoring other classes
    ({"stages": {"assistant": {"model": {"_component_": "user_components.seven_class_mlp"}}}},
     r"stages.assistant: .*7 classes"),
])
def test_mistakes_are_found_before_the_teacher_trains(tmp_path, change, message):
    out = tmp_path / "r"
    raw = tiny_config(out, **{k: v for k, v in change.items() if k != "stages"})
    for stage, settings in change.get("stages", {}).items():
        raw["stages"][stage] = {**raw["stages"].get(stage, {}), **settings}
    with pytest.raises(ConfigError, match=message) as e:
        _run(raw)
    assert "found before any training" in str(e.value) or "classes" in str(e.value)
    _nothing_trained(out)


def test_labels_outside_the_classes_are_refused_before_training(tmp_path):
    out = tmp_path / "r"
    raw = tiny_config(out, data={"reader": {"_component_": "user_components.synthetic_splits", "n_train": 60}})
    raw["data"].pop("dataset")
    import user_components

    real = user_components.synthetic_splits

    def bad_labels(**kw):
        d = real(**kw)
        d.y_train[3] = 7  # the splits declare 3 classes
        return d

    user_components.bad_label_splits = bad_labels
    raw["data"]["reader"] = {"_component_": "user_components.bad_label_splits", "n_train": 60}
    with pytest.raises(ConfigError, match=r"a training label is 7, outside the 3 classes 0..2"):
        _run(raw)
    _nothing_trained(out)


def test_a_damaged_bookkeeping_file_is_named(tmp_path):
    out = tmp_path / "r"
    raw = tiny_config(out)
    _run(raw)
    (out / "run.json").write_text('{"status": "runn')
    with pytest.raises(RunDirectoryError, match=r"run.json is damaged and cannot be read.*--force"):
        _run(raw)
    # a damaged done.json: that stage trains again, the run finishes
    (out / "run.json").write_text(json.dumps({"status": "running"}))
    assert _run(raw, force=True)["models"]
    (out / "stages" / "scratch" / "done.json").write_text("{")
    data = json.loads((out / "run.json").read_text())
    (out / "run.json").write_text(json.dumps({**data, "status": "running"}))
    logs: list[str] = []
    m = run_experiment(validate_config(raw), verbose=0, log=logs.append)
    assert any("[scratch] cannot reuse the finished stage" in line and "damaged" in line for line in logs)
    assert np.isfinite(m["models"]["scratch"]["test_accuracy"])


def test_after_a_refused_config_the_corrected_one_runs_in_the_same_directory(tmp_path):
    out = tmp_path / "r"
    bad = tiny_config(out)
    bad["stages"]["distil"]["losses"] = [{"name": "kd", "temperature": 0.0}]
    with pytest.raises(ConfigError):
        _run(bad)
    m = _run(tiny_config(out))  # no --force needed: nothing had trained
    assert json.loads((out / "run.json").read_text())["status"] == "finished" and m["models"]["distil"]


def test_a_diverged_run_finishes_with_a_warning_in_the_log_and_the_report(tmp_path):
    out = tmp_path / "r"
    raw = tiny_config(out)
    raw["stages"]["scratch"]["optimizer"] = {"name": "adam", "lr": 1.0e6}
    logs: list[str] = []
    m = run_experiment(validate_config(raw), verbose=0, log=logs.append)
    assert any(w.startswith("scratch is at chance accuracy") or "scratch stage's training loss" in w
               for w in m["warnings"]), m["warnings"]
    assert not any(w.startswith("teacher") or "teacher stage" in w for w in m["warnings"])
    assert any(line.startswith("warning: ") for line in logs)
    assert "**Warning:**" in (out / "report.md").read_text() and "Warning:" in (out / "report.html").read_text()


def test_training_warnings_read_the_numbers():
    from kdistill.run.measure import training_warnings

    ok = {"dataset": {"num_classes": 10}, "models": {"distil": {"test_accuracy": 0.9}},
          "histories": {"distil": {"history": {"loss": [1.0, 0.5]}}}}
    assert training_warnings(ok) == []
    bad = {"dataset": {"num_classes": 10}, "models": {"distil": {"test_accuracy": 0.1}},
           "histories": {"distil": {"history": {"loss": [1.0, 50.0]}}}}
    w = training_warnings(bad)
    assert len(w) == 2 and "chance accuracy (10.00% with 10 classes)" in w[0] and "more than 10x" in w[1]


def test_a_reader_with_images_and_labels_of_different_lengths_is_named(tmp_path):
    raw = tiny_config(tmp_path / "r", data={"reader": {"_component_": "user_components.uneven_splits"}})
    raw["data"].pop("dataset")
    with pytest.raises(ConfigError, match=r"data.reader user_components.uneven_splits: uneven: x_train has 10 "
                                          r"samples but y_train has 9"):
        _run(raw)
