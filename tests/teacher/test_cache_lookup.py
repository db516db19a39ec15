"""The per-batch lookup of a teacher cache: the short path (a full-logit cache held in RAM:
one index_select and one cast per batch) serves exactly what the checked path over the
memory maps serves, and every malformed index is still refused with the checked path's
message."""

import numpy as np
import pytest
import torch
from torch import nn

from kdistill.outputs import Batch
from kdistill.teacher import CacheMismatchError, TeacherCache

N, D, C = 40, 6, 5


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(D, 16), nn.ReLU(), nn.Linear(16, C)).eval()
    x = torch.randn(N, D)
    path = tmp_path_factory.mktemp("lookup") / "c"
    TeacherCache.build(teacher, x, path, dtype="float16", features=["1"], device="cpu")
    ram = TeacherCache.open(path, in_memory=True)
    ram.set_taps([])  # as a Distiller with a logits loss sets it
    maps = TeacherCache.open(path, in_memory=False)
    maps.set_taps([])
    return x, ram, maps


def test_the_short_path_serves_the_memory_maps_rows_bit_for_bit(caches):
    x, ram, maps = caches
    index = torch.tensor([7, 0, 39, 7, 12])
    for idx in (index, index.to(torch.int32), index.tolist()):
        fast, checked = ram(Batch(x[index], None, idx)), maps(Batch(x[index], None, idx))
        assert ram._ram_logits is not None and fast.features == {}
        assert fast.logits.dtype == torch.float32 and torch.equal(fast.logits, checked.logits)
    # a reindexed view takes the short path too, through its rows
    rows = [30, 2, 11]
    view, view_maps = ram.reindexed(rows), maps.reindexed(rows)
    b = Batch(x[[11, 30]], None, torch.tensor([2, 0]))
    assert torch.equal(view(b).logits, view_maps(b).logits)
    assert torch.equal(view(b).logits, maps(Batch(x[[11, 30]], None, torch.tensor([11, 30]))).logits)


def test_served_layers_take_the_checked_path_and_agree(caches):
    x, ram, maps = caches
    ram.set_taps(["1"])
    maps.set_taps(["1"])
    try:
        assert ram._ram_logits is None
        b = Batch(x[:3], None, torch.tensor([4, 5, 6]))
        fast, checked = ram(b), maps(b)
        assert torch.equal(fast.logits, checked.logits) and torch.equal(fast.features["1"], checked.features["1"])
    finally:
        ram.set_taps([])
        maps.set_taps([])
    assert ram._ram_logits is not None


@pytest.mark.parametrize("in_memory", [True, False])
def test_malformed_indices_are_refused_as_by_the_checked_path(caches, in_memory):
    x, ram, maps = caches
    cache = ram if in_memory else maps
    with pytest.raises(CacheMismatchError, match=r"batch.index holds 40 \(and 0 more out of range\).*rows 0..39"):
        cache(Batch(x[:2], None, torch.tensor([3, 40])))
    with pytest.raises(CacheMismatchError, match=r"batch.index holds -1 "):
        cache(Batch(x[:2], None, torch.tensor([-1, 3])))  # never wraps around to the last row
    with pytest.raises(ValueError, match="one row per sample"):
        cache(Batch(x[:2], None, torch.tensor([3])))
    with pytest.raises(ValueError, match="one row per sample"):
        cache(Batch(x[:1], None, torch.tensor(3)))  # 0-d
    with pytest.raises(ValueError, match="one row per sample"):
        cache(Batch(x[:2], None, torch.tensor([[1], [2]])))
    with pytest.raises(ValueError, match="one row per sample"):
        cache(Batch(x[:2], None, torch.tensor([1.0, 2.0])))
    with pytest.raises(ValueError, match="has none"):
        cache(Batch(x[:2]))
    with pytest.raises(CacheMismatchError, match="holds the un-augmented samples only"):
        cache(Batch(x[:2], None, torch.tensor([1, 2]), None, 0))
    view = cache.reindexed(np.array([5, 6]))
    with pytest.raises(CacheMismatchError, match=r"serves 2 samples \(reindexed"):
        view(Batch(x[:1], None, torch.tensor([2])))
    with pytest.raises(CacheMismatchError, match=r"batch.index holds -1 "):
        view(Batch(x[:1], None, torch.tensor([-1])))
