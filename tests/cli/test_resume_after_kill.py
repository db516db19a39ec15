"""A run killed with SIGKILL mid-epoch resumes with `kdistill run --resume` and ends with
exactly the metrics of an uninterrupted run (real subprocesses, real signal)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from experiment_configs import tiny_config, write_config
from kdistill.checkpoint import read_training_state
from kdistill.errors import CheckpointError

pytest.importorskip("sklearn")
TESTS = Path(__file__).resolve().parents[1]


def _env(tmp_path: Path) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")])
    env["KDISTILL_CACHE"] = str(tmp_path / "cache")
    env["KDISTILL_DEVICE"] = "cpu"
    return env


def _kdistill(*args: str) -> list[str]:
    return [sys.executable, "-m", "kdistill", *args]


def _mid_epoch_state(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        state = read_training_state(path)
    except CheckpointError:  # never half-written (atomic), but be tolerant of races
        return None
    return state if state["step_in_epoch"] > 0 else None


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_matches_uninterrupted(tmp_path):
    raw = tiny_config(
        tmp_path / "killed",
        stages={**tiny_config(tmp_path)["stages"], "distil": {
            "epochs": 2, "optimizer": {"name": "adam", "lr": 0.005}, "alpha": 0.3, "temperature": 4.0,
            "schedule": {"name": "cosine"}}},
        data={"dataset": "digits", "batch_size": 32, "augment": [{"name": "gaussian_noise", "std": 0.02}]},
        checkpoint={"every_steps": 3, "every_seconds": None},
        callbacks=[{"_component_": "user_components.SlowDown", "seconds": 0.03}],
    )
    raw["stages"]["teacher"]["epochs"] = 1
    config = write_config(tmp_path / "tiny.yaml", raw)
    env = _env(tmp_path)

    # 1. start a run and SIGKILL it in the middle of a distillation epoch
    killed_dir = tmp_path / "killed"
    proc = subprocess.Popen(_kdistill("run", str(config), "--quiet"), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    last = killed_dir / "stages" / "distil" / "last.pt"
    deadline = time.monotonic() + 120
    state = None
    while time.monotonic() < deadline and proc.poll() is None:
        state = _mid_epoch_state(last)
        if state is not None and state["epoch"] == 1:  # inside the second epoch: history and means both matter
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run finished before it could be killed:\n" + proc.stdout.read().decode()
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert not (killed_dir / "metrics.json").exists()
    assert json.loads((killed_dir / "run.json").read_text())["status"] == "running"

    # 2. resume it
    resumed = subprocess.run(_kdistill("run", "--resume", str(killed_dir), "--quiet"), env=env,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "[teacher] finished earlier in this run directory" in resumed.stdout
    assert "[distil] resuming from epoch 2" in resumed.stdout

    # 3. the same config, never interrupted
    clean_dir = tmp_path / "clean"
    clean = subprocess.run(_kdistill("run", str(config), "--out", str(clean_dir), "--quiet",
                                     "--set", "teacher_store=null"), env=env,
                           capture_output=True, text=True, timeout=300)
    assert clean.returncode == 0, clean.stdout + clean.stderr

    a = json.loads((killed_dir / "metrics.json").read_text())
    b = json.loads((clean_dir / "metrics.json").read_text())
    assert a["histories"] == b["histories"]  # every epoch's train and val numbers, exactly
    assert {k: v["test_accuracy"] for k, v in a["models"].items()} == {k: v["test_accuracy"] for k, v in b["models"].items()}
    assert a["confusion_matrix"] == b["confusion_matrix"]
    wa = torch.load(killed_dir / "stages" / "distil" / "checkpoint.pt", weights_only=True)["state_dict"]
    wb = torch.load(clean_dir / "stages" / "distil" / "checkpoint.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    lines = (killed_dir / "stages" / "distil" / "history.jsonl").read_text().strip().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [0, 1]


def test_resume_refuses_overrides_and_non_runs(tmp_path):
    env = _env(tmp_path)
    r = subprocess.run(_kdistill("run", "--resume", str(tmp_path)), env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "not a kdistill run directory" in r.stderr
    r = subprocess.run(_kdistill("run"), env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "--resume" in r.stderr
