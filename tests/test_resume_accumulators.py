"""A resumed multi-process fit logs the interrupted epoch as an uninterrupted one does: the
epoch's running means (weighted sums of every logged term) are summed across the processes
step by step, so the training state rank 0 saves holds every process's share."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from kdistill import Distiller, distributed
from kdistill.callbacks import Callback, TrainingCheckpoint
from kdistill.checkpoint import read_training_state
from kdistill.distiller import _EpochMeans
from kdistill.losses import KDLoss

TESTS = Path(__file__).resolve().parent
WORKERS = TESTS / "distributed" / "workers.py"


def test_step_sums_pass_values_through_in_one_process():
    sums = distributed.StepSums()
    assert sums({"s:loss": 1.5, "w:loss": 3.0}) == {"s:loss": 1.5, "w:loss": 3.0}
    assert sums({}) == {}


def test_epoch_means_with_shared_sums_add_what_the_processes_sent():
    class TwoAlike:  # as if a second process had logged the same step
        def __call__(self, values):
            return {k: 2 * v for k, v in values.items()}

    alone, shared = _EpochMeans(), _EpochMeans(TwoAlike())
    for logs, weights in [({"loss": 0.5, "accuracy": 0.25}, {"*": 4.0, "accuracy": 2.0}),
                          ({"loss": 0.75, "accuracy": 1.0}, {"*": 4.0, "accuracy": 0.0})]:
        alone.update(logs, weights)
        shared.update(logs, weights)
    assert shared.result() == alone.result() == {"loss": 0.625, "accuracy": 0.25}
    assert shared.weights == {"loss": 16.0, "accuracy": 4.0}


class Stop(Exception):
    pass


class StopAt(Callback):
    def __init__(self, n):
        self.n = n

    def on_train_batch_end(self, step, logs=None):
        if self.trainer.global_step == self.n:
            raise Stop


def test_one_process_state_keeps_its_format(tmp_path):
    """One process: the saved running means are this process's sums and weights, as before."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(96, 6, generator=g), torch.randint(0, 3, (96,), generator=g)
    torch.manual_seed(0)
    d = Distiller(student=nn.Linear(6, 3), teacher=nn.Linear(6, 3), device="cpu")
    d.compile("adam", metrics=["accuracy"], distillation_loss_fn=KDLoss(temperature=4))
    path = tmp_path / "last.pt"
    with pytest.raises(Stop):
        d.fit(x, y, epochs=2, batch_size=16, seed=0, verbose=0, callbacks=[TrainingCheckpoint(path, every_steps=2), StopAt(2)])
    state = read_training_state(path)
    assert (state["epoch"], state["step_in_epoch"]) == (0, 2)
    assert set(state["means"]) == {"sums", "weights"}
    assert state["means"]["weights"] == {"loss": 32.0, "student_loss": 32.0, "distillation_loss": 32.0, "accuracy": 32.0}


@pytest.mark.slow
def test_a_two_process_resume_logs_the_interrupted_epoch_as_an_uninterrupted_run(tmp_path):
    out = tmp_path / "resume"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), str(WORKERS.parent), env.get("PYTHONPATH", "")])
    env["KDISTILL_DIST_TIMEOUT"] = "60"
    env.pop("KDISTILL_DEVICE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(WORKERS), "resume", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    found = {int(f.stem.split("-")[1]): json.loads(f.read_text()) for f in out.glob("result-*.json")}
    assert sorted(found) == [0, 1]
    for r, result in found.items():
        assert result["saved_at"] == [1, 3]  # stopped mid-epoch: epoch 1 (0-based), after step 3 of 8
        reference, resumed = result["reference"], result["resumed"]
        assert sorted(resumed) == sorted(reference)
        for key, values in reference.items():
            assert len(resumed[key]) == len(values) == 3, key
            assert resumed[key] == pytest.approx(values, abs=1e-6, rel=0), (r, key)
    assert found[0]["resumed"] == found[1]["resumed"]  # every process logs the same numbers
