"""A YAML run with an ensemble of teachers: each member in its own teacher stage, the
distil stage learning from their combination (and a feature loss from one member), the
report naming every teacher; a run interrupted in the middle of the second member's stage
resumes and ends bit-identical to an uninterrupted run; single-teacher configs keep their
fingerprints; bad ensemble configs are refused."""

from __future__ import annotations

import json

import pytest
import torch
from crashing import Crash
from experiment_configs import tiny_config, write_config

from kdistill.config import load_config
from kdistill.experiment import load_stage_model, run_experiment
from kdistill.run.fingerprints import config_fingerprint

ENSEMBLE = {
    "combine": "mean_probs",
    "teachers": [
        {"name": "mlp", "hidden": [64], "tag": "wide"},
        {"name": "mlp", "hidden": [32, 32], "epochs": 2},
    ],
}
LOSSES = [{"name": "kd"}, {"name": "hint", "student_layer": "2", "teacher_layer": "t1/2", "weight": 0.01}]


def _raw(out, **extra):
    raw = tiny_config(out, **extra)
    raw.pop("teacher")
    raw["ensemble"] = ENSEMBLE
    raw["stages"]["distil"]["losses"] = LOSSES
    return raw


def _run(tmp_path, name, raw):
    cfg = load_config(write_config(tmp_path / f"{name}.yaml", raw))
    return run_experiment(cfg, verbose=0, log=lambda m: None)


def test_an_ensemble_run_trains_each_member_and_reports_every_teacher(tmp_path):
    out = tmp_path / "run"
    metrics = _run(tmp_path, "ens", _raw(out))
    stages = metrics["stages"]
    assert stages == ["teacher-wide", "teacher-t1", "teacher", "scratch", "distil"]
    for s in ("teacher-wide", "teacher-t1", "scratch", "distil"):
        assert (out / "stages" / s / "done.json").is_file() or s == "teacher"
    assert not (out / "stages" / "teacher").exists()  # the ensemble is its members' stages
    # members from their own seeds (the run's seed + position) and epochs
    cfg = load_config(out / "config.yaml")
    assert [(m.tag, m.seed, m.epochs) for m in cfg.ensemble.teachers] == [("wide", 0, 3), ("t1", 1, 2)]
    hist = json.loads((out / "stages" / "teacher-t1" / "done.json").read_text())["history"]
    assert len(hist["epoch"]) == 2
    # accuracy of each teacher, the ensemble's, the student's; agreement with each
    models = metrics["models"]
    for k in ("teacher-wide", "teacher-t1", "teacher"):
        assert 0.5 < models[k]["test_accuracy"] <= 1.0, k
    assert models["distil"]["test_accuracy"] > 0.15  # a tiny student, two epochs: above chance (0.1)
    assert models["teacher"]["parameters"] == models["teacher-wide"]["parameters"] + models["teacher-t1"]["parameters"]
    ens = metrics["ensemble"]
    assert ens["combine"] == "mean_probs" and ens["temperature"] == 4.0
    assert set(ens["agreement"]) == {"wide", "t1"}
    assert 0 <= ens["agreement"]["t1"]["distil"] <= 1 and "teacher-t1" not in ens["agreement"]["t1"]
    assert 0 <= metrics["agreement"]["distil"] <= 1  # with the ensemble
    report = (out / "report.md").read_text()
    assert "Teachers (an ensemble, mean_probs at T=4)" in report
    assert "| teacher wide |" in report and "| teacher t1 |" in report and "| ensemble (teacher) |" in report
    assert "agreement of the distilled student with teacher t1" in report
    # the members reload from the run directory
    member = load_stage_model(out, "teacher-t1")
    assert member[1].out_features == 32
    ensemble = load_stage_model(out, "teacher")
    x = torch.randn(3, 1, 8, 8)
    assert ensemble(x).shape == (3, 10)


def test_a_run_interrupted_in_the_second_members_stage_resumes_to_the_uninterrupted_result(tmp_path):
    clean = _run(tmp_path, "clean", _raw(tmp_path / "clean"))
    flag = tmp_path / "crash.flag"
    flag.write_text("")
    crash = [{"_component_": "crashing.CrashInStage", "n": 30, "stage": "{stage}", "only": "teacher-t1",
              "flag": str(flag)}]
    raw = _raw(tmp_path / "crashed", callbacks=crash, checkpoint={"every_steps": 4, "every_seconds": None})
    with pytest.raises(Crash):
        _run(tmp_path, "crashed", raw)
    sdir = tmp_path / "crashed" / "stages"
    assert (sdir / "teacher-wide" / "done.json").is_file()
    assert (sdir / "teacher-t1" / "last.pt").is_file() and not (sdir / "teacher-t1" / "done.json").is_file()
    resumed = _run(tmp_path, "crashed", raw)  # the flag is gone: the same config resumes to the end
    log = (tmp_path / "crashed" / "run.log").read_text()
    assert "[teacher-t1] resuming from epoch" in log and "finished earlier in this run directory" in log
    for k in ("teacher-wide", "teacher-t1", "teacher", "scratch", "distil"):
        assert resumed["models"][k]["test_accuracy"] == clean["models"][k]["test_accuracy"], k
    assert resumed["fingerprints"] == clean["fingerprints"]
    a = load_stage_model(tmp_path / "clean", "distil").state_dict()
    b = load_stage_model(tmp_path / "crashed", "distil").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_single_teacher_configs_keep_their_fingerprint():
    from kdistill.cli.classic import shipped_config

    cfg = load_config(shipped_config())
    assert cfg.ensemble is None
    assert config_fingerprint(cfg) == "94135c8ab40f3b10"


def test_the_example_config_loads():
    from pathlib import Path

    import kdistill

    path = Path(kdistill.__file__).parent / "configs" / "fashion_mnist" / "ensemble" / "three_teachers.yaml"
    cfg = load_config(path)
    assert [m.tag for m in cfg.ensemble.teachers] == ["cnn", "cnn_narrow", "mlp"]


@pytest.mark.parametrize("change, message", [
    (lambda r: r.__setitem__("teacher", {"name": "mlp"}), "give either teacher .* or ensemble.teachers"),
    (lambda r: r["ensemble"].__setitem__("weights", [1.0]), "ensemble.weights has 1 values for 2 teachers"),
    (lambda r: r["ensemble"].__setitem__("combine", "max"), "combine"),
    (lambda r: r["ensemble"]["teachers"][0].__setitem__("tag", "t1"), "tags must be distinct"),
    (lambda r: r["ensemble"].__setitem__("teachers", r["ensemble"]["teachers"][:1]), "at least 2"),
    (lambda r: r["stages"]["distil"].__setitem__("teacher_cache", True), "teacher_cache with ensemble"),
    (lambda r: r["ensemble"]["teachers"][1].__setitem__("epochs", 0), r"\(t1\) has epochs 0 .* but no checkpoint"),
])
def test_bad_ensemble_configs_are_refused(tmp_path, change, message):
    import copy

    raw = copy.deepcopy(_raw(tmp_path / "x"))
    change(raw)
    with pytest.raises(Exception, match=message):
        load_config(write_config(tmp_path / "bad.yaml", raw))


def test_an_unprefixed_teacher_tap_is_refused_before_training(tmp_path):
    raw = _raw(tmp_path / "run")
    raw["stages"]["distil"]["losses"] = [{"name": "hint", "student_layer": "2", "teacher_layer": "2"}]
    with pytest.raises(Exception, match=r"stages.distil: teacher layer '2': the teacher is an ensemble.*"
                                        r"\['wide', 't1'\]"):
        _run(tmp_path, "bad", raw)
    assert not (tmp_path / "run" / "stages" / "teacher-wide").exists()
