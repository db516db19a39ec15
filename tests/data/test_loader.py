"""make_loader / ArrayLoader / as_tensor: coverage of indices, order, dtypes, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from kdistill.data.loader import ArrayLoader, DataLoaderAdapter, as_tensor, make_loader
from kdistill.outputs import UNLABELLED


def _rows(n: int, d: int = 3) -> torch.Tensor:
    # row i is filled with i, so a batch's rows name the samples they came from
    return torch.arange(n, dtype=torch.float32).unsqueeze(1).repeat(1, d)


def _order(loader) -> list[int]:
    return [int(i) for b in loader for i in b.index]


def test_shuffled_epoch_covers_every_index_exactly_once():
    g = torch.Generator().manual_seed(0)
    loader = ArrayLoader(_rows(23), torch.arange(23) % 5, batch_size=4, shuffle=True, generator=g)
    assert len(loader) == 6
    first, second = _order(loader), _order(loader)
    assert sorted(first) == list(range(23))
    assert sorted(second) == list(range(23))
    assert first != list(range(23))  # it did shuffle
    assert first != second  # and reshuffled for the next epoch
    sizes = [len(b) for b in loader]
    assert sizes == [4, 4, 4, 4, 4, 3]


def test_unshuffled_is_in_order():
    loader = ArrayLoader(_rows(10), batch_size=3)
    assert _order(loader) == list(range(10))
    assert [len(b) for b in loader] == [3, 3, 3, 1]
    assert all(b.targets is None for b in loader)


@pytest.mark.parametrize("shuffle", [False, True])
def test_drop_last(shuffle):
    loader = ArrayLoader(_rows(10), torch.zeros(10, dtype=torch.long), batch_size=3, shuffle=shuffle,
                         generator=torch.Generator().manual_seed(1), drop_last=True)
    assert len(loader) == 3
    batches = list(loader)
    assert [len(b) for b in batches] == [3, 3, 3]
    seen = _order(loader)
    assert len(seen) == 9 and len(set(seen)) == 9


def test_len_without_drop_last():
    assert len(ArrayLoader(_rows(10), batch_size=5)) == 2
    assert len(ArrayLoader(_rows(11), batch_size=5)) == 3
    assert len(ArrayLoader(_rows(3), batch_size=50)) == 1


def test_same_generator_seed_same_order_and_different_seed_differs():
    def order(seed):
        g = torch.Generator().manual_seed(seed)
        loader = ArrayLoader(_rows(50), batch_size=7, shuffle=True, generator=g)
        return _order(loader) + _order(loader)  # two epochs

    assert order(3) == order(3)
    assert order(3) != order(4)


def test_batch_index_matches_rows_and_targets():
    n = 17
    x = _rows(n)
    y = torch.arange(n) * 10
    loader = ArrayLoader(x, y, batch_size=5, shuffle=True, generator=torch.Generator().manual_seed(2))
    for b in loader:
        assert torch.equal(b.inputs[:, 0].long(), b.index)
        assert torch.equal(b.targets, b.index * 10)


def test_custom_index_is_carried():
    idx = torch.tensor([100, 101, 102, 103])
    loader = ArrayLoader(_rows(4), batch_size=2, index=idx)
    assert _order(loader) == [100, 101, 102, 103]


def test_unlabelled_are_appended_with_minus_one():
    x = np.ones((4, 2), dtype=np.float32)
    y = np.array([0, 1, 2, 3])
    extra = np.full((3, 2), 7.0)  # float64: cast to the labelled inputs' dtype
    loader = make_loader(x, y, batch_size=100, unlabelled=extra)
    assert isinstance(loader, ArrayLoader)
    (b,) = list(loader)
    assert len(b) == 7
    assert b.inputs.dtype == torch.float32
    assert b.targets.tolist() == [0, 1, 2, 3, -1, -1, -1]
    assert UNLABELLED == -1
    assert torch.equal(b.inputs[4:], torch.full((3, 2), 7.0))
    assert b.labelled.tolist() == [True] * 4 + [False] * 3


def test_unlabelled_without_labels_marks_everything_unlabelled():
    loader = make_loader(np.zeros((2, 3)), None, batch_size=10, unlabelled=np.zeros((2, 3)))
    (b,) = list(loader)
    assert b.targets.tolist() == [-1, -1, -1, -1]


def test_unlabelled_shape_mismatch():
    with pytest.raises(ValueError, match=r"unlabelled samples have shape \(4,\) but labelled ones \(3,\)"):
        make_loader(np.zeros((2, 3)), np.zeros(2), unlabelled=np.zeros((2, 4)))


def test_length_mismatch_errors():
    with pytest.raises(ValueError, match="5 samples but 4 labels"):
        make_loader(np.zeros((5, 2)), np.zeros(4))
    with pytest.raises(ValueError, match="5 inputs but 4 targets"):
        ArrayLoader(torch.zeros(5, 2), torch.zeros(4, dtype=torch.long))


def test_empty_and_bad_batch_size():
    with pytest.raises(ValueError, match="empty"):
        ArrayLoader(torch.zeros(0, 2))
    for bad in (0, -1, 2.5):
        with pytest.raises(ValueError, match="batch_size must be a positive integer"):
            ArrayLoader(torch.zeros(3, 2), batch_size=bad)


def test_dtypes_float64_to_float32_labels_to_int64():
    loader = make_loader(np.random.rand(6, 2), np.array([0.0, 1.0, 2.0, 0.0, 1.0, 2.0]), batch_size=6)
    (b,) = list(loader)
    assert b.inputs.dtype == torch.float32
    assert b.targets.dtype == torch.int64
    assert b.targets.tolist() == [0, 1, 2, 0, 1, 2]
    # integer inputs (e.g. token ids) are left alone; int32 labels become int64
    t = as_tensor(np.arange(4, dtype=np.int64), name="x")
    assert t.dtype == torch.int64
    assert as_tensor(np.arange(4, dtype=np.int32), name="y", labels=True).dtype == torch.int64
    assert as_tensor([1.5, 2.5], name="x").dtype == torch.float32


def test_non_integer_float_labels_rejected():
    with pytest.raises(ValueError, match="y must hold integer class labels"):
        make_loader(np.zeros((3, 2)), np.array([0.0, 0.5, 1.0]))
    with pytest.raises(ValueError, match="integer class labels"):
        as_tensor(torch.tensor([float("nan"), 1.0]), name="y", labels=True)


def test_one_hot_labels_rejected_with_advice():
    with pytest.raises(ValueError, match=r"shape \(3, 2\).*argmax"):
        make_loader(np.zeros((3, 2)), np.eye(2)[[0, 1, 0]])


def test_unsupported_type_rejected():
    with pytest.raises(TypeError, match="x must be a numpy array.*got str"):
        make_loader("data.npy")


def test_negatively_strided_arrays_are_accepted():
    x = np.arange(12, dtype=np.float32).reshape(4, 3)[:, ::-1]  # e.g. a horizontal flip
    y = np.array([3, 2, 1, 0])[::-1]
    (b,) = list(make_loader(x, y, batch_size=4))
    assert torch.equal(b.inputs, torch.from_numpy(x.copy()))
    assert b.targets.tolist() == [0, 1, 2, 3]


def test_tensordataset_fast_path():
    ds = TensorDataset(torch.randn(9, 2), torch.arange(9) % 3)
    loader = make_loader(ds, batch_size=4)
    assert isinstance(loader, ArrayLoader)
    assert len(loader) == 3
    b = next(iter(loader))
    assert torch.equal(b.inputs, ds.tensors[0][:4])
    assert torch.equal(b.targets, ds.tensors[1][:4])
    only_x = make_loader(TensorDataset(torch.randn(5, 2)), batch_size=5)
    assert isinstance(only_x, ArrayLoader) and next(iter(only_x)).targets is None


class _DictDataset(Dataset):
    def __len__(self):
        return 6

    def __getitem__(self, i):
        return {"inputs": torch.full((2,), float(i)), "label": i % 2}


def test_dataset_items_as_dicts_and_index():
    loader = make_loader(_DictDataset(), batch_size=4)
    assert isinstance(loader, DataLoaderAdapter)
    assert len(loader) == 2 and loader.num_samples == 6
    batches = list(loader)
    assert batches[0].inputs.shape == (4, 2)
    assert batches[0].targets.tolist() == [0, 1, 0, 1]
    assert batches[1].index.tolist() == [4, 5]
    for b in batches:
        assert torch.equal(b.inputs[:, 0].long(), b.index)


def test_dataset_rejects_separate_labels():
    with pytest.raises(ValueError, match="inside the Dataset"):
        make_loader(_DictDataset(), np.zeros(6))
    dl = DataLoader(_DictDataset(), batch_size=2)
    with pytest.raises(ValueError, match="inside the DataLoader"):
        make_loader(dl, np.zeros(6))


def test_dataloader_keeps_its_own_batching():
    dl = DataLoader(TensorDataset(torch.randn(10, 2), torch.zeros(10, dtype=torch.long)), batch_size=3)
    loader = make_loader(dl, batch_size=100)
    assert len(loader) == 4
    b = next(iter(loader))
    assert len(b) == 3 and b.targets.dtype == torch.int64 and b.index is None


def test_dict_without_inputs_key_is_explained():
    class Bad(Dataset):
        def __len__(self):
            return 2

        def __getitem__(self, i):
            return {"image": torch.zeros(2), "label": 0}

    with pytest.raises(ValueError, match=r"'inputs'.*\['image', 'label'\]"):
        list(make_loader(Bad(), batch_size=2))
