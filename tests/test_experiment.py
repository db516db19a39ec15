"""The experiment runner: run directory, metrics, reuse, refusal to overwrite, stage store."""

from __future__ import annotations

import json

import pytest
import torch

from experiment_configs import tiny_config
from kdistill.checkpoint import save_checkpoint
from kdistill.config import validate_config
from kdistill.errors import RunDirectoryError
from kdistill.experiment import load_stage_model, run_experiment

pytest.importorskip("sklearn")


def _run(raw, logs=None, **kw):
    config = validate_config(raw)
    return run_experiment(config, verbose=0, log=(logs.append if logs is not None else lambda m: None), **kw)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "tiny"
    raw = tiny_config(out)
    return out, raw, _run(raw)


def test_run_directory_layout(finished):
    out, _, _ = finished
    for name in ("config.yaml", "run.json", "run.log", "metrics.json", "report.md", "report.html",
                 "figures/curves.png", "figures/confusion.png", "figures/accuracy.png"):
        assert (out / name).is_file(), name
    for stage in ("teacher", "scratch", "distil"):
        for name in ("checkpoint.pt", "last.pt", "history.jsonl", "done.json", "stage.json"):
            assert (out / "stages" / stage / name).is_file(), f"{stage}/{name}"
    assert json.loads((out / "run.json").read_text())["status"] == "finished"
    assert "[distil] training" in (out / "run.log").read_text()
    lines = (out / "stages" / "distil" / "history.jsonl").read_text().strip().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [0, 1]
    assert {"student_loss", "distillation_loss", "val_accuracy"} <= set(json.loads(lines[-1]))


def test_metrics_are_consistent(finished):
    out, _, metrics = finished
    models = metrics["models"]
    assert set(models) == {"teacher", "scratch", "distil"} == set(metrics["stages"])
    acc = {k: v["test_accuracy"] for k, v in models.items()}
    # the final-epoch validation accuracy of each stage is the reported test accuracy
    for stage in acc:
        assert metrics["histories"][stage]["history"]["val_accuracy"][-1] == pytest.approx(acc[stage], abs=1e-6)
    assert metrics["distillation_gain_points"] == pytest.approx(100 * (acc["distil"] - acc["scratch"]))
    assert metrics["accuracy_recovered"] == pytest.approx((acc["distil"] - acc["scratch"]) / (acc["teacher"] - acc["scratch"]))
    cm = torch.tensor(metrics["confusion_matrix"])
    assert cm.shape == (10, 10) and int(cm.sum()) == metrics["dataset"]["test"]
    assert float(cm.diag().sum()) / float(cm.sum()) == pytest.approx(acc["distil"], abs=1e-6)
    assert 0.0 <= metrics["agreement"]["distil"] <= 1.0
    assert models["teacher"]["parameters"] > models["distil"]["parameters"] == models["scratch"]["parameters"]
    assert json.loads((out / "metrics.json").read_text()) == json.loads(json.dumps(metrics))


def test_saved_student_reloads_with_the_same_accuracy(finished):
    out, _, metrics = finished
    from kdistill.data import load_dataset

    data = load_dataset("digits")
    model = load_stage_model(out, "distil", data=data)
    with torch.inference_mode():
        pred = model(torch.from_numpy(data.x_test)).argmax(-1)
    acc = float((pred == torch.from_numpy(data.y_test)).float().mean())
    assert acc == pytest.approx(metrics["models"]["distil"]["test_accuracy"], abs=1e-6)


def test_rerunning_a_finished_run_does_nothing(finished):
    out, raw, metrics = finished
    before = (out / "stages" / "distil" / "checkpoint.pt").stat().st_mtime_ns
    logs: list[str] = []
    again = _run(raw, logs)
    assert again["models"] == json.loads(json.dumps(metrics["models"]))
    assert any("nothing to do" in m for m in logs)
    assert (out / "stages" / "distil" / "checkpoint.pt").stat().st_mtime_ns == before


def test_a_different_config_never_overwrites_a_finished_run(finished):
    out, raw, _ = finished
    changed = tiny_config(out, stages={**raw["stages"], "distil": {**raw["stages"]["distil"], "alpha": 0.9}})
    with pytest.raises(RunDirectoryError, match="--force"):
        _run(changed)
    assert json.loads((out / "metrics.json").read_text())["config"]["stages"]["distil"]["alpha"] == 0.3


def test_force_replaces_and_a_non_run_folder_is_refused(tmp_path):
    (tmp_path / "stuff").mkdir()
    (tmp_path / "stuff" / "notes.txt").write_text("mine")
    with pytest.raises(RunDirectoryError, match="not a kdistill run directory"):
        _run(tiny_config(tmp_path / "stuff"))
    assert (tmp_path / "stuff" / "notes.txt").read_text() == "mine"


def test_stage_store_shares_the_teacher_and_scratch_across_runs(tmp_path):
    store = tmp_path / "store"
    first = tiny_config(tmp_path / "a", teacher_store=str(store), stages={
        **tiny_config(tmp_path)["stages"], "teacher": {"epochs": 1}, "scratch": {"epochs": 1}, "distil": {"epochs": 1}})
    m1 = _run(first)
    second = {**first, "output_dir": str(tmp_path / "b")}
    second["stages"] = {**first["stages"], "distil": {"epochs": 1, "temperature": 2.0}}
    logs: list[str] = []
    m2 = _run(second, logs)
    assert any("[teacher] reusing the teacher trained by" in m for m in logs)
    assert any("[scratch] reusing" in m for m in logs)
    assert m2["models"]["teacher"]["test_accuracy"] == m1["models"]["teacher"]["test_accuracy"]
    assert m2["models"]["teacher"]["reused"] == str(tmp_path / "a")
    assert m2["fingerprints"]["teacher"] == m1["fingerprints"]["teacher"]
    assert m2["fingerprints"]["distil"] != m1["fingerprints"]["distil"]
    # other data (a labelled subset changes the students' data) -> the scratch stage is not shared
    third = {**second, "output_dir": str(tmp_path / "c"), "data": {**second["data"], "subset": 300}}
    logs = []
    _run(third, logs)
    assert any("[teacher] reusing" in m for m in logs) and not any("[scratch] reusing" in m for m in logs)


def test_teacher_checkpoint_is_loaded_instead_of_trained(tmp_path, finished):
    out, raw, metrics = finished
    stages = {**raw["stages"], "scratch": {"enabled": False}}
    stages.pop("teacher")  # epochs default to 0 with a checkpoint: used as it is
    raw2 = tiny_config(tmp_path / "b", teacher={"name": "mlp", "hidden": [64],
                                                "checkpoint": str(out / "stages" / "teacher" / "checkpoint.pt")})
    raw2["stages"] = stages
    logs: list[str] = []
    m = _run(raw2, logs)
    assert any("[teacher] loaded from" in line for line in logs)
    assert m["models"]["teacher"]["test_accuracy"] == metrics["models"]["teacher"]["test_accuracy"]
    assert set(m["models"]) == {"teacher", "distil"} and m["distillation_gain_points"] is None
    assert not (tmp_path / "b" / "stages" / "teacher").exists()


def test_user_components_and_several_losses(tmp_path):
    raw = tiny_config(tmp_path / "u", student={"_component_": "user_components.tiny_mlp", "width": 6},
                      stages={"teacher": {"epochs": 1}, "scratch": {"enabled": False}, "distil": {
                          "epochs": 1, "losses": [{"name": "kd", "weight": 1.0},
                                                  {"_component_": "user_components.CosineLogits", "weight": 0.5, "scale": 2.0}]}},
                      data={"dataset": "digits", "augment": [{"name": "gaussian_noise", "std": 0.01}]})
    m = _run(raw)
    hist = m["histories"]["distil"]["history"]
    assert {"distillation/kd", "distillation/CosineLogits"} <= set(hist)
    total = hist["distillation/kd"][0] + hist["distillation/CosineLogits"][0]
    assert hist["distillation_loss"][0] == pytest.approx(total, rel=1e-5)
    assert m["models"]["distil"]["parameters"] == 64 * 6 + 6 + 6 * 10 + 10


def test_teacher_checkpoint_of_another_model_is_refused(tmp_path):
    bad = tmp_path / "other.pt"
    save_checkpoint(bad, torch.nn.Linear(3, 2))
    raw = tiny_config(tmp_path / "x", teacher={"name": "mlp", "hidden": [64], "checkpoint": str(bad)})
    from kdistill.errors import CheckpointError

    with pytest.raises(CheckpointError, match="do not\\s+fit"):
        _run(raw)


def test_a_user_data_reader_feeds_the_run(tmp_path):
    raw = tiny_config(tmp_path / "r", data={"reader": {"_component_": "user_components.synthetic_splits", "n_train": 300},
                                            "batch_size": 32},
                      teacher={"name": "mlp", "hidden": [32]}, student={"name": "mlp", "hidden": [4]})
    raw["data"].pop("dataset")
    m = _run(raw)
    assert m["dataset"]["name"] == "synthetic" and m["dataset"]["train"] == 300 and m["dataset"]["num_classes"] == 3
    assert m["dataset"]["class_names"] == ["top", "middle", "bottom"] and m["dataset"]["input_shape"] == [1, 4, 4]
    assert m["models"]["teacher"]["test_accuracy"] > 0.9  # the classes are easy: the data really flowed


@pytest.mark.parametrize("spec, epochs, steps, expected", [
    ({"name": "constant"}, 3, 10, [1.0] * 30),
    ({"name": "step", "step_size": 2, "gamma": 0.5}, 4, 5, [1.0, 1.0, 0.5, 0.5]),
    ({"name": "multistep", "milestones": [1, 3], "gamma": 0.1}, 4, 5, [1.0, 0.1, 0.1, 0.01]),
])
def test_built_in_schedules(spec, epochs, steps, expected):
    from kdistill.config import ScheduleSpec
    from kdistill.experiment import build_schedule

    factory, interval = build_schedule(ScheduleSpec(**spec), epochs, steps)
    if factory is None:
        assert interval == "epoch" and spec["name"] == "constant"
        return
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = factory(opt)
    assert interval == "epoch"
    lrs = []
    for _ in range(epochs):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx(expected)


def test_cosine_schedule_with_warmup_follows_the_formula():
    import math

    from kdistill.config import ScheduleSpec
    from kdistill.experiment import build_schedule

    epochs, steps, warm = 4, 10, 1
    factory, interval = build_schedule(ScheduleSpec(name="cosine", warmup_epochs=warm, eta_min=0.0), epochs, steps)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = factory(opt)
    assert interval == "step"
    lrs = []
    for _ in range(epochs * steps):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(1e-3) and lrs[warm * steps - 1] < 1.0  # linear warm-up from 1e-3
    total = epochs * steps - warm * steps
    for i in (0, 7, 15, 29):  # cosine decay after the warm-up: 0.5 * (1 + cos(pi * i / total))
        assert lrs[warm * steps + i] == pytest.approx(0.5 * (1 + math.cos(math.pi * i / total)), abs=1e-6)


def test_normalize_standardises_each_channel_with_the_training_statistics():
    from kdistill.data import load_dataset
    from kdistill.experiment import normalize_channels

    data = normalize_channels(load_dataset("digits"))
    assert abs(float(data.x_train.mean())) < 1e-5 and abs(float(data.x_train.std()) - 1.0) < 1e-4
    assert data.x_test.dtype == data.x_train.dtype == "float32"


@pytest.mark.parametrize("fmt", ["state_dict", "safetensors"])
def test_a_teacher_in_a_plain_format_is_used_as_it_is(tmp_path, finished, fmt):
    out, raw, metrics = finished
    weights = torch.load(out / "stages" / "teacher" / "checkpoint.pt", weights_only=True)["state_dict"]
    if fmt == "state_dict":
        path = tmp_path / "teacher.pth"
        torch.save({"state_dict": {f"module.{k}": v for k, v in weights.items()}}, path)  # a DDP training script's file
    else:
        from safetensors.torch import save_file

        path = tmp_path / "teacher.safetensors"
        save_file({k: v.contiguous() for k, v in weights.items()}, str(path))
    raw2 = tiny_config(tmp_path / "r", teacher={"name": "mlp", "hidden": [64], "checkpoint": str(path)},
                       stages={**raw["stages"], "teacher": {"epochs": 0}, "scratch": {"enabled": False}})
    logs: list[str] = []
    m = _run(raw2, logs)
    assert any(f"[teacher] loaded from {path} ({fmt}" in line for line in logs)
    assert m["models"]["teacher"]["test_accuracy"] == metrics["models"]["teacher"]["test_accuracy"]
    assert m["models"]["teacher"]["reused"] == str(path)
    # the run directory's teacher is the file as given (export, bench and cache read it from there)
    model = load_stage_model(tmp_path / "r", "teacher")
    assert all(torch.equal(model.state_dict()[k], weights[k]) for k in weights)


def test_a_teacher_checkpoint_with_epochs_is_fine_tuned_from_its_weights(tmp_path, finished):
    out, raw, metrics = finished
    ckpt = out / "stages" / "teacher" / "checkpoint.pt"
    raw2 = tiny_config(tmp_path / "f", teacher={"name": "mlp", "hidden": [64], "checkpoint": str(ckpt)},
                       stages={**raw["stages"], "teacher": {"epochs": 1, "optimizer": {"name": "adam", "lr": 1e-4}},
                               "scratch": {"enabled": False}})
    logs: list[str] = []
    m = _run(raw2, logs)
    assert any("[teacher] loaded from" in line for line in logs) and any("[teacher] training" in line for line in logs)
    first = m["histories"]["teacher"]["history"]
    # one epoch at a small learning rate from trained weights: already as accurate as the source
    assert first["val_accuracy"][0] >= metrics["models"]["teacher"]["test_accuracy"] - 0.02
    tuned = torch.load(tmp_path / "f" / "stages" / "teacher" / "checkpoint.pt", weights_only=True)["state_dict"]
    source = torch.load(ckpt, weights_only=True)["state_dict"]
    assert any(not torch.equal(tuned[k], source[k]) for k in source)  # it did train


def test_the_assistant_stage_distils_teacher_to_assistant_to_student(tmp_path):
    """TAKD: the assistant is distilled from the teacher, the student from the assistant."""
    out = tmp_path / "ta"
    raw = tiny_config(out, teacher_store=str(tmp_path / "store"))
    raw["stages"]["assistant"] = {"model": {"name": "mlp", "hidden": [24]}, "epochs": 2, "alpha": 0.3,
                                  "temperature": 4.0, "optimizer": {"name": "adam", "lr": 0.005}}
    logs: list[str] = []
    m = _run(raw, logs)
    assert m["stages"] == ["teacher", "assistant", "scratch", "distil"]
    params = {k: v["parameters"] for k, v in m["models"].items()}
    assert params["teacher"] > params["assistant"] > params["distil"] == params["scratch"]
    assert [line.split("]")[0] for line in logs if line.endswith("] training")] == [
        "[teacher", "[scratch", "[assistant", "[distil"]
    hist = m["histories"]["assistant"]["history"]
    assert len(hist["val_accuracy"]) == 2 and "distillation_loss" in hist
    # the distil stage's fingerprint chains through the assistant's: another assistant, another student
    assert m["fingerprints"]["assistant"] != m["fingerprints"]["distil"]
    model = load_stage_model(out, "assistant")
    assert sum(p.numel() for p in model.parameters()) == params["assistant"]
    assert m["agreement"]["assistant"] > 0.5  # it learned from the teacher
    assert "assistant" in (out / "report.md").read_text()
    # another assistant is another teacher for the student: both retrain, teacher and scratch do not
    raw2 = {**raw, "output_dir": str(tmp_path / "ta2")}
    raw2["stages"] = {**raw["stages"], "assistant": {**raw["stages"]["assistant"], "temperature": 2.0}}
    logs = []
    _run(raw2, logs)
    assert any("[teacher] reusing" in line for line in logs) and any("[scratch] reusing" in line for line in logs)
    assert any("[assistant] training" in line for line in logs) and any("[distil] training" in line for line in logs)


def test_the_assistant_stage_resumes_mid_stage(tmp_path):
    out = tmp_path / "ta"
    raw = tiny_config(out, checkpoint={"every_steps": 5, "every_seconds": None})
    raw["stages"]["assistant"] = {"model": {"name": "mlp", "hidden": [24]}, "epochs": 2, "alpha": 0.3,
                                  "temperature": 4.0, "optimizer": {"name": "adam", "lr": 0.005}}
    reference = _run(raw)
    # as if killed in the assistant's second epoch: its last.pt stays, the later stages are gone
    sdir = out / "stages"
    for name in ("assistant", "distil"):
        (sdir / name / "done.json").unlink()
    import shutil

    shutil.rmtree(sdir / "distil")
    state = torch.load(sdir / "assistant" / "last.pt", weights_only=True)
    assert state["global_step"] > 0
    run_json = json.loads((out / "run.json").read_text())
    (out / "run.json").write_text(json.dumps({**run_json, "status": "running"}))
    logs: list[str] = []
    again = _run(raw, logs)
    assert any("[assistant] resuming from epoch" in line for line in logs)
    for k in ("assistant", "distil"):
        assert again["models"][k]["test_accuracy"] == reference["models"][k]["test_accuracy"]


def test_the_assistant_and_the_student_each_distil_from_a_cache_of_their_own_teacher(tmp_path):
    out = tmp_path / "tac"
    raw = tiny_config(out, teacher_store=str(tmp_path / "store"))
    raw["stages"]["scratch"] = {"enabled": False}
    raw["stages"]["assistant"] = {"model": {"name": "mlp", "hidden": [24]}, "epochs": 1, "teacher_cache": True}
    raw["stages"]["distil"] = {**raw["stages"]["distil"], "teacher_cache": True}
    logs: list[str] = []
    m = _run(raw, logs)
    built = [line for line in logs if "building the teacher cache" in line]
    assert [line.split("]")[0] for line in built] == ["[assistant", "[distil"]
    caches = sorted(p.name for p in (tmp_path / "teacher_caches").iterdir() if p.is_dir())
    assert len(caches) == 2 and caches[0].startswith("mlp-") and caches[1].startswith("mlp-")
    # the student's cache was built from the assistant's final weights (open() checks the fingerprint)
    from kdistill.teacher import TeacherCache

    assistant = load_stage_model(out, "assistant")
    distil_cache = next(p for p in (tmp_path / "teacher_caches").iterdir()
                        if p.is_dir() and any(p.name in line for line in built if line.startswith("[distil")))
    cached = TeacherCache.open(distil_cache, teacher=assistant)
    assert cached.num_samples == m["dataset"]["train"]
