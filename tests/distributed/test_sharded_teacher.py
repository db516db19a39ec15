"""The FSDP2-sharded teacher on 2 CPU processes with Gloo, started by torchrun: the
sharded teacher's logits (and tapped layers) equal the unsharded teacher's, each process
holds half the parameter bytes at rest, a 2-process fit with it ends on the weights the
replicated LiveTeacher gives, and the teacher never gets gradients or optimizer state.
Built outside a process group, it says to start with torchrun."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from kdistill.distributed import DistributedError
from kdistill.teacher import ShardedTeacher, Teacher
from kdistill.teacher.base import missing_calls
from kdistill.teacher.sharded import find_blocks

from launch import worker_results  # noqa: E402 - this folder is on sys.path in tests

HERE = Path(__file__).resolve().parent
WORKERS = HERE / "sharded_workers.py"


def run_cases(tmp_path: Path, cases: str, nproc: int) -> tuple[dict[int, dict], Path]:
    out = tmp_path / f"{cases.replace(',', '-')}-{nproc}"
    found, proc = worker_results(WORKERS, cases, out, nproc)
    del found["log"]
    for record in found.values():
        for case in cases.split(","):
            assert "error" not in record.get(case, {}), record[case]["error"]
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return found, out


@pytest.mark.slow
def test_two_processes_shard_the_teacher_and_fit_as_the_replicated_one(tmp_path):
    found, out = run_cases(tmp_path, "logits,fit_sharded,fit_live", 2)
    assert set(found) == {0, 1} and all(r["world"] == 2 for r in found.values())
    for r in found.values():
        got = r["logits"]
        # (a) each process's own batch: the unsharded teacher's logits and tapped block output
        assert got["logits_diff"] <= 1e-5 and got["second_diff"] <= 1e-5 and got["feature_diff"] <= 1e-5
        assert got["kept_diff"] <= 1e-5
        assert not got["requires_grad"] and not got["inference"]  # ordinary tensors for the losses
        # (b) half the parameter bytes at rest, and again after a forward (resharded)
        assert got["blocks"] == ["model.layers.0", "model.layers.1", "model.embed_tokens", "lm_head"]
        assert got["tied_blocks"] == ["model.layers.0", "model.layers.1"] and got["tied_diff"] <= 1e-5
        assert got["dtensors"] == got["parameters"]
        assert abs(got["local_bytes_at_rest"] - got["full_bytes"] / 2) <= 0.01 * got["full_bytes"]
        assert got["local_bytes_after_forward"] == got["local_bytes_at_rest"]
        assert got["kept_bytes_after_forward"] == got["full_bytes"]  # reshard_after_forward=False keeps them
        # (d) frozen: no gradients, not trainable, eval mode, not in the optimizer
        for state in (got["state"], r["fit_sharded"]["state"]):
            assert state == {"grads": 0, "trainable": 0, "training": False, "in_optimizer": 0, "optimizer_state": 0}
        assert r["fit_sharded"]["steps"] == r["fit_live"]["steps"] == 4
        assert r["fit_sharded"]["history"] == pytest.approx(r["fit_live"]["history"], rel=1e-5)
    # (c) the student ends on the weights the replicated live teacher gives
    sharded = torch.load(out / "fit_sharded.pt", weights_only=True)
    live = torch.load(out / "fit_live.pt", weights_only=True)
    assert sorted(sharded) == sorted(live)
    for name in sharded:
        assert torch.allclose(sharded[name], live[name], atol=1e-5, rtol=0), name
    # the distillation term was really there (teacher logits reached the loss)
    assert min(found[0]["fit_sharded"]["history"]["distillation_loss"]) > 0


def test_outside_a_process_group_it_says_to_start_with_torchrun(tmp_path):
    found, _ = run_cases(tmp_path, "no_group", 1)
    message = found[0]["no_group"]["raised"]
    assert message.startswith("DistributedError: ") and "torchrun --nproc-per-node N" in message


def test_it_answers_every_call_of_the_protocol():
    assert issubclass(ShardedTeacher, Teacher) and missing_calls(ShardedTeacher) == []
    # set_taps and parameters are its own; the other calls keep a live teacher's defaults
    assert ShardedTeacher.set_taps is not Teacher.set_taps and ShardedTeacher.parameters is not Teacher.parameters
    assert ShardedTeacher.prepare is Teacher.prepare and ShardedTeacher.resolve_augment is Teacher.resolve_augment


def test_outside_a_process_group_in_this_process(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    if torch.distributed.is_initialized():
        pytest.skip("a process group is active in this process")
    with pytest.raises(DistributedError, match=r"torchrun --nproc-per-node N"):
        ShardedTeacher(nn.Linear(2, 2))
    with pytest.raises(TypeError, match="nn.Module"):
        ShardedTeacher("not a network")  # type: ignore[arg-type]


def test_blocks_are_found_as_hugging_face_models_expose_them():
    import transformers

    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    assert find_blocks(transformers.LlamaForCausalLM(config)) == ["model.layers.0", "model.layers.1", "model.layers.2"]

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.small = nn.ModuleList([nn.Linear(2, 2)])
            self.body = nn.ModuleList([nn.Linear(8, 8), nn.Linear(8, 8)])

    assert find_blocks(Net()) == ["body.0", "body.1"]  # without a config: the largest ModuleList
    with pytest.raises(ValueError, match="blocks="):
        find_blocks(nn.Sequential(nn.Linear(2, 2)))
