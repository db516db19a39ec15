"""load_dataset search order and errors, split_labelled, digits, real Fashion-MNIST."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest

from kdistill.data import DATASETS, DatasetSplits, load_dataset, split_labelled
from kdistill.data import datasets as datasets_mod
from kdistill.errors import DatasetNotFoundError

FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
         "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def _idx(arr: np.ndarray) -> bytes:
    header = struct.pack(">BBBB", 0, 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return header + arr.astype(np.uint8).tobytes()


def write_fake_mnist(folder: Path, *, gz: bool = True, n_train: int = 20, n_test: int = 10):
    """Four tiny IDX files; pixel (i, 0, 0) of sample i encodes its index, label i % 10."""
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for split, n in (("train", n_train), ("t10k", n_test)):
        images = np.zeros((n, 28, 28), dtype=np.uint8)
        images[:, 0, 0] = np.arange(n)
        labels = (np.arange(n) % 10).astype(np.uint8)
        arrays[f"{split}-images-idx3-ubyte"] = images
        arrays[f"{split}-labels-idx1-ubyte"] = labels
    for stem, arr in arrays.items():
        data = _idx(arr)
        if gz:
            (folder / f"{stem}.gz").write_bytes(gzip.compress(data))
        else:
            (folder / stem).write_bytes(data)
    return arrays


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """No test sees the machine's real datasets or the caller's KDISTILL_DATA."""
    monkeypatch.delenv("KDISTILL_DATA", raising=False)
    monkeypatch.setattr(datasets_mod, "DEBIAN_DATASETS", tmp_path / "debian")


def check_fake(splits: DatasetSplits, arrays, name="fashion_mnist"):
    assert splits.name == name
    assert splits.x_train.shape == (20, 1, 28, 28) and splits.x_train.dtype == np.float32
    assert splits.x_test.shape == (10, 1, 28, 28)
    assert splits.y_train.dtype == np.int64 and splits.y_train.shape == (20,)
    np.testing.assert_allclose(splits.x_train[:, 0, 0, 0] * 255, np.arange(20), atol=1e-4)
    np.testing.assert_array_equal(splits.y_test, arrays["t10k-labels-idx1-ubyte"])
    assert splits.input_shape == (1, 28, 28)
    assert splits.num_classes == 10


@pytest.mark.parametrize("gz", [True, False], ids=["gz", "raw"])
def test_finds_files_in_data_dir(tmp_path, gz):
    arrays = write_fake_mnist(tmp_path / "d", gz=gz)
    splits = load_dataset("fashion_mnist", data_dir=tmp_path / "d")
    check_fake(splits, arrays)
    assert splits.classes[0] == "T-shirt/top" and splits.classes[9] == "Ankle boot"


def test_finds_files_via_env(tmp_path, monkeypatch):
    arrays = write_fake_mnist(tmp_path / "env")
    monkeypatch.setenv("KDISTILL_DATA", str(tmp_path / "env"))
    check_fake(load_dataset("fashion_mnist"), arrays)


def test_data_dir_comes_before_env(tmp_path, monkeypatch):
    write_fake_mnist(tmp_path / "env", n_train=30)
    write_fake_mnist(tmp_path / "d", n_train=20)
    monkeypatch.setenv("KDISTILL_DATA", str(tmp_path / "env"))
    assert len(load_dataset("fashion_mnist", data_dir=tmp_path / "d").x_train) == 20
    assert len(load_dataset("fashion_mnist").x_train) == 30


@pytest.mark.parametrize("sub", ["fashion_mnist", "fashion-mnist", "FashionMNIST/raw"])
def test_finds_subfolder_layouts(tmp_path, sub):
    arrays = write_fake_mnist(tmp_path / "root" / sub)
    check_fake(load_dataset("fashion_mnist", data_dir=tmp_path / "root"), arrays)


def test_finds_debian_folder(tmp_path):
    arrays = write_fake_mnist(tmp_path / "debian" / "fashion-mnist")
    check_fake(load_dataset("fashion_mnist"), arrays)


@pytest.mark.parametrize("spelling", ["Fashion-MNIST", "FASHION_MNIST", "fashion-mnist", "FashionMNIST"])
def test_name_spellings(tmp_path, spelling):
    arrays = write_fake_mnist(tmp_path / "d")
    check_fake(load_dataset(spelling, data_dir=tmp_path / "d"), arrays)


def test_mnist_and_kmnist_classes(tmp_path):
    write_fake_mnist(tmp_path / "root" / "MNIST" / "raw")
    write_fake_mnist(tmp_path / "root" / "kmnist")
    assert load_dataset("mnist", data_dir=tmp_path / "root").classes == tuple("0123456789")
    kmnist = load_dataset("KMNIST", data_dir=tmp_path / "root")
    assert kmnist.classes[:4] == ("o", "ki", "su", "tsu")


def test_unknown_name_lists_known_and_suggests():
    with pytest.raises(ValueError, match=r"'fashon_mnist'.*fashion_mnist, mnist, kmnist, digits.*"
                                         r"Did you mean 'fashion_mnist'"):
        load_dataset("fashon_mnist")
    assert DATASETS == ("fashion_mnist", "mnist", "kmnist", "digits", "cifar10", "cifar100")


def test_incomplete_folder_does_not_count(tmp_path):
    folder = tmp_path / "d"
    write_fake_mnist(folder)
    (folder / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DatasetNotFoundError, match=r"missing t10k-labels-idx1-ubyte\[\.gz\]"):
        load_dataset("fashion_mnist", data_dir=folder)


def test_not_found_lists_every_folder_and_how_to_get_data(tmp_path, monkeypatch):
    env = tmp_path / "env"
    env.mkdir()
    monkeypatch.setenv("KDISTILL_DATA", str(env))
    with pytest.raises(DatasetNotFoundError) as e:
        load_dataset("fashion_mnist")  # (a folder named with data_dir is the only one read: test_data_dir.py)

    msg = str(e.value)
    expected = [
        env, env / "fashion_mnist", env / "fashion-mnist", env / "FashionMNIST" / "raw",
        tmp_path / "debian" / "fashion-mnist",
    ]
    positions = [msg.index(f"- {p} (") for p in expected]
    assert positions == sorted(positions)  # listed in search order
    assert "apt-get install dataset-fashion-mnist" in msg
    assert "--data-dir" in msg and "KDISTILL_DATA" in msg
    assert isinstance(e.value, FileNotFoundError)


def test_corrupt_labels_are_rejected(tmp_path):
    folder = tmp_path / "d"
    write_fake_mnist(folder)
    (folder / "train-labels-idx1-ubyte.gz").write_bytes(
        gzip.compress(_idx(np.full(20, 42, dtype=np.uint8))))
    with pytest.raises(ValueError, match=r"labels must be in \[0, 10\).*42"):
        load_dataset("fashion_mnist", data_dir=folder)


# ------------------------------------------------------------------- split_labelled


def _toy(n_per_class=(30, 30, 30, 5)):
    y = np.concatenate([np.full(n, c) for c, n in enumerate(n_per_class)])
    y = np.random.default_rng(1).permutation(y)
    x = np.arange(len(y) * 2, dtype=np.float32).reshape(len(y), 2)  # row i = [2i, 2i+1]
    return x, y


def test_split_labelled_is_balanced_disjoint_and_complete():
    x, y = _toy((30, 30, 30, 30))
    x_l, y_l, x_r, y_r = split_labelled(x, y, 40, seed=3)
    assert np.bincount(y_l).tolist() == [10, 10, 10, 10]
    ids_l, ids_r = x_l[:, 0] // 2, x_r[:, 0] // 2
    assert not set(ids_l) & set(ids_r)
    assert sorted(np.concatenate([ids_l, ids_r])) == list(range(120))
    np.testing.assert_array_equal(y[ids_l.astype(int)], y_l)  # labels stay with samples
    np.testing.assert_array_equal(y[ids_r.astype(int)], y_r)


def test_split_labelled_small_class_gives_all_it_has():
    x, y = _toy((30, 30, 30, 5))
    _, y_l, _, _ = split_labelled(x, y, 41)
    assert np.bincount(y_l).tolist() == [12, 12, 12, 5]
    _, y_l, _, _ = split_labelled(x, y, 6)  # fewer than a full round
    counts = np.bincount(y_l, minlength=4)
    assert counts.sum() == 6 and counts.max() - counts.min() <= 1


def test_split_labelled_is_deterministic_per_seed():
    x, y = _toy()
    a = split_labelled(x, y, 20, seed=7)
    b = split_labelled(x, y, 20, seed=7)
    c = split_labelled(x, y, 20, seed=8)
    for u, v in zip(a, b):
        np.testing.assert_array_equal(u, v)
    assert not np.array_equal(a[0], c[0])


def test_split_labelled_unstratified():
    x, y = _toy()
    x_l, y_l, x_r, _ = split_labelled(x, y, 10, stratified=False, seed=0)
    assert len(x_l) == 10 and len(x_r) == len(x) - 10


@pytest.mark.parametrize("n", [0, -1, 96])
def test_split_labelled_rejects_out_of_range(n):
    x, y = _toy()  # 95 samples
    with pytest.raises(ValueError, match=rf"\[1, 95\].*got {n}"):
        split_labelled(x, y, n)


# ------------------------------------------------------------------- digits / real data


def test_digits():
    pytest.importorskip("sklearn")
    d = load_dataset("digits")
    assert d.x_train.shape[1:] == (1, 8, 8) and d.x_train.dtype == np.float32
    assert len(d.x_train) + len(d.x_test) == 1797
    assert abs(len(d.x_test) / 1797 - 0.2) < 0.01
    assert 0.0 <= d.x_train.min() and d.x_train.max() <= 1.0 and d.x_train.max() == 1.0
    assert set(np.unique(d.y_test)) == set(range(10))
    again = load_dataset("Digits")
    np.testing.assert_array_equal(d.y_test, again.y_test)
    np.testing.assert_array_equal(d.x_train, again.x_train)


def test_digits_without_sklearn_says_how_to_install(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name.startswith("sklearn"):
            raise ImportError("No module named 'sklearn'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(ImportError, match=r"pip install kdistill\[digits\]"):
        load_dataset("digits")


REAL = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.skipif(not REAL.is_dir(), reason="Debian's dataset-fashion-mnist is not installed")
def test_real_fashion_mnist(monkeypatch):
    monkeypatch.setattr(datasets_mod, "DEBIAN_DATASETS", REAL.parent)
    d = load_dataset("Fashion-MNIST")
    assert d.x_train.shape == (60000, 1, 28, 28) and d.x_test.shape == (10000, 1, 28, 28)
    assert d.y_train.shape == (60000,) and d.y_test.shape == (10000,)
    assert d.x_train.dtype == np.float32 and d.y_train.dtype == np.int64
    assert d.x_train.min() == 0.0 and d.x_train.max() == 1.0
    assert set(np.unique(d.y_train)) == set(range(10)) == set(np.unique(d.y_test))
    assert np.bincount(d.y_train).tolist() == [6000] * 10
