"""Deep mutual learning on 2 CPU processes (torchrun, Gloo): one DDP over the stack of
peers gives every process the same peers, the weights one process reaches with the same
global batch, and a resumed fit the uninterrupted fit's weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from launch import case_results, worker_results

HERE = Path(__file__).resolve().parent
WORKERS = HERE / "mutual_workers.py"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                       reason="torch.distributed with the Gloo backend is not available"),
]


def weights(out: Path, case: str, rank: int) -> dict[str, torch.Tensor]:
    return torch.load(out / f"{case}-{rank}.pt", weights_only=True)


def test_two_processes_train_the_peers_as_one_process_does(tmp_path):
    one, _ = worker_results(WORKERS, "plain", tmp_path / "one", nproc=1)
    assert "error" not in one[0]["plain"], one[0]
    found, _ = worker_results(WORKERS, "plain,resume", tmp_path / "two")
    case_results(found, "plain")
    case_results(found, "resume")
    reference = weights(tmp_path / "one", "plain", 0)
    a, b = weights(tmp_path / "two", "plain", 0), weights(tmp_path / "two", "plain", 1)
    assert any(k.startswith("peers.1.") for k in a)
    for k in reference:
        assert torch.equal(a[k], b[k])  # every process holds the same peers
        torch.testing.assert_close(a[k], reference[k], rtol=1e-4, atol=1e-5)  # as one process with the whole batch
    resumed = weights(tmp_path / "two", "resume", 0)
    for k in a:
        torch.testing.assert_close(resumed[k], a[k], rtol=0, atol=0)
