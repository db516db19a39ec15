"""The single-process parts of data-parallel training: how a batch is shared between
processes, the refusals, and the process-group helpers outside a process group."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler

from kdistill import Trainer, distributed
from kdistill.data.loader import ArrayLoader, batch_rows, make_loader


def passes(n, b, world, seed=None, **kw):
    """Per process: the list of row tensors of one pass (each process with its own
    generator, seeded alike, as fit seeds them)."""
    gen = lambda: None if seed is None else torch.Generator().manual_seed(seed)  # noqa: E731
    return [list(batch_rows(n, b, shard=(r, world), shuffle=seed is not None, generator=gen(), **kw))
            for r in range(world)]


@pytest.mark.parametrize("n,b,world", [(64, 16, 2), (70, 16, 2), (67, 12, 3), (5, 4, 4)])
def test_the_processes_share_each_single_process_batch(n, b, world):
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731 - the same seed on every process
    single = list(batch_rows(n, b, shuffle=True, generator=g()))
    shared = passes(n, b, world, seed=3)
    steps = {len(p) for p in shared}
    assert len(steps) == 1  # every process takes as many steps (or DDP would wait for ever)
    padded = n + (-n % world)
    assert steps.pop() == -(-padded // b)
    sizes = {len(p[i]) for p in shared for i in range(len(p))}
    for i in range(len(single)):
        parts = [p[i] for p in shared]
        assert len({len(t) for t in parts}) == 1  # equal shares: DDP's average is the global mean
        union = torch.cat(parts)
        if len(union) == len(single[i]) and not (n % world and i == len(single) - 1):
            assert sorted(union.tolist()) == sorted(single[i].tolist())  # the same samples, split
    everything = torch.cat([t for p in shared for t in p]).tolist()
    assert set(everything) == set(range(n))  # every sample, each once, padding aside
    assert len(everything) == padded and sizes <= {b // world, -(-(padded % b or b) // world)}


def test_padding_repeats_the_first_samples_of_the_pass_like_distributed_sampler():
    order = torch.randperm(7, generator=torch.Generator().manual_seed(0))
    shared = passes(7, 8, 2, seed=0)
    assert torch.cat([shared[0][0], shared[1][0]]).sort().values.tolist() == sorted(order.tolist() + [order[0].item()])


def test_evaluation_shares_are_unpadded_and_skip_empty_batches():
    shared = passes(9, 4, 2, pad=False)
    everything = sorted(torch.cat([t for p in shared for t in p]).tolist())
    assert everything == list(range(9))  # each sample counted once
    assert [len(t) for t in shared[0]] == [2, 2, 1] and [len(t) for t in shared[1]] == [2, 2]
    loader = ArrayLoader(torch.zeros(9, 2), batch_size=4, shard=(1, 2), pad=False)
    assert len(loader) == 2 == len(list(loader))


@pytest.mark.parametrize("pad", [True, False])
def test_array_loader_and_dataset_paths_agree(pad):
    x, y = torch.randn(30, 3), torch.randint(0, 4, (30,))
    kw = dict(batch_size=8, shuffle=True, shard=(1, 2), pad=pad)
    a = make_loader(x, y, generator=torch.Generator().manual_seed(5), **kw)

    class Plain(torch.utils.data.Dataset):  # a map-style dataset (not the TensorDataset fast path)
        def __len__(self):
            return 30

        def __getitem__(self, i):
            return x[i], y[i]

    d = make_loader(Plain(), generator=torch.Generator().manual_seed(5), **kw)
    batches_a, batches_d = list(a), list(d)
    assert len(a) == len(d) == len(batches_a) == len(batches_d)
    for ba, bd in zip(batches_a, batches_d):
        assert torch.equal(ba.index, bd.index) and torch.equal(ba.inputs, bd.inputs)


def test_an_unsharded_dataloader_is_refused_in_a_multi_process_run():
    ds = TensorDataset(torch.randn(8, 2), torch.zeros(8, dtype=torch.long))
    with pytest.raises(ValueError, match="DistributedSampler"):
        make_loader(DataLoader(ds, batch_size=4), shard=(0, 2))
    sampler = DistributedSampler(ds, num_replicas=2, rank=0, shuffle=False)
    assert len(make_loader(DataLoader(ds, batch_size=2, sampler=sampler), shard=(0, 2))) == 2


def test_a_global_batch_that_does_not_split_evenly_is_refused(monkeypatch):
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    trainer = Trainer(torch.nn.Linear(2, 3), device="cpu").compile("adam")
    with pytest.raises(ValueError, match=r"batch_size=33 is the global batch of a 2-process run .* multiple of 2"):
        trainer.fit(torch.randn(8, 2), torch.zeros(8, dtype=torch.long), batch_size=33, verbose=0)


def test_helpers_outside_a_process_group(monkeypatch):
    for var in ("WORLD_SIZE", "RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    assert distributed.init() is False and not distributed.launched()
    assert (distributed.rank(), distributed.world_size(), distributed.is_main()) == (0, 1, True)
    assert distributed.broadcast_object({"a": 1}) == {"a": 1} and distributed.all_gather_object(3) == [3]
    assert distributed.reduce_weighted_means({"acc": 3.0, "z": 0.0}, {"acc": 4.0, "z": 0.0}) == {"acc": 0.75}
    assert distributed.run_together("x", lambda: 5) == 5
    with pytest.raises(KeyError):  # a single process gets its own error, unwrapped
        distributed.run_together("x", lambda: {}["missing"])
    assert distributed.device() == (torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu"))


def test_a_half_configured_launch_and_a_bad_timeout_are_explained(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(distributed.DistributedError, match="RANK, MASTER_ADDR.* not set: start the processes with torchrun"):
        distributed.init()
    monkeypatch.setenv("KDISTILL_DIST_TIMEOUT", "soon")
    with pytest.raises(ValueError, match="KDISTILL_DIST_TIMEOUT must be a number of seconds"):
        distributed.timeout_seconds()
    monkeypatch.setenv("KDISTILL_DIST_TIMEOUT", "45")
    assert distributed.timeout_seconds() == 45.0
    monkeypatch.delenv("KDISTILL_DIST_TIMEOUT")
    assert distributed.timeout_seconds() == distributed.DEFAULT_TIMEOUT_S


def test_only_writing_callbacks_are_left_to_rank_zero():
    from kdistill import callbacks

    writers = {callbacks.ProgressBar, callbacks.CSVLogger, callbacks.JSONLogger, callbacks.ModelCheckpoint,
               callbacks.TrainingCheckpoint}
    for cls in writers:
        assert cls.main_process_only
    for cls in (callbacks.History, callbacks.EarlyStopping, callbacks.Callback):
        assert not cls.main_process_only  # they decide: every process must run them alike
