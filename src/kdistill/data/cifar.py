"""CIFAR-10 and CIFAR-100 from the "python version" pickle batches, from disk only.

The archives from https://www.cs.toronto.edu/~kriz/cifar.html unpack to::

    cifar-10-batches-py/   data_batch_1 ... data_batch_5, test_batch, batches.meta
    cifar-100-python/      train, test, meta

Each batch is a pickled dict: ``b"data"`` a ``(N, 3072)`` uint8 array (1024 red, then
1024 green, then 1024 blue values, each a 32x32 image row by row), ``b"labels"``
(CIFAR-10) or ``b"fine_labels"`` (CIFAR-100) a list of N ints; the meta file holds the
class names (``b"label_names"``, ``b"fine_label_names"``).

The files are unpickled with an unpickler that only builds numpy arrays, so a file that
is not a CIFAR batch cannot run code while it is read. Nothing is ever downloaded.
"""

from __future__ import annotations

import importlib
import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import DatasetNotFoundError
from .base import DATA_ENV, DatasetSplits, data_roots, named_folder_message

__all__ = ["CIFAR_MEAN", "CIFAR_STD", "cifar_normalize", "load_cifar"]

_URL = "https://www.cs.toronto.edu/~kriz/cifar.html"

#: Per-channel (R, G, B) mean of the training images, pixel values in [0, 1].
CIFAR_MEAN: dict[str, tuple[float, float, float]] = {
    "cifar10": (0.4914, 0.4822, 0.4465),
    "cifar100": (0.5071, 0.4867, 0.4408),
}
#: Per-channel (R, G, B) standard deviation of the training images (over all pixels; the
#: CIFAR-100 values are those of the CRD/RepDistiller recipe).
CIFAR_STD: dict[str, tuple[float, float, float]] = {
    "cifar10": (0.2470, 0.2435, 0.2616),
    "cifar100": (0.2675, 0.2565, 0.2761),
}


@dataclass(frozen=True)
class _CifarSpec:
    folder: str  # what the official archive unpacks to
    archive: str  # the archive's file name
    train: tuple[str, ...]
    test: str
    meta: str
    label_key: bytes
    names_key: bytes
    num_classes: int


_SPECS = {
    "cifar10": _CifarSpec(
        folder="cifar-10-batches-py",
        archive="cifar-10-python.tar.gz",
        train=tuple(f"data_batch_{i}" for i in range(1, 6)),
        test="test_batch",
        meta="batches.meta",
        label_key=b"labels",
        names_key=b"label_names",
        num_classes=10,
    ),
    "cifar100": _CifarSpec(
        folder="cifar-100-python",
        archive="cifar-100-python.tar.gz",
        train=("train",),
        test="test",
        meta="meta",
        label_key=b"fine_labels",
        names_key=b"fine_label_names",
        num_classes=100,
    ),
}


def _canonical(name: str) -> str:
    """``"CIFAR-10"``, ``"cifar_10"`` -> ``"cifar10"``; ValueError for other names."""
    if not isinstance(name, str):
        raise TypeError(f"CIFAR dataset name must be a string, got {type(name).__name__}")
    key = name.strip().lower().replace("-", "").replace("_", "").replace(" ", "")
    if key not in _SPECS:
        raise ValueError(f"unknown CIFAR dataset {name!r}; expected 'cifar10' or 'cifar100'")
    return key


# --------------------------------------------------------------------------- reading

# The only globals a CIFAR batch may name: numpy's array reconstruction (numpy 1 and 2
# spellings; ``_frombuffer`` for pickle protocol 5) and the codec that pickle protocol 2
# uses for bytes.
_ALLOWED_GLOBALS = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    *((f"numpy.{core}.multiarray", name) for core in ("core", "_core") for name in ("_reconstruct", "scalar")),
    *((f"numpy.{core}.numeric", "_frombuffer") for core in ("core", "_core")),
    ("_codecs", "encode"),
}


class _ArrayUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(
                f"refusing to load {module}.{name}: a CIFAR batch holds only numpy arrays, lists and bytes"
            )
        if module.startswith("numpy.core."):  # files written with numpy 1, read with numpy 2
            try:
                importlib.import_module("numpy._core")
                module = "numpy._core." + module[len("numpy.core."):]
            except ImportError:
                pass
        return super().find_class(module, name)


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            obj = _ArrayUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, ImportError) as e:
        raise ValueError(
            f"{path}: not a CIFAR python-pickle batch ({type(e).__name__}: {e}); "
            f"re-extract the python version of the archive from {_URL}"
        ) from e
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a pickled dict, got {type(obj).__name__}; is this a CIFAR batch?")
    return obj


def _get(batch: dict, key: bytes, path: Path):
    # written by Python 2 (the official files) keys are bytes; by Python 3, maybe str
    for k in (key, key.decode()):
        if k in batch:
            return batch[k]
    raise ValueError(
        f"{path}: has no {key!r} entry (it has {sorted(map(repr, batch))}); is this a batch of the other CIFAR?"
    )


def _read_batch(path: Path, spec: _CifarSpec) -> tuple[np.ndarray, np.ndarray]:
    """One batch file -> ``(N, 3, 32, 32)`` uint8 images and ``(N,)`` int64 labels."""
    batch = _unpickle(path)
    data = np.asarray(_get(batch, b"data", path))
    labels = np.asarray(_get(batch, spec.label_key, path))
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError(
            f"{path}: b'data' must be a uint8 array of shape (N, 3072), got {data.dtype} {data.shape}"
        )
    if labels.ndim != 1 or len(labels) != len(data) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"{path}: {spec.label_key!r} must hold one integer label per image ({len(data)}), "
            f"got {labels.dtype} of shape {labels.shape}"
        )
    if len(labels) and (labels.min() < 0 or labels.max() >= spec.num_classes):
        raise ValueError(
            f"{path}: labels must be in [0, {spec.num_classes}), got values in "
            f"[{labels.min()}, {labels.max()}]; is this file from the other CIFAR?"
        )
    # (N, 3072) -> (N, 3, 32, 32): channel-major, each channel row by row
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def _read_split(paths: list[Path], spec: _CifarSpec) -> tuple[np.ndarray, np.ndarray]:
    parts = [_read_batch(p, spec) for p in paths]
    images = np.concatenate([x for x, _ in parts]) if len(parts) > 1 else parts[0][0]
    labels = np.concatenate([y for _, y in parts])
    # uint8 -> float32 in [0, 1]
    x = images.astype(np.float32)
    x *= np.float32(1.0 / 255.0)
    return x, labels


def _read_classes(path: Path, spec: _CifarSpec) -> tuple[str, ...]:
    names = _get(_unpickle(path), spec.names_key, path)
    classes = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names)
    if len(classes) != spec.num_classes:
        raise ValueError(
            f"{path}: {spec.names_key!r} must list {spec.num_classes} class names, got {len(classes)}"
        )
    return classes


# --------------------------------------------------------------------------- loading


def _layouts(spec: _CifarSpec, root: Path) -> list[Path]:
    """Where under ``root`` the batches may lie: the folder itself, or what the archive
    extracts to (``cifar-10-batches-py/``, ``cifar-100-python/``)."""
    return [root, root / spec.folder]


def _files(folder: Path, needed: list[str]) -> dict[str, Path | None]:
    """``{file: path or None}`` of the batches and meta file in ``folder``."""
    return {f: (folder / f if (folder / f).is_file() else None) for f in needed}


def _read_folder(key: str, spec: _CifarSpec, folder: Path) -> DatasetSplits:
    x_train, y_train = _read_split([folder / f for f in spec.train], spec)
    x_test, y_test = _read_split([folder / spec.test], spec)
    classes = _read_classes(folder / spec.meta, spec)
    return DatasetSplits(
        name=key, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test, classes=classes, source=folder
    )


def load_cifar(name: str, data_dir: str | os.PathLike | None = None) -> DatasetSplits:
    """Load CIFAR-10 or CIFAR-100 from the python-pickle batches (never downloads).

    A ``data_dir`` that is given is the only place looked in: the folder itself, then
    ``data_dir/cifar-10-batches-py`` (``cifar-100-python``); pass the extracted folder or
    the folder it was extracted into. When it does not hold the files, the error names it
    and the files missing, and ``$KDISTILL_DATA`` is *not* used in its place. Without
    ``data_dir``, ``$KDISTILL_DATA`` (and its sub-folder of that name) is searched.
    ``load_dataset("cifar10", data_dir)`` is this same call.

    Args:
        name: ``"cifar10"`` or ``"cifar100"`` (case, ``-`` and ``_`` ignored:
            ``"CIFAR-10"``).
        data_dir: folder holding the batches, or its parent; ``None``: search
            ``$KDISTILL_DATA``.

    Returns:
        :class:`DatasetSplits` with ``(N, 3, 32, 32)`` float32 images in ``[0, 1]``
        (50000 train, 10000 test for the full datasets), int64 labels (CIFAR-100: the
        100 fine labels), the class names of the meta file, and ``source`` the folder read.

    Raises:
        ValueError: for another dataset name, or a file that is not a batch of this
            dataset (wrong keys, shapes or label range).
        DatasetNotFoundError: (a ``FileNotFoundError``) if ``data_dir`` is given and does
            not hold all the files (the message names the folder, what it lacks and how
            to get the data), or if no folder searched holds them (it lists every folder
            tried).
    """
    key = _canonical(name)
    spec = _SPECS[key]
    needed = [*spec.train, spec.test, spec.meta]
    if data_dir is not None:  # the user named a folder: read it, or say why not
        root = Path(data_dir).expanduser()
        checked = [(folder, _files(folder, needed)) for folder in _layouts(spec, root)]
        for folder, files in checked:
            if all(files.values()):
                return _read_folder(key, spec, folder)
        raise DatasetNotFoundError(named_folder_message(
            key, root, checked,
            needed=f"the python-version batches {', '.join(needed)}",
            layouts=f"{spec.folder}/ (what {spec.archive} extracts to)",
            fill=f"extract {spec.archive} (the python version, from {_URL}) into {{folder}}",
            elsewhere=f"${DATA_ENV}",
            how="--data-dir / data.data_dir / load_dataset(data_dir=...) / load_cifar(name, data_dir)",
        ))

    # No folder named: search $KDISTILL_DATA.
    tried = []
    for folder in dict.fromkeys(f for root in data_roots(None) for f in _layouts(spec, root)):
        missing = [f for f, path in _files(folder, needed).items() if path is None]
        if not missing:
            return _read_folder(key, spec, folder)
        if not folder.is_dir():
            tried.append(f"{folder} (no such folder)")
        elif len(missing) == len(needed):
            tried.append(f"{folder} (none of the files)")
        else:
            tried.append(f"{folder} (missing {', '.join(missing)})")
    raise DatasetNotFoundError(_not_found_message(key, spec, needed, tried))


def _not_found_message(key: str, spec: _CifarSpec, needed: list[str], tried: list[str]) -> str:
    lines = [f"dataset {key!r} not found: no folder holds all of {', '.join(needed)}."]
    if tried:
        lines += ["Folders tried, in order:", *(f"  - {t}" for t in tried)]
    else:
        lines.append(f"No folder to look in: data_dir was not given and ${DATA_ENV} is not set.")
    lines += [
        "To get the data (kdistill never downloads anything):",
        f"  - download {spec.archive} (the python version) from {_URL}",
        f"  - extract it (tar xzf {spec.archive}) into a folder DIR, which then holds {spec.folder}/,",
        f"    and pass --data-dir DIR (load_cifar({key!r}, DIR)) or set {DATA_ENV}=DIR",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------- normalisation


def cifar_normalize(x, name: str):
    """Standardise images per channel with the CIFAR training mean and std.

    ``(x - mean[c]) / std[c]`` for each of the R, G, B channels, with
    :data:`CIFAR_MEAN` and :data:`CIFAR_STD` of ``name``.

    Args:
        x: ``(N, 3, H, W)`` or ``(3, H, W)`` images in ``[0, 1]``, a numpy array or a torch
            tensor (floating point).
        name: ``"cifar10"`` or ``"cifar100"``.

    Returns:
        A new array or tensor of ``x``'s type, dtype and device (``x`` is not modified).

    Raises:
        ValueError: for another dataset name, or if ``x`` has no 3-channel axis at
            position -3, or is not floating point.
    """
    key = _canonical(name)
    shape = tuple(x.shape)
    if len(shape) not in (3, 4) or shape[-3] != 3:
        raise ValueError(
            f"x must be (N, 3, H, W) or (3, H, W) RGB images, got shape {shape}; "
            "CIFAR normalisation needs the 3 colour channels at axis -3"
        )
    if isinstance(x, np.ndarray):
        if not np.issubdtype(x.dtype, np.floating):
            raise ValueError(f"x must be floating point in [0, 1], got dtype {x.dtype}; divide uint8 images by 255")
        mean = np.asarray(CIFAR_MEAN[key], dtype=x.dtype).reshape(3, 1, 1)
        std = np.asarray(CIFAR_STD[key], dtype=x.dtype).reshape(3, 1, 1)
        return (x - mean) / std
    import torch

    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a numpy array or a torch tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(f"x must be floating point in [0, 1], got dtype {x.dtype}; divide uint8 images by 255")
    mean = torch.tensor(CIFAR_MEAN[key], dtype=x.dtype, device=x.device).view(3, 1, 1)
    std = torch.tensor(CIFAR_STD[key], dtype=x.dtype, device=x.device).view(3, 1, 1)
    return (x - mean) / std
