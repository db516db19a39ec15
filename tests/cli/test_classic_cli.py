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


#: the few-label regime's labelled samples in these tests (digits has 1,437 training images)
LABELS = ["--labels", "200"]


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("classic")
    assert _run(out, *LABELS) == 0
    return out


@pytest.fixture(scope="module")
def run_dir(out_dir):
    """The all-label regime's run directory (the pair most papers compare)."""
    return out_dir / "all_labels"


def test_writes_both_regimes_and_the_joint_report(out_dir):
    for name in ("regimes.json", "report.md", "report.html", "figures/regimes.png"):
        assert (out_dir / name).is_file(), name
    assert (out_dir / "figures" / "regimes.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for regime in ("few_labels", "all_labels"):
        run_dir = out_dir / regime
        for name in ("config.yaml", "run.json", "metrics.json", "report.md", "report.html", "figures/accuracy.png"):
            assert (run_dir / name).is_file(), f"{regime}/{name}"
        for stage in ("teacher", "scratch", "distil"):
            for name in ("checkpoint.pt", "history.jsonl", "done.json"):
                assert (run_dir / "stages" / stage / name).is_file(), f"{regime}/{stage}/{name}"


def test_the_regimes_differ_only_in_their_labels_and_share_the_teacher(out_dir):
    import yaml

    few = yaml.safe_load((out_dir / "few_labels" / "config.yaml").read_text())
    every = yaml.safe_load((out_dir / "all_labels" / "config.yaml").read_text())
    assert (few["data"]["subset"], few["data"]["unlabelled"]) == (200, True)
    assert (every["data"]["subset"], every["data"]["unlabelled"]) == (None, False)
    few["data"].update(subset=None, unlabelled=False)
    assert few == every
    # the teacher is trained once: the second regime reuses it (same weights, same accuracy)
    assert "[teacher] reusing the teacher trained by" in (out_dir / "all_labels" / "run.log").read_text()
    a = torch.load(out_dir / "few_labels" / "stages" / "teacher" / "checkpoint.pt", weights_only=True)["state_dict"]
    b = torch.load(out_dir / "all_labels" / "stages" / "teacher" / "checkpoint.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_regimes_json_and_report_hold_the_runs_numbers(out_dir):
    summary = json.loads((out_dir / "regimes.json").read_text())
    report = (out_dir / "report.md").read_text()
    assert list(summary["regimes"]) == ["few_labels", "all_labels"]
    for regime, r in summary["regimes"].items():
        metrics = json.loads((out_dir / regime / "metrics.json").read_text())
        acc = {k: v["test_accuracy"] for k, v in metrics["models"].items()}
        assert r["accuracy"] == acc
        assert r["gain_points"] == pytest.approx(100 * (acc["distil"] - acc["scratch"]))
        assert r["labelled"] == metrics["dataset"]["labelled"]
        assert f"{100 * acc['distil']:.2f}%" in report and f"{r['gain_points']:+.2f}" in report
        assert set(r["seconds"]) >= {"distil", "measure"} and all(v >= 0 for v in r["seconds"].values())
    few = summary["regimes"]["few_labels"]
    assert (few["labelled"], few["unlabelled"]) == (200, summary["dataset"]["train"] - 200)
    assert summary["wall_seconds"] > 0 and "Whole command:" in report
    assert report.index("few labels + transfer set") < report.index("| all labels |")  # the lead result first


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
    # one accuracy per epoch for the curves (the teacher was trained by the first regime)
    assert [len(h["history"]["val_accuracy"]) for h in metrics["histories"].values()] == [2, 2, 2]
    assert metrics["machine"]["torch_threads"] >= 1
    assert set(metrics["timing"]["stages"]) == {"teacher", "scratch", "distil", "measure"}


def test_run_report_has_the_table(run_dir):
    report = (run_dir / "report.md").read_text()
    assert "| teacher |" in report and "| scratch |" in report and "| distilled |" in report
    assert "test accuracy" in report and "speed-up vs teacher" in report
    assert "figures/accuracy.png" in report


def test_rerun_of_a_finished_run_trains_nothing(out_dir, capsys):
    stages = [out_dir / r / "stages" / s / "checkpoint.pt" for r in ("few_labels", "all_labels")
              for s in ("teacher", "scratch", "distil")]
    before = [p.stat().st_mtime_ns for p in stages]
    assert _run(out_dir, *LABELS) == 0
    assert capsys.readouterr().out.count("nothing to do") == 2
    assert [p.stat().st_mtime_ns for p in stages] == before


def test_labels_all_and_no_all_labels_run_one_regime(tmp_path):
    assert _run(tmp_path / "a", "--labels", "all") == 0
    assert list(json.loads((tmp_path / "a" / "regimes.json").read_text())["regimes"]) == ["all_labels"]
    assert not (tmp_path / "a" / "few_labels").exists()
    assert _run(tmp_path / "f", *LABELS, "--no-all-labels") == 0
    assert list(json.loads((tmp_path / "f" / "regimes.json").read_text())["regimes"]) == ["few_labels"]
    assert not (tmp_path / "f" / "all_labels").exists()


def test_subset_is_the_same_as_labels(tmp_path, monkeypatch):
    monkeypatch.setenv("KDISTILL_CACHE", str(tmp_path / "cache"))  # train the scratch stage here, not reuse it
    out = tmp_path / "run"
    assert _run(out, "--subset", "200", "--unlabelled", "--no-all-labels") == 0
    metrics = json.loads((out / "few_labels" / "metrics.json").read_text())
    ds = metrics["dataset"]
    assert ds["labelled"] == 200 and ds["unlabelled"] == ds["train"] - 200
    # the scratch student takes as many optimizer steps per epoch as the distilled one
    steps = -(-ds["train"] // 32)  # batch 32 over labelled + unlabelled
    lines = (out / "few_labels" / "stages" / "scratch" / "history.jsonl").read_text().strip().splitlines()
    assert len(lines) == 2
    state = torch.load(out / "few_labels" / "stages" / "scratch" / "last.pt", weights_only=True)
    assert state["global_step"] == 2 * steps
    assert "unlabelled" in (out / "few_labels" / "report.md").read_text()


def test_changed_settings_need_force_and_then_reuse_the_teacher(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("KDISTILL_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    assert _run(out, "--labels", "all") == 0
    capsys.readouterr()
    assert _run(out, "--labels", "all", "--alpha", "0.5") == 1
    assert "--force" in capsys.readouterr().err
    assert _run(out, "--labels", "all", "--alpha", "0.5", "--force") == 0
    log = capsys.readouterr().out
    assert "[teacher] reusing the teacher trained by" in log and "[scratch] reusing" in log
    assert "[distil] training" in log
    assert json.loads((out / "all_labels" / "metrics.json").read_text())["config"]["stages"]["distil"]["alpha"] == 0.5


def test_an_interrupted_run_continues_at_the_unfinished_stage(tmp_path, capsys):
    out = tmp_path / "run"
    assert _run(out, "--labels", "all") == 0
    run = out / "all_labels"
    # as if killed during the distil stage: its done.json and the run's end are missing
    (run / "stages" / "distil" / "done.json").unlink()
    run_json = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps({**run_json, "status": "running"}))
    capsys.readouterr()
    assert _run(out, "--labels", "all") == 0
    log = capsys.readouterr().out
    assert "holds an unfinished run of this config: continuing it" in log
    assert log.count("finished earlier in this run directory") == 2 and "[distil]" in log


def test_a_corrupt_stage_checkpoint_is_retrained(tmp_path, capsys):
    out = tmp_path / "run"
    assert _run(out, "--labels", "all") == 0
    run = out / "all_labels"
    ckpt = run / "stages" / "scratch" / "checkpoint.pt"
    ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    run_json = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps({**run_json, "status": "running"}))
    capsys.readouterr()
    assert _run(out, "--labels", "all") == 0
    log = capsys.readouterr().out
    assert "[scratch] cannot reuse" in log and "truncated or corrupt" in log


def test_a_teacher_you_already_have_is_used_as_it_is(out_dir, tmp_path, capsys):
    """--teacher-checkpoint with a plain PyTorch state_dict: measured, never trained."""
    src = torch.load(out_dir / "all_labels" / "stages" / "teacher" / "checkpoint.pt", weights_only=True)["state_dict"]
    plain = tmp_path / "my_teacher.pth"
    torch.save(src, plain)
    out = tmp_path / "run"
    fast = [a for i, a in enumerate(FAST) if "--teacher-epochs" not in FAST[max(0, i - 1):i + 1]]
    assert main(["classic", "--out", str(out), *fast, "--labels", "all", "--teacher-checkpoint", str(plain)]) == 0
    log = capsys.readouterr().out
    assert "[teacher] loaded from" in log and "state_dict" in log and "[teacher] training" not in log
    metrics = json.loads((out / "all_labels" / "metrics.json").read_text())
    before = json.loads((out_dir / "all_labels" / "metrics.json").read_text())
    assert metrics["models"]["teacher"]["test_accuracy"] == before["models"]["teacher"]["test_accuracy"]
    assert metrics["config"]["stages"]["teacher"]["epochs"] == 0 and "teacher" not in metrics["histories"]
    assert not (out / "all_labels" / "stages" / "teacher").exists()


def test_a_teacher_checkpoint_of_another_architecture_is_refused_before_training(tmp_path, capsys):
    bad = tmp_path / "other.pt"
    torch.save(torch.nn.Linear(3, 2).state_dict(), bad)
    assert _run(tmp_path / "r", "--labels", "all", "--teacher-checkpoint", str(bad)) == 1
    err = capsys.readouterr().err
    assert str(bad) in err and "weight" in err
    assert not (tmp_path / "r" / "all_labels" / "stages" / "scratch").exists()


def test_one_teacher_cache_serves_both_regimes(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("KDISTILL_CACHE", str(tmp_path / "cache"))
    assert _run(tmp_path / "run", *LABELS, "--set", "stages.distil.teacher_cache=true") == 0
    log = capsys.readouterr().out
    assert log.count("building the teacher cache") == 1 and log.count("distilling from the teacher cache") == 2
    assert len([p for p in (tmp_path / "cache" / "teacher_caches").iterdir() if p.is_dir()]) == 1


@pytest.mark.parametrize("labels", ["0", "abc", "-5"])
def test_bad_labels_are_refused(tmp_path, capsys, labels):
    assert main(["classic", "--out", str(tmp_path / "r"), *FAST, "--labels", labels]) == 1
    assert "--labels must be a positive number of labelled samples or 'all'" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args, message",
    [
        (["--alpha", "1.5"], "stages.distil.alpha: Input should be less than or equal to 1 (got 1.5)"),
        (["--temperature", "0"], "stages.distil.temperature: Input should be greater than 0"),
    ],
)
def test_bad_settings_fail_before_training(tmp_path, capsys, args, message):
    assert main(["classic", "--out", str(tmp_path / "r"), *FAST, *args]) == 1
    assert message in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


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
    assert "--labels" in result.stdout and "--teacher-checkpoint" in result.stdout and "--no-all-labels" in result.stdout


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
