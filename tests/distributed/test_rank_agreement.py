"""Processes started with different settings fail together, at once, naming what differs:
the pure naming logic in one process, and 2-process runs (torchrun, Gloo) where rank 1
distils at another temperature or for another number of epochs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kdistill import distributed
from kdistill.distributed import DistributedError, check_agreement, differences

HERE = Path(__file__).resolve().parent
WORKERS = HERE / "workers.py"


# ---------------------------------------------------------------- one process: the naming
def test_equal_mappings_have_no_differences():
    config = {"stages": {"distil": {"epochs": 2, "temperature": 4.0}}, "data": "abc"}
    assert differences([config, json.loads(json.dumps(config))]) == []
    assert differences([config]) == []


def test_a_differing_key_is_named_dotted_with_each_ranks_value():
    a = {"stages": {"distil": {"epochs": 2, "alpha": 0.1}, "teacher": {"epochs": 5}}, "data": {"train": "abc"}}
    b = {"stages": {"distil": {"epochs": 3, "alpha": 0.1}, "teacher": {"epochs": 5}}, "data": {"train": "abd"}}
    assert differences([a, b]) == ["stages.distil.epochs: rank 0 = 2, rank 1 = 3",
                                   'data.train: rank 0 = "abc", rank 1 = "abd"']


def test_ranks_with_the_same_value_are_grouped():
    values = [{"t": 4.0}] * 5 + [{"t": 2.0}] + [{"t": 4.0}] * 2
    assert differences(values) == ["t: ranks 0-4, 6-7 = 4.0, rank 5 = 2.0"]
    assert differences([{"t": 1}, {"t": 2}, {"t": 1}]) == ["t: ranks 0, 2 = 1, rank 1 = 2"]


def test_a_key_one_rank_lacks_shows_as_missing():
    assert differences([{"a": {"b": 1, "c": 2}}, {"a": {"b": 1}}]) == ["a.c: rank 0 = 2, rank 1 = (missing)"]
    assert differences([{"a": {}}, {"a": {"b": 1}}]) == ["a: rank 0 = {}, rank 1 = (missing)",
                                                         "a.b: rank 0 = (missing), rank 1 = 1"]


def test_lists_and_types_are_compared_whole_and_long_values_are_shortened():
    assert differences([{"shape": [16, 8]}, {"shape": [16, 9]}]) == ["shape: rank 0 = [16, 8], rank 1 = [16, 9]"]
    assert differences([{"n": 1}, {"n": 1.0}]) == ["n: rank 0 = 1, rank 1 = 1.0"]
    (line,) = differences([{"x": "a" * 500}, {"x": "b"}])
    assert len(line) < 200 and '..., rank 1 = "b"' in line


def test_check_agreement_is_a_no_op_in_one_process():
    assert not distributed.is_distributed()
    check_agreement("the experiment", {"anything": object(), "epochs": 3})


# ---------------------------------------------------------------- two processes
def _run(tmp_path: Path, case: str) -> tuple[dict[int, dict], float]:
    out = tmp_path / case
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(HERE.parent), str(HERE), env.get("PYTHONPATH", "")])
    env["KDISTILL_DIST_TIMEOUT"] = "120"  # a hang shows as a run far slower than the 60 s asked
    env.pop("KDISTILL_DEVICE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(WORKERS), case, str(out)]
    started = time.monotonic()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    elapsed = time.monotonic() - started
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    found = {int(f.stem.split("-")[1]): json.loads(f.read_text()) for f in out.glob("result-*.json")}
    assert sorted(found) == [0, 1], proc.stderr[-3000:]
    return found, elapsed


@pytest.mark.slow
def test_check_agreement_names_the_key_on_every_rank(tmp_path):
    two, _ = _run(tmp_path, "agreement")
    for r in (0, 1):
        assert two[r]["type"] == "DistributedError"
        assert two[r]["error"] == ("ranks disagree on the experiment: stages.distil.epochs: rank 0 = 2, rank 1 = 3; "
                                   "start every process with the same config and data")
        assert two[r]["same"] == {}  # equal values pass


@pytest.mark.slow
@pytest.mark.parametrize("case, line", [
    ("disagree_temperature", "distil.distillation_loss.temperature: rank 0 = 4.0, rank 1 = 2.0"),
    ("disagree_epochs", "fit.epochs: rank 0 = 2, rank 1 = 3"),
])
def test_a_rank_with_other_settings_fails_every_rank_quickly(tmp_path, case, line):
    two, elapsed = _run(tmp_path, case)
    for r in (0, 1):
        assert two[r]["type"] == "DistributedError", two[r]
        assert two[r]["error"].startswith("ranks disagree on the training set-up (fit): ")
        assert line in two[r]["error"]
        assert "start every process with the same config and data" in two[r]["error"]
    assert elapsed < 60, f"took {elapsed:.0f} s: the ranks waited for each other instead of failing together"
