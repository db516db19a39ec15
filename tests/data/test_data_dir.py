"""A data folder the user names is used or refused, never silently replaced by another
copy of the dataset; and the folder actually read is reported in ``DatasetSplits.source``."""

from __future__ import annotations

import pickle
import struct
from pathlib import Path

import numpy as np
import pytest

from kdistill.config import ExperimentConfig
from kdistill.data import DatasetSplits, load_dataset
from kdistill.data import datasets as datasets_mod
from kdistill.errors import DatasetNotFoundError

FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
         "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def idx_bytes(arr: np.ndarray) -> bytes:
    """An uint8 IDX file, written independently of the reader: magic, code 0x08, dims, data."""
    header = struct.pack(">BBBB", 0, 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return header + arr.astype(np.uint8).tobytes()


def write_idx_dataset(folder: Path, *, n_train: int, n_test: int = 3, marker: int = 0) -> None:
    """Four tiny IDX files; every pixel of every image is ``marker``, so tests can tell
    which copy was read."""
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("t10k", n_test)):
        (folder / f"{split}-images-idx3-ubyte").write_bytes(idx_bytes(np.full((n, 4, 4), marker, np.uint8)))
        (folder / f"{split}-labels-idx1-ubyte").write_bytes(idx_bytes(np.arange(n, dtype=np.uint8) % 10))


@pytest.fixture
def debian(tmp_path, monkeypatch):
    """A stand-in for Debian's /usr/share/datasets holding a complete Fashion-MNIST (the
    copy the bug silently fell back to), and no $KDISTILL_DATA."""
    monkeypatch.delenv("KDISTILL_DATA", raising=False)
    root = tmp_path / "debian"
    write_idx_dataset(root / "fashion-mnist", n_train=7, marker=200)
    monkeypatch.setattr(datasets_mod, "DEBIAN_DATASETS", root)
    return root / "fashion-mnist"


# --------------------------------------------------------------------------- refused


def test_empty_data_dir_is_refused_not_replaced_by_debians_copy(tmp_path, debian):
    folder = tmp_path / "mine"
    folder.mkdir()
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset("fashion_mnist", data_dir=folder)
    msg = str(info.value)
    assert str(folder) in msg
    assert "empty" in msg
    for stem in FILES:  # the files expected, all missing
        assert stem in msg
    assert "--data-dir" in msg and "KDISTILL_DATA" in msg  # how to fix: drop it to use the others
    assert "apt-get install dataset-fashion-mnist" in msg
    assert isinstance(info.value, FileNotFoundError)


def test_data_dir_that_does_not_exist_is_refused(tmp_path, debian):
    folder = tmp_path / "typo"
    with pytest.raises(DatasetNotFoundError, match=r"does not exist") as info:
        load_dataset("fashion_mnist", data_dir=folder)
    assert str(folder) in str(info.value)


def test_incomplete_data_dir_names_the_missing_files(tmp_path, debian):
    folder = tmp_path / "mine"
    write_idx_dataset(folder, n_train=5)
    (folder / "t10k-images-idx3-ubyte").unlink()
    (folder / "train-labels-idx1-ubyte").unlink()
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset("fashion_mnist", data_dir=folder)
    msg = str(info.value)
    missing_line = next(line for line in msg.splitlines() if f"- {folder} (" in line)
    assert "missing train-labels-idx1-ubyte[.gz], t10k-images-idx3-ubyte[.gz]" in missing_line
    assert "has train-images-idx3-ubyte, t10k-labels-idx1-ubyte" in missing_line
    assert f"put the missing files into {folder} (from https:" in msg


def test_incomplete_data_dir_is_refused_even_when_env_holds_the_dataset(tmp_path, monkeypatch, debian):
    env = tmp_path / "env"
    write_idx_dataset(env, n_train=9)
    monkeypatch.setenv("KDISTILL_DATA", str(env))
    folder = tmp_path / "mine"
    folder.mkdir()
    with pytest.raises(DatasetNotFoundError, match=str(folder)):
        load_dataset("fashion_mnist", data_dir=folder)


def test_incomplete_subfolder_is_named_too(tmp_path, debian):
    folder = tmp_path / "mine"
    write_idx_dataset(folder / "FashionMNIST" / "raw", n_train=5)
    (folder / "FashionMNIST" / "raw" / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset("fashion_mnist", data_dir=folder)
    assert f"{folder / 'FashionMNIST' / 'raw'} (missing t10k-labels-idx1-ubyte[.gz]" in str(info.value)


def test_runner_data_loading_honours_data_dir(tmp_path, debian):
    from kdistill.experiment import load_data

    folder = tmp_path / "mine"
    folder.mkdir()
    config = ExperimentConfig.model_validate({"data": {"dataset": "fashion_mnist", "data_dir": str(folder)}})
    with pytest.raises(DatasetNotFoundError, match=str(folder)):
        load_data(config)


def test_empty_data_dir_for_cifar_is_refused_even_when_env_holds_it(tmp_path, monkeypatch):
    env = tmp_path / "env" / "cifar-10-batches-py"
    env.mkdir(parents=True)
    for name in ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5",
                 "test_batch", "batches.meta"):
        (env / name).write_bytes(pickle.dumps({}))  # never read: the named folder comes first
    monkeypatch.setenv("KDISTILL_DATA", str(tmp_path / "env"))
    folder = tmp_path / "mine"
    folder.mkdir()
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset("cifar10", data_dir=folder)
    msg = str(info.value)
    assert str(folder) in msg and "empty" in msg
    assert "data_batch_1" in msg and "batches.meta" in msg
    assert "cifar-10-batches-py" in msg


# --------------------------------------------------------------------------- read, and said so


def test_valid_data_dir_is_read_and_named_in_source(tmp_path, debian):
    folder = tmp_path / "mine"
    write_idx_dataset(folder, n_train=5, marker=51)
    splits = load_dataset("fashion_mnist", data_dir=folder)
    assert len(splits.x_train) == 5 and len(splits.x_test) == 3  # not Debian's 7
    np.testing.assert_allclose(splits.x_train, 51 / 255)
    assert splits.input_shape == (1, 4, 4)
    assert splits.source == folder


def test_source_names_the_subfolder_actually_read(tmp_path, debian):
    write_idx_dataset(tmp_path / "root" / "fashion-mnist", n_train=4)
    assert load_dataset("fashion_mnist", data_dir=tmp_path / "root").source == tmp_path / "root" / "fashion-mnist"


def test_env_folder_stays_a_search_location_and_source_says_which_was_read(tmp_path, monkeypatch, debian):
    env = tmp_path / "env"
    env.mkdir()
    monkeypatch.setenv("KDISTILL_DATA", str(env))
    fallback = load_dataset("fashion_mnist")  # $KDISTILL_DATA lacks it: Debian's copy, and said so
    assert len(fallback.x_train) == 7 and fallback.source == debian
    write_idx_dataset(env, n_train=9)
    found = load_dataset("fashion_mnist")
    assert len(found.x_train) == 9 and found.source == env


def test_source_defaults_to_none_for_other_constructors():
    x, y = np.zeros((2, 1, 2, 2), np.float32), np.zeros(2, np.int64)
    splits = DatasetSplits("toy", x, y, x, y, ("a",))
    assert splits.source is None
    assert "source" not in repr(DatasetSplits("toy", x, y, x, y, ("a",)))  # repr unchanged without one
