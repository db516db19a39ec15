"""``stages.distil.shard_teacher: true`` in a language-model YAML run on 2 CPU processes
(torchrun, Gloo): the teacher is sharded for distillation, the student ends on the
weights the replicated teacher gives, and the report measures the whole teacher again.
``stages.distil.teacher_cache`` on 2 processes: one token cache, served to both."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from experiment_configs import write_config  # noqa: E402
from launch import torchrun  # noqa: E402
from test_text_experiment import text_config  # noqa: E402

from kdistill.experiment import load_stage_model  # noqa: E402

HERE = Path(__file__).resolve().parent
pytestmark = pytest.mark.slow

DISTIL = {"epochs": 1, "optimizer": {"name": "adamw", "lr": 0.003}, "alpha": 0.5, "temperature": 1.0,
          "losses": [{"name": "forward_kl"}]}


def run_two(tmp_path: Path, name: str, shard: bool, **distil) -> Path:
    raw = text_config(tmp_path / name, distil={**DISTIL, "shard_teacher": shard, **distil})
    raw["teacher_store"] = str(tmp_path / "store")  # the second run reuses the first one's teacher
    config = write_config(tmp_path / f"{name}.yaml", raw)
    proc = torchrun(["-m", "kdistill", "run", str(config), "--quiet"], tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return tmp_path / name


def test_two_process_runs_shard_the_teacher_or_read_its_cache_and_distil_as_the_replicated_one(tmp_path):
    sharded = run_two(tmp_path, "sharded", True)
    live = run_two(tmp_path, "live", False)
    log = (sharded / "run.log").read_text()
    assert "2 processes (gloo)" in log
    assert log.count("[distil] the teacher sharded across 2 processes") == 1  # rank 0 alone logs
    assert "the teacher sharded" not in (live / "run.log").read_text()
    ms, ml = (json.loads((d / "metrics.json").read_text()) for d in (sharded, live))
    # the teacher is measured whole after distillation: the numbers of the unsharded one
    assert ms["models"]["teacher"]["held_out_loss"] == ml["models"]["teacher"]["held_out_loss"]
    assert ms["models"]["teacher"]["token_accuracy"] == \
        ml["models"]["teacher"]["token_accuracy"]
    # sharding changes where the teacher's parameters live, not its outputs
    assert ms["fingerprints"]["distil"] == ml["fingerprints"]["distil"]
    a, b = load_stage_model(sharded, "distil").state_dict(), load_stage_model(live, "distil").state_dict()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5, rtol=1e-4), (k, (a[k] - b[k]).abs().max())
    scratch = load_stage_model(sharded, "scratch").state_dict()
    assert any(not torch.equal(a[k], scratch[k]) for k in a)

    # 2 processes distilling from an exact token cache (every token, float32): built once
    # (rank 0 builds, rank 1 waits on its lock), each serving its share of the batch
    cached = run_two(tmp_path, "cached", False, teacher_cache={"k": 300, "dtype": "float32"})
    log = (cached / "run.log").read_text()
    assert log.count("[distil] building the token cache") == 1
    assert log.count("[distil] distilling from the token cache") == 1
    assert len([p for p in (tmp_path / "teacher_caches").iterdir() if not p.name.startswith(".")]) == 1
    c = load_stage_model(cached, "distil").state_dict()
    for k in c:
        assert torch.allclose(c[k], b[k], atol=1e-5, rtol=1e-4), (k, (c[k] - b[k]).abs().max())
