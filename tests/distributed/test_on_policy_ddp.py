"""On-policy distillation (GKD, lmbda 0.5) and sequence-level KD from a sharded teacher on
2 CPU processes (torchrun, Gloo), tiny random Llama models: every process makes the same
decision for each micro-batch but samples with its own seed, every generated token counts
alike in the optimizer step whichever process generated it, the processes end with the
same student, a resumed fit ends with the uninterrupted fit's weights, and a
:class:`~kdistill.teacher.ShardedTeacher` generates in lockstep although the processes'
completions end at different lengths.

The processes are started once (``on_policy_workers.py``), for every case in turn."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist

HERE = Path(__file__).resolve().parent
WORKERS = HERE / "on_policy_workers.py"
CASES = ("lmbda", "resume", "sharded")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                       reason="torch.distributed with the Gloo backend is not available"),
]
pytest.importorskip("transformers")

import on_policy_workers as ow  # noqa: E402 - after the skips: it needs transformers
from launch import case_results as both_ran  # noqa: E402
from launch import worker_results  # noqa: E402

from kdistill import OnPolicy  # noqa: E402


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("on_policy")
    found, _ = worker_results(WORKERS, ",".join(CASES), out)
    return found, out


def case_results(two_processes, case: str) -> tuple[dict, dict, Path]:
    found, out = two_processes
    return (*both_ran(found, case), out)


def weights(out: Path, case: str, rank: int) -> dict[str, torch.Tensor]:
    return torch.load(out / f"{case}-{rank}.pt", weights_only=True)


def assert_equal_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def shared_draws(n: int, **settings) -> list[tuple[str, int]]:
    """The (source, seed) a single process's OnPolicy draws for ``n`` micro-batches."""
    twin = OnPolicy(**settings)
    return [twin.draw() for _ in range(n)]


def test_the_processes_decide_alike_and_sample_apart(two_processes):
    rank0, rank1, out = case_results(two_processes, "lmbda")
    assert rank0["global_step"] == rank1["global_step"] == 6
    a, b = rank0["micro_batches"], rank1["micro_batches"]
    assert len(a) == len(b) == 6
    # one decision per micro-batch, the same on both processes: a single process's draws
    draws = shared_draws(6, lmbda=0.5, max_new_tokens=ow.N_NEW, seed=ow.SEED)
    assert [m["source"] for m in a] == [m["source"] for m in b] == [source for source, _ in draws]
    assert 0 < rank0["counts"]["student"] < 6
    # each process samples with the drawn seed plus its rank: different samples from each
    for m0, m1, (source, seed) in zip(a, b, draws):
        if source == "dataset":
            assert m0["seed"] is m1["seed"] is None
        else:
            assert (m0["seed"], m1["seed"]) == (seed, seed + 1)
    assert [m["completions"] for m in a] != [m["completions"] for m in b]
    # trained as one: both processes end with the same student
    assert_equal_weights(weights(out, "lmbda", 0), weights(out, "lmbda", 1))


@pytest.mark.parametrize("case", ["lmbda", "sharded"])
def test_generated_tokens_count_alike_across_the_processes(two_processes, case):
    rank0, rank1, _ = case_results(two_processes, case)
    for m0, m1, s0, s1 in zip(rank0["micro_batches"], rank1["micro_batches"], rank0["steps"], rank1["steps"]):
        if m0["source"] != "dataset":  # every generated token is trained on (the prompt is not)
            assert (s0["tokens"], s1["tokens"]) == (sum(m0["completions"]), sum(m1["completions"]))
        total = s0["tokens"] + s1["tokens"]
        # a process's share of the step: 2 x its tokens / all tokens (DDP then averages the 2)
        assert (s0["share"], s1["share"]) == pytest.approx((2 * s0["tokens"] / total, 2 * s1["tokens"] / total))
    assert any(s0["tokens"] != s1["tokens"] for s0, s1 in zip(rank0["steps"], rank1["steps"]))


def test_a_resumed_two_process_fit_ends_as_the_uninterrupted_one(two_processes):
    uninterrupted0, uninterrupted1, out = case_results(two_processes, "lmbda")
    rank0, rank1, _ = case_results(two_processes, "resume")
    assert rank0["global_step"] == rank1["global_step"] == 6
    # the resumed fit draws and samples what the uninterrupted one did after the stop
    done = ow.CRASH_AFTER
    assert rank0["micro_batches"] == uninterrupted0["micro_batches"][done:]
    assert rank1["micro_batches"] == uninterrupted1["micro_batches"][done:]
    assert rank0["counts"] == uninterrupted0["counts"]
    for rank in (0, 1):
        assert_equal_weights(weights(out, "resume", rank), weights(out, "lmbda", 0))


def test_a_sharded_teacher_generates_in_lockstep(two_processes):
    rank0, rank1, out = case_results(two_processes, "sharded")
    assert rank0["global_step"] == rank1["global_step"] == 6
    a, b = rank0["micro_batches"], rank1["micro_batches"]
    assert [m["source"] for m in a] == [m["source"] for m in b] == ["teacher"] * 6
    assert all(m1["seed"] == m0["seed"] + 1 for m0, m1 in zip(a, b))
    # the processes' completions end at different lengths, yet their teachers ran as many
    # forward calls (each an all-gather of the shards)
    assert any(max(m0["completions"]) != max(m1["completions"]) for m0, m1 in zip(a, b))
    assert rank0["teacher_calls"] == rank1["teacher_calls"]
    assert_equal_weights(weights(out, "sharded", 0), weights(out, "sharded", 1))
