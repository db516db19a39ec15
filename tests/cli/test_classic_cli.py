"""`kdistill classic` end to end on scikit-learn's digits (seconds, CPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from kdistill.cli import main

pytest.importorskip("sklearn")

FAST = ["--dataset", "digits", "--teacher-epochs", "2", "--student-epochs", "2", "--batch-size", "32", "--quiet"]


def _run(out, *extra: str) -> int:
    return main(["classic", "--out", str(out), *FAST, *extra])


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("classic")
    assert _run(out) == 0
    return out


def test_writes_the_run_directory(run_dir):
    for name in ("config.json", "metrics.json", "report.md", "accuracy.png"):
        assert (run_dir / name).is_file(), name
    for stage in ("teacher", "scratch", "distilled"):
        for name in ("checkpoint.pt", "history.json", "log.csv", "done.json"):
            assert (run_dir / "stages" / stage / name).is_file(), f"{stage}/{name}"
    assert (run_dir / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_metrics_hold_the_comparison(run_dir):
    metrics = json.loads((run_dir / "metrics.json").read_text())
    models = metrics["models"]
    assert set(models) == {"teacher", "scratch", "distilled"}
    for m in models.values():
        assert 0.0 <= m["test_accuracy"] <= 1.0
        assert m["parameters"] > 0 and m["size_bytes"] > 0 and m["latency_ms"] > 0 and m["throughput"] > 0
    # the students share an architecture, far smaller than the teacher's
    assert models["scratch"]["parameters"] == models["distilled"]["parameters"]
    assert models["teacher"]["parameters"] > 50 * models["distilled"]["parameters"]
    gain = 100 * (models["distilled"]["test_accuracy"] - models["scratch"]["test_accuracy"])
    assert metrics["distillation_gain_points"] == pytest.approx(gain)
    # one accuracy per epoch for the plot
    assert [len(v) for v in metrics["curves"]["val_accuracy"].values()] == [2, 2, 2]
    assert metrics["machine"]["torch_threads"] >= 1


def test_report_has_the_table(run_dir):
    report = (run_dir / "report.md").read_text()
    assert "| teacher |" in report and "| scratch |" in report and "| distilled |" in report
    assert "test accuracy" in report and "speed-up vs teacher" in report
    assert "![test accuracy per epoch](accuracy.png)" in report


def test_rerun_reuses_finished_stages(run_dir, capsys):
    before = {s: (run_dir / "stages" / s / "checkpoint.pt").stat().st_mtime_ns for s in ("teacher", "scratch", "distilled")}
    assert _run(run_dir) == 0
    out = capsys.readouterr().out
    assert out.count("reusing") == 3
    after = {s: (run_dir / "stages" / s / "checkpoint.pt").stat().st_mtime_ns for s in before}
    assert after == before


def test_changed_settings_retrain_only_what_they_affect(tmp_path, capsys):
    out = tmp_path / "run"
    assert _run(out) == 0
    capsys.readouterr()
    assert _run(out, "--alpha", "0.5") == 0
    log = capsys.readouterr().out
    assert "[teacher] finished earlier" in log and "[scratch] finished earlier" in log
    assert "[distilled] settings changed" in log
    assert json.loads((out / "metrics.json").read_text())["config"]["alpha"] == 0.5


def test_an_interrupted_run_resumes_at_the_unfinished_stage(tmp_path, capsys):
    out = tmp_path / "run"
    assert _run(out) == 0
    # a kill during the distilled stage leaves no done.json for it
    (out / "stages" / "distilled" / "done.json").unlink()
    capsys.readouterr()
    assert _run(out) == 0
    log = capsys.readouterr().out
    assert log.count("reusing") == 2 and "[distilled] training" in log


def test_a_corrupt_stage_checkpoint_is_retrained(tmp_path, capsys):
    out = tmp_path / "run"
    assert _run(out) == 0
    ckpt = out / "stages" / "scratch" / "checkpoint.pt"
    ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    capsys.readouterr()
    assert _run(out) == 0
    log = capsys.readouterr().out
    assert "[scratch] cannot reuse" in log and "truncated or corrupt" in log


def test_subset_with_unlabelled(tmp_path):
    out = tmp_path / "run"
    assert _run(out, "--subset", "200", "--unlabelled") == 0
    ds = json.loads((out / "metrics.json").read_text())["dataset"]
    assert ds["labelled"] == 200 and ds["unlabelled"] == ds["train"] - 200
    metrics = json.loads((out / "metrics.json").read_text())
    steps = -(-ds["train"] // 32)  # batch 32 over labelled + unlabelled
    assert metrics["scratch_steps_per_epoch"] == steps
    scratch_log = (out / "stages" / "scratch" / "log.csv").read_text().splitlines()
    assert len(scratch_log) == 1 + 2  # header + 2 epochs, each of `steps` steps
    assert "as many optimizer steps as the distilled one" in (out / "report.md").read_text()
    assert "unlabelled (soft targets only)" in (out / "report.md").read_text()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--alpha", "1.5"], "alpha must be in [0, 1], got 1.5"),
        (["--temperature", "0"], "temperature must be a positive number"),
        (["--unlabelled"], "--unlabelled needs --subset"),
    ],
)
def test_bad_settings_fail_before_training(tmp_path, capsys, args, message):
    assert main(["classic", "--out", str(tmp_path / "r"), *FAST, *args]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "r" / "stages").exists()


def test_missing_dataset_names_where_it_looked(tmp_path, monkeypatch, capsys):
    import kdistill.data.datasets as datasets

    monkeypatch.setattr(datasets, "DEBIAN_DATASETS", tmp_path / "debian")
    monkeypatch.delenv("KDISTILL_DATA", raising=False)
    code = main(["classic", "--out", str(tmp_path / "r"), "--dataset", "kmnist", "--data-dir", str(tmp_path / "nowhere")])
    err = capsys.readouterr().err
    assert code == 1
    assert str(tmp_path / "nowhere") in err and "--data-dir" in err


def test_python_dash_m_entry_point():
    result = subprocess.run(
        [sys.executable, "-m", "kdistill", "classic", "--help"], capture_output=True, text=True,
        env={**os.environ, "PYTHONWARNINGS": "ignore"}, timeout=120,
    )
    assert result.returncode == 0
    assert "--subset" in result.stdout and "--unlabelled" in result.stdout


def _metrics(teacher: float, scratch: float, distilled: float) -> dict:
    row = dict(parameters=1000, size_bytes=4000, latency_ms=1.0, latency_p90_ms=1.2, latency_batch=1,
               throughput=100.0, throughput_batch=256, train_seconds=1.0)
    models = {name: {**row, "test_accuracy": acc} for name, acc in
              (("teacher", teacher), ("scratch", scratch), ("distilled", distilled))}
    models["teacher"]["parameters"] = 50_000
    return {
        "config": {"teacher": "t", "student": "s", "teacher_epochs": 1, "student_epochs": 2, "learning_rate": 1e-3,
                   "batch_size": 64, "alpha": 0.1, "temperature": 10.0, "seed": 0},
        "dataset": {"name": "d", "train": 100, "labelled": 100, "unlabelled": 0, "test": 10},
        "models": models,
        "distillation_gain_points": 100 * (distilled - scratch),
        "machine": {"processor": "cpu", "torch_threads": 2, "torch": "x"},
    }


def test_report_explains_a_result_without_gain():
    from kdistill.cli.classic import render_report

    weak_teacher = render_report(_metrics(0.870, 0.873, 0.856))
    assert "Why no gain here" in weak_teacher and "no more accurate than" in weak_teacher
    assert "-1.70 points" in weak_teacher
    slow_student = render_report(_metrics(0.95, 0.80, 0.79))
    assert "Why no gain here" in slow_student and "--student-epochs" in slow_student
    helped = render_report(_metrics(0.95, 0.80, 0.90))
    assert "Why no gain" not in helped and "+10.00 points" in helped
    assert "50x fewer parameters" in helped


def test_reported_accuracy_is_that_of_the_saved_weights(run_dir):
    """The report's accuracy (the last epoch's evaluation) matches the checkpoint on disk."""
    import torch

    from kdistill import Trainer, build_model, load_checkpoint, load_dataset

    data = load_dataset("digits")
    metrics = json.loads((run_dir / "metrics.json").read_text())["models"]
    for stage, arch in (("teacher", "classic_teacher"), ("distilled", "classic_student")):
        model = build_model(arch, num_classes=10, in_channels=1, input_size=8)
        load_checkpoint(run_dir / "stages" / stage / "checkpoint.pt", model)
        logits = Trainer(model, device="cpu").predict(data.x_test)
        accuracy = float((logits.argmax(-1) == torch.from_numpy(data.y_test)).float().mean())
        assert metrics[stage]["test_accuracy"] == pytest.approx(accuracy, abs=1e-6)
