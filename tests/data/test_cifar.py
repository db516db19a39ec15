"""CIFAR pickle reader on tiny fake batches in the official format, and normalisation."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch

from kdistill.data import CIFAR_MEAN, CIFAR_STD, DatasetSplits, cifar_normalize, load_cifar, load_dataset
from kdistill.errors import DatasetNotFoundError

CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@pytest.fixture(autouse=True)
def _no_env(monkeypatch):
    monkeypatch.delenv("KDISTILL_DATA", raising=False)


def _batch(rng, n, num_classes, label_key, extra=None):
    return {
        b"batch_label": b"fake batch",
        b"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
        label_key: [int(v) for v in rng.integers(0, num_classes, size=n)],
        b"filenames": [f"img_{i}.png".encode() for i in range(n)],
        **(extra or {}),
    }


def _dump(obj, path, protocol):
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=protocol)


def write_cifar10(root, *, protocol=2, seed=0, sizes=(3, 2, 4, 1, 2), n_test=5):
    """Write ``root/cifar-10-batches-py`` and return ``(folder, batches, test)``."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    batches = [_batch(rng, n, 10, b"labels") for n in sizes]
    for i, b in enumerate(batches, start=1):
        _dump(b, folder / f"data_batch_{i}", protocol)
    test = _batch(rng, n_test, 10, b"labels")
    _dump(test, folder / "test_batch", protocol)
    meta = {b"num_cases_per_batch": 10000, b"label_names": [n.encode() for n in CIFAR10_NAMES], b"num_vis": 3072}
    _dump(meta, folder / "batches.meta", protocol)
    return folder, batches, test


def write_cifar100(root, *, protocol=2, seed=1, n_train=6, n_test=3):
    rng = np.random.default_rng(seed)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    train = _batch(rng, n_train, 100, b"fine_labels", {b"coarse_labels": [0] * n_train})
    test = _batch(rng, n_test, 100, b"fine_labels", {b"coarse_labels": [0] * n_test})
    _dump(train, folder / "train", protocol)
    _dump(test, folder / "test", protocol)
    meta = {
        b"fine_label_names": [f"fine{i}".encode() for i in range(100)],
        b"coarse_label_names": [f"coarse{i}".encode() for i in range(20)],
    }
    _dump(meta, folder / "meta", protocol)
    return folder, train, test


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
@pytest.mark.parametrize("point_at", ["folder", "parent"])
def test_cifar10_reads_batches_in_order(tmp_path, protocol, point_at):
    folder, batches, test = write_cifar10(tmp_path, protocol=protocol)
    splits = load_cifar("cifar10", folder if point_at == "folder" else tmp_path)
    assert isinstance(splits, DatasetSplits)
    assert splits.name == "cifar10"
    assert splits.classes == tuple(CIFAR10_NAMES)
    assert splits.x_train.shape == (12, 3, 32, 32) and splits.x_test.shape == (5, 3, 32, 32)
    assert splits.x_train.dtype == np.float32 and splits.y_train.dtype == np.int64
    assert 0.0 <= splits.x_train.min() and splits.x_train.max() <= 1.0
    # batches 1..5 in order
    assert splits.y_train.tolist() == [y for b in batches for y in b[b"labels"]]
    assert splits.y_test.tolist() == test[b"labels"]
    expected = np.concatenate([b[b"data"] for b in batches]).astype(np.float32) / 255
    np.testing.assert_allclose(splits.x_train.reshape(12, -1), expected, rtol=0, atol=1e-7)


def test_pixel_layout_is_channel_then_row_then_column(tmp_path):
    folder, batches, _ = write_cifar10(tmp_path)
    x = load_cifar("cifar10", folder).x_train
    row = batches[0][b"data"][1].astype(np.float32) / 255  # second image of batch 1
    assert x[1, 0, 0, 1] == pytest.approx(row[1])  # red, row 0, column 1
    assert x[1, 0, 1, 0] == pytest.approx(row[32])  # red, row 1, column 0
    assert x[1, 1, 0, 0] == pytest.approx(row[1024])  # green starts after 1024 reds
    assert x[1, 2, 31, 31] == pytest.approx(row[3071])  # last blue pixel


@pytest.mark.parametrize("point_at", ["folder", "parent"])
def test_cifar100_fine_labels_and_names(tmp_path, point_at):
    folder, train, test = write_cifar100(tmp_path)
    splits = load_cifar("CIFAR-100", folder if point_at == "folder" else tmp_path)
    assert splits.name == "cifar100"
    assert splits.num_classes == 100 and splits.classes[:2] == ("fine0", "fine1")
    assert splits.x_train.shape == (6, 3, 32, 32) and splits.x_test.shape == (3, 3, 32, 32)
    assert splits.y_train.tolist() == train[b"fine_labels"]
    assert splits.y_test.tolist() == test[b"fine_labels"]


def test_finds_files_via_env(tmp_path, monkeypatch):
    write_cifar10(tmp_path)
    monkeypatch.setenv("KDISTILL_DATA", str(tmp_path))
    assert len(load_cifar("cifar_10").y_train) == 12


def test_without_data_dir_every_folder_searched_is_listed_with_where_to_get_data(tmp_path, monkeypatch):
    env_dir = tmp_path / "env"
    monkeypatch.setenv("KDISTILL_DATA", str(env_dir))
    with pytest.raises(DatasetNotFoundError) as info:
        load_cifar("cifar100")
    assert isinstance(info.value, FileNotFoundError)
    msg = str(info.value)
    for folder in (env_dir, env_dir / "cifar-100-python"):
        assert f"{folder} (no such folder)" in msg
    assert "https://www.cs.toronto.edu/~kriz/cifar.html" in msg
    assert "cifar-100-python.tar.gz" in msg
    assert "never downloads" in msg
    assert "KDISTILL_DATA" in msg


def test_a_data_dir_that_does_not_exist_is_refused_not_replaced_by_kdistill_data(tmp_path, monkeypatch):
    write_cifar100(tmp_path / "env")  # a complete copy the call must not fall back to
    monkeypatch.setenv("KDISTILL_DATA", str(tmp_path / "env"))
    typo = tmp_path / "typo"
    with pytest.raises(DatasetNotFoundError) as info:
        load_cifar("cifar100", typo)
    assert isinstance(info.value, FileNotFoundError)
    msg = str(info.value)
    assert f"{typo}, does not exist" in msg  # what path
    assert "train, test, meta" in msg and "cifar-100-python/" in msg  # what was expected there
    assert "extract cifar-100-python.tar.gz" in msg and "https://www.cs.toronto.edu/~kriz/cifar.html" in msg
    assert "load_cifar(name, data_dir)" in msg
    assert str(tmp_path / "env" / "cifar-100-python") not in msg


def test_an_empty_data_dir_is_refused_even_when_kdistill_data_holds_the_dataset(tmp_path, monkeypatch):
    write_cifar10(tmp_path / "env")
    monkeypatch.setenv("KDISTILL_DATA", str(tmp_path / "env"))
    mine = tmp_path / "mine"
    mine.mkdir()
    with pytest.raises(DatasetNotFoundError) as info:
        load_cifar("cifar10", mine)
    msg = str(info.value)
    assert f"- {mine} (empty folder)" in msg
    assert "data_batch_1" in msg and "batches.meta" in msg
    assert "never replaced by another copy" in msg


def test_the_folder_read_is_the_source_the_same_as_through_load_dataset(tmp_path, monkeypatch):
    folder, _, _ = write_cifar10(tmp_path)
    direct = load_cifar("cifar10", tmp_path)
    assert direct.source == folder
    assert load_dataset("cifar10", data_dir=tmp_path).source == folder
    monkeypatch.setenv("KDISTILL_DATA", str(tmp_path))
    assert load_cifar("cifar10").source == folder


def test_incomplete_folder_lists_missing_files(tmp_path):
    folder, _, _ = write_cifar10(tmp_path)
    (folder / "data_batch_3").unlink()
    (folder / "batches.meta").unlink()
    with pytest.raises(DatasetNotFoundError, match=r"missing data_batch_3, batches\.meta"):
        load_cifar("cifar10", tmp_path)


def test_no_folder_given_says_so():
    with pytest.raises(DatasetNotFoundError, match="data_dir was not given"):
        load_cifar("cifar10")


def test_batch_of_the_other_cifar_is_refused(tmp_path):
    folder, _, _ = write_cifar10(tmp_path)
    rng = np.random.default_rng(0)
    _dump(_batch(rng, 2, 100, b"fine_labels"), folder / "data_batch_2", 2)
    with pytest.raises(ValueError, match=r"data_batch_2: has no b'labels' entry"):
        load_cifar("cifar10", folder)


def test_labels_out_of_range_are_refused(tmp_path):
    folder, _, _ = write_cifar10(tmp_path)
    rng = np.random.default_rng(0)
    bad = _batch(rng, 2, 10, b"labels")
    bad[b"labels"] = [3, 42]
    _dump(bad, folder / "test_batch", 2)
    with pytest.raises(ValueError, match=r"test_batch: labels must be in \[0, 10\), got values in \[3, 42\]"):
        load_cifar("cifar10", folder)


def test_wrong_image_shape_is_refused(tmp_path):
    folder, _, _ = write_cifar10(tmp_path)
    bad = {b"data": np.zeros((2, 784), np.uint8), b"labels": [0, 1]}
    _dump(bad, folder / "data_batch_1", 2)
    with pytest.raises(ValueError, match=r"uint8 array of shape \(N, 3072\), got uint8 \(2, 784\)"):
        load_cifar("cifar10", folder)


def test_reads_pickles_written_with_numpy_1(tmp_path):
    # The official files name numpy.core.multiarray (numpy 1); numpy 2 moved it to
    # numpy._core. Protocol 2 spells globals as text, so the old name can be written back.
    folder, batches, _ = write_cifar10(tmp_path, protocol=2)
    for f in folder.iterdir():
        raw = f.read_bytes().replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
        f.write_bytes(raw)
    assert b"numpy.core.multiarray" in (folder / "data_batch_1").read_bytes()
    splits = load_cifar("cifar10", folder)
    assert splits.y_train.tolist() == [y for b in batches for y in b[b"labels"]]


class _Exploit:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (os.mkdir, (self.target,))


def test_pickle_that_would_run_code_is_refused(tmp_path):
    folder, _, _ = write_cifar10(tmp_path)
    marker = tmp_path / "ran"
    _dump({b"data": _Exploit(str(marker)), b"labels": []}, folder / "data_batch_1", 2)
    with pytest.raises(ValueError, match="not a CIFAR python-pickle batch"):
        load_cifar("cifar10", folder)
    assert not marker.exists()


def test_unknown_name():
    with pytest.raises(ValueError, match="expected 'cifar10' or 'cifar100'"):
        load_cifar("cifar20", "/nonexistent")


# --------------------------------------------------------------------------- normalisation


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_normalize_numpy_and_torch(name):
    mean = np.asarray(CIFAR_MEAN[name], np.float32).reshape(1, 3, 1, 1)
    std = np.asarray(CIFAR_STD[name], np.float32).reshape(1, 3, 1, 1)
    x = np.concatenate([np.broadcast_to(mean, (1, 3, 4, 4)), np.broadcast_to(mean + std, (1, 3, 4, 4))])
    original = x.copy()
    out = cifar_normalize(x, name)
    assert out.dtype == np.float32 and out.shape == x.shape
    np.testing.assert_allclose(out[0], 0.0, atol=1e-6)
    np.testing.assert_allclose(out[1], 1.0, atol=1e-6)
    np.testing.assert_array_equal(x, original)  # not modified in place

    t = torch.from_numpy(x[1].copy()).double()  # (3, H, W), float64
    out_t = cifar_normalize(t, name)
    assert isinstance(out_t, torch.Tensor) and out_t.dtype == torch.float64
    torch.testing.assert_close(out_t, torch.ones_like(t), atol=1e-6, rtol=0)


def test_normalize_rejects_wrong_inputs():
    with pytest.raises(ValueError, match=r"got shape \(2, 1, 28, 28\)"):
        cifar_normalize(np.zeros((2, 1, 28, 28), np.float32), "cifar10")
    with pytest.raises(ValueError, match="divide uint8 images by 255"):
        cifar_normalize(np.zeros((2, 3, 32, 32), np.uint8), "cifar10")
    with pytest.raises(ValueError, match="divide uint8 images by 255"):
        cifar_normalize(torch.zeros(3, 32, 32, dtype=torch.uint8), "cifar100")
    with pytest.raises(ValueError, match="unknown CIFAR dataset"):
        cifar_normalize(np.zeros((3, 32, 32), np.float32), "mnist")
