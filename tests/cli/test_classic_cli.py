"""`kdistill classic` end to end on scikit-learn's digits (seconds, CPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from kdistill.cli import main

pytest.importorskip("sklearn")

FAST = ["--dataset", "digits", "--teacher-epochs", "2", "--student-epochs", "2", "--batch-size", "32", "--quiet",
        "--set", "report.repeats=3", "report.throughput_batch=32"]


def _run(out, *extra: str) -> int:
    return main(["classic", "--out", str(out), *FAST, *extra])


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("classic")
    assert _run(out) == 0
    return out


def test_writes_the_run_directory(run_dir):
    for name in ("config.yaml", "run.json", "metrics.json", "report.md", "report.html", "figures/accuracy.png"):
        assert (run_dir / name).is_file(), name
    for stage in ("teacher", "scratch", "distil"):
        for name in ("checkpoint.pt", "last.pt", "history.jsonl", "done.json"):
            assert (run_dir / "stages" / stage / name).is_file(), f"{stage}/{name}"
    assert (run_dir / "figures" / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_runs_the_shipped_config_with_the_flags_as_overrides(run_dir):
    import yaml

    from kdistill.cli.classic import shipped_config

    shipped = yaml.safe_load(shipped_config().read_text())
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["name"] == shipped["name"] == "fashion_mnist-kd-classic_cnn"
    assert saved["data"]["dataset"] == "digits" and saved["data"]["batch_size"] == 32
    assert saved["stages"]["teacher"]["epochs"] == 2 and saved["stages"]["distil"]["epochs"] == 2
    assert saved["stages"]["distil"]["alpha"] == shipped["stages"]["distil"]["alpha"] == 0.1
    assert saved["stages"]["distil"]["temperature"] == 10.0


def test_metrics_hold_the_comparison(run_dir):
    metrics = json.loads((run_dir / "metrics.json").read_text())
    models = metrics["models"]
    assert set(models) == {"teacher", "scratch", "distil"}
    for m in models.values():
        assert 0.0 <= m["test_accuracy"] <= 1.0
        assert m["parameters"] > 0 and m["size_bytes"] > 0 and m["latency_ms"] > 0 and m["throughput"] > 0
    # the students share an architecture, far smaller than the teacher's
    assert models["scratch"]["parameters"] == models["distil"]["parameters"]
    assert models["teacher"]["parameters"] > 50 * models["distil"]["parameters"]
    gain = 100 * (models["distil"]["test_accuracy"] - models["scratch"]["test_accuracy"])
    assert metrics["distillation_gain_points"] == pytest.approx(gain)
    # one accuracy per epoch for the curves
    assert [len(h["history"]["val_accuracy"]) for h in metrics["histories"].values()] == [2, 2, 2]
    assert metrics["machine"]["torch_threads"] >= 1


def test_report_has_the_table(run_dir):
    report = (run_dir / "report.md").read_text()
    assert "| teacher |" in report and "| scratch |" in report and "| distilled |" in report
    assert "test accuracy" in report and "speed-up vs teacher" in report
    assert "figures/accuracy.png" in report


def test_rerun_of_a_finished_run_trains_nothing(run_dir, capsys):
    before = {s: (run_dir / "stages" / s / "checkpoint.pt").stat().st_mtime_ns for s in ("teacher", "scratch", "distil")}
    assert _run(run_dir) == 0
    assert "nothing to do" in capsys.readouterr().out
    after = {s: (run_dir / "stages" / s / "checkpoint.pt").stat().st_mtime_ns for s in before}
    assert after == before


def test_changed_settings_need_force_and_then_reuse_the_teacher(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("KDISTILL_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    assert _run(out) == 0
    capsys.readouterr()
    assert _run(out, "--alpha", "0.5") == 1
    assert "--force" in capsys.readouterr().err
    assert _run(out, "--alpha", "0.5", "--force") == 0
    log = capsys.readouterr().out
    assert "[teacher] reusing the teacher trained by" in log and "[scratch] reusing" in log
    assert "[distil] training" in log
    assert json.loads((out / "metrics.json").read_text())["config"]["stages"]["distil"]["alpha"] == 0.5


def test_an_interrupted_run_continues_at_the_unfinished_stage(tmp_path, capsys):
    out = tmp_path / "run"
    assert _run(out) == 0
    # as if killed during the distil stage: its done.json and the run's end are missing
    (out / "stages" / "distil" / "done.json").unlink()
    run_json = json.loads((out / "run.json").read_text())
    (out / "run.json").write_text(json.dumps({**run_json, "status": "running"}))
    capsys.readouterr()
    assert _run(out) == 0
    log = capsys.readouterr().out
    assert "holds an unfinished run of this config: continuing it" in log
    assert log.count("finished earlier in this run directory") == 2 and "[distil]" in log


def test_a_corrupt_stage_checkpoint_is_retrained(tmp_path, capsys):
    out = tmp_path / "run"
    assert _run(out) == 0
    ckpt = out / "stages" / "scratch" / "checkpoint.pt"
    ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    run_json = json.loads((out / "run.json").read_text())
    (out / "run.json").write_text(json.dumps({**run_json, "status": "running"}))
    capsys.readouterr()
    assert _run(out) == 0
    log = capsys.readouterr().out
    assert "[scratch] cannot reuse" in log and "truncated or corrupt" in log


def test_subset_with_unlabelled(tmp_path):
    out = tmp_path / "run"
    assert _run(out, "--subset", "200", "--unlabelled") == 0
    metrics = json.loads((out / "metrics.json").read_text())
    ds = metrics["dataset"]
    assert ds["labelled"] == 200 and ds["unlabelled"] == ds["train"] - 200
    # the scratch student takes as many optimizer steps per epoch as the distilled one
    steps = -(-ds["train"] // 32)  # batch 32 over labelled + unlabelled
    lines = (out / "stages" / "scratch" / "history.jsonl").read_text().strip().splitlines()
    assert len(lines) == 2
    state = torch.load(out / "stages" / "scratch" / "last.pt", weights_only=True)
    assert state["global_step"] == 2 * steps
    assert "unlabelled" in (out / "report.md").read_text()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--alpha", "1.5"], "stages.distil.alpha: Input should be less than or equal to 1 (got 1.5)"),
        (["--temperature", "0"], "stages.distil.temperature: Input should be greater than 0"),
        (["--unlabelled"], "data.unlabelled needs data.subset"),
    ],
)
def test_bad_settings_fail_before_training(tmp_path, capsys, args, message):
    assert main(["classic", "--out", str(tmp_path / "r"), *FAST, *args]) == 1
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


def test_reported_accuracy_is_that_of_the_saved_weights(run_dir):
    """The report's accuracy (the last epoch's evaluation) matches the checkpoint on disk."""
    import torch

    from kdistill import Trainer, build_model, load_checkpoint, load_dataset

    data = load_dataset("digits")
    metrics = json.loads((run_dir / "metrics.json").read_text())["models"]
    for stage, arch in (("teacher", "classic_teacher"), ("distil", "classic_student")):
        model = build_model(arch, num_classes=10, in_channels=1, input_size=8)
        load_checkpoint(run_dir / "stages" / stage / "checkpoint.pt", model)
        logits = Trainer(model, device="cpu").predict(data.x_test)
        accuracy = float((logits.argmax(-1) == torch.from_numpy(data.y_test)).float().mean())
        assert metrics[stage]["test_accuracy"] == pytest.approx(accuracy, abs=1e-6)
