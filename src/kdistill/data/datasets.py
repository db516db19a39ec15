"""Load the small image-classification datasets by name, from disk only.

``load_dataset("fashion_mnist", data_dir=DIR)`` reads the four IDX files from ``DIR`` and
nowhere else: a folder the user names is used or refused, never silently replaced by
another copy. Without ``data_dir`` it searches ``$KDISTILL_DATA``, then where Debian's
``dataset-fashion-mnist`` package installs them. Either way ``DatasetSplits.source`` names
the folder actually read. Nothing is ever downloaded: when the files are not found, the
error lists every folder tried and how to get the data.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import DatasetNotFoundError
from .base import DATA_ENV, DatasetSplits, data_roots, named_folder_message
from .cifar import load_cifar
from .idx import load_idx_images, load_idx_labels

__all__ = [
    "DATASETS",
    "DEBIAN_DATASETS",
    "DatasetSplits",
    "load_dataset",
    "split_labelled",
]

#: Where Debian's ``dataset-*`` packages install their files.
DEBIAN_DATASETS = Path("/usr/share/datasets")



@dataclass(frozen=True)
class _IdxSpec:
    debian_name: str  # folder under DEBIAN_DATASETS
    torchvision_name: str  # torchvision's folder: root/<name>/raw
    url: str  # official page with the four IDX files
    apt_package: str | None  # Debian/Ubuntu package, if there is one
    classes: tuple[str, ...]


_IDX_DATASETS: dict[str, _IdxSpec] = {
    "fashion_mnist": _IdxSpec(
        debian_name="fashion-mnist",
        torchvision_name="FashionMNIST",
        url="https://github.com/zalandoresearch/fashion-mnist",
        apt_package="dataset-fashion-mnist",
        classes=(
            "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
            "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
        ),
    ),
    "mnist": _IdxSpec(
        debian_name="mnist",
        torchvision_name="MNIST",
        url="https://yann.lecun.com/exdb/mnist/",
        apt_package=None,
        classes=tuple(str(i) for i in range(10)),
    ),
    "kmnist": _IdxSpec(
        debian_name="kmnist",
        torchvision_name="KMNIST",
        url="https://github.com/rois-codh/kmnist",
        apt_package=None,
        classes=("o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo"),
    ),
}

_DIGITS_CLASSES = tuple(str(i) for i in range(10))

#: Names :func:`load_dataset` knows.
DATASETS: tuple[str, ...] = (*_IDX_DATASETS, "digits", "cifar10", "cifar100")

#: The four IDX files of an MNIST-style dataset, each raw or with ``.gz``.
_IDX_FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}


# --------------------------------------------------------------------------- splits


def split_labelled(
    x: np.ndarray,
    y: np.ndarray,
    n_labelled: int,
    *,
    seed: int = 0,
    stratified: bool = True,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Pick ``n_labelled`` samples to keep labels for; return them and the rest.

    With ``stratified=True`` the labelled samples are spread over the classes as evenly
    as possible (a class with fewer samples than its share gives all it has, and the
    others make up the difference). The choice depends only on ``y``, ``n_labelled`` and
    ``seed`` (``numpy.random.default_rng``). Both parts keep the original sample order.

    Args:
        x: ``(N, ...)`` samples.
        y: ``(N,)`` integer labels.
        n_labelled: how many samples go to the labelled part, in ``[1, N]``.
        seed: seed of the random choice.
        stratified: balance the labelled part over classes; ``False`` draws uniformly.

    Returns:
        ``(x_labelled, y_labelled, x_rest, y_rest)``; the two parts are disjoint and
        together hold every sample once.

    Raises:
        ValueError: if ``x`` and ``y`` differ in length, ``y`` is not 1-D, or
            ``n_labelled`` is outside ``[1, N]``.
        TypeError: if ``n_labelled`` is not an integer.
    """
    y = np.asarray(y)
    if y.ndim != 1:
        raise ValueError(f"y must be a 1-D array of labels, got shape {y.shape}")
    n = len(y)
    if len(x) != n:
        raise ValueError(
            f"x has {len(x)} samples but y has {n}; pass images and labels of one split"
        )
    if isinstance(n_labelled, bool) or not isinstance(n_labelled, (int, np.integer)):
        raise TypeError(
            f"n_labelled must be an integer, got {type(n_labelled).__name__} {n_labelled!r}"
        )
    if not 1 <= n_labelled <= n:
        raise ValueError(
            f"n_labelled must be in [1, {n}] (the number of samples), got {n_labelled}"
        )

    rng = np.random.default_rng(seed)
    if not stratified:
        chosen = rng.choice(n, size=int(n_labelled), replace=False)
    else:
        chosen = _stratified_choice(y, int(n_labelled), rng)

    mask = np.zeros(n, dtype=bool)
    mask[chosen] = True
    labelled = np.flatnonzero(mask)
    rest = np.flatnonzero(~mask)
    return x[labelled], y[labelled], x[rest], y[rest]


def _stratified_choice(y: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of ``k`` samples spread over the classes of ``y`` as evenly as possible."""
    classes, counts = np.unique(y, return_counts=True)
    # 1. Water-filling: raise every class's quota equally, capped by what it has.
    quota = np.zeros(len(classes), dtype=np.int64)
    remaining = k
    while remaining > 0:
        open_ = np.flatnonzero(quota < counts)
        share = remaining // len(open_)
        if share == 0:
            # Fewer samples left than open classes: one more each for a random few.
            lucky = rng.choice(open_, size=remaining, replace=False)
            quota[lucky] += 1
            break
        add = np.minimum(share, counts[open_] - quota[open_])
        quota[open_] += add
        remaining -= int(add.sum())
    # 2. Within each class, a random subset of its quota's size.
    picked = [
        rng.choice(np.flatnonzero(y == c), size=int(q), replace=False)
        for c, q in zip(classes, quota)
        if q > 0
    ]
    return np.concatenate(picked)


def _stratified_test_split(
    y: np.ndarray, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Train and test indices, each class split ``1 - test_fraction : test_fraction``."""
    rng = np.random.default_rng(seed)
    test = []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        n_test = int(round(len(idx) * test_fraction))
        test.append(rng.choice(idx, size=n_test, replace=False))
    mask = np.zeros(len(y), dtype=bool)
    mask[np.concatenate(test)] = True
    return np.flatnonzero(~mask), np.flatnonzero(mask)


# --------------------------------------------------------------------------- loading


def _canonical_name(name: str) -> str:
    """``"Fashion-MNIST"`` -> ``"fashion_mnist"``; raise ValueError for unknown names."""
    if not isinstance(name, str):
        raise TypeError(f"dataset name must be a string, got {type(name).__name__}")
    key = name.strip().lower().replace("-", "_").replace(" ", "_")
    squashed = {d.replace("_", ""): d for d in DATASETS}
    if key in DATASETS:
        return key
    if key.replace("_", "") in squashed:  # "fashionmnist"
        return squashed[key.replace("_", "")]
    hint = difflib.get_close_matches(key, DATASETS, n=1, cutoff=0.6)
    did_you_mean = f" Did you mean {hint[0]!r}?" if hint else ""
    raise ValueError(
        f"unknown dataset {name!r}; known datasets are {', '.join(DATASETS)}.{did_you_mean}"
    )


def _find_file(folder: Path, stem: str) -> Path | None:
    """``folder/stem`` or ``folder/stem.gz``, whichever exists (raw first: it reads faster)."""
    for candidate in (folder / stem, folder / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _idx_folders(name: str, spec: _IdxSpec, root: Path) -> list[Path]:
    """Where under ``root`` an IDX dataset may lie: the folder itself, ``<name>/``,
    ``<name-with-dashes>/``, torchvision's ``<Name>/raw/``."""
    return list(dict.fromkeys([
        root,
        root / name,
        root / name.replace("_", "-"),
        root / spec.torchvision_name / "raw",
    ]))


def _idx_files(folder: Path) -> dict[str, Path | None]:
    """``{stem: path or None}`` of the four IDX files in ``folder``."""
    return {stem: _find_file(folder, stem) for stem in _IDX_FILES.values()}


def _read_idx_folder(name: str, spec: _IdxSpec, folder: Path, files: dict[str, Path | None]) -> DatasetSplits:
    paths = {key: files[stem] for key, stem in _IDX_FILES.items()}
    arrays = {
        key: (load_idx_images if key.startswith("x") else load_idx_labels)(path)
        for key, path in paths.items()
    }
    splits = DatasetSplits(name=name, classes=spec.classes, source=folder, **arrays)
    _check_labels(splits, paths)
    return splits


def _load_idx_dataset(name: str, data_dir: str | os.PathLike | None) -> DatasetSplits:
    spec = _IDX_DATASETS[name]
    if data_dir is not None:  # the user named a folder: read it, or say why not
        root = Path(data_dir).expanduser()
        checked = []
        for folder in _idx_folders(name, spec, root):
            files = _idx_files(folder)
            if all(files.values()):
                return _read_idx_folder(name, spec, folder, files)
            checked.append((folder, files))
        raise DatasetNotFoundError(named_folder_message(
            name, root, checked,
            needed=f"the four IDX files {', '.join(_IDX_FILES.values())} (each raw or .gz)",
            layouts=f"{name}/, {name.replace('_', '-')}/ or {spec.torchvision_name}/raw/",
            fill=f"put the missing files into {{folder}} (from {spec.url})",
            elsewhere=(f"${DATA_ENV} or Debian's package (sudo apt-get install {spec.apt_package}, "
                       f"which installs into {DEBIAN_DATASETS / spec.debian_name})" if spec.apt_package
                       else f"${DATA_ENV}"),
            suffix="[.gz]",
        ))

    # No folder named: $KDISTILL_DATA is a place to search, then Debian's folder.
    folders = [f for root in data_roots(None) for f in _idx_folders(name, spec, root)]
    folders.append(DEBIAN_DATASETS / spec.debian_name)  # Debian installs the files straight here
    tried = []
    for folder in dict.fromkeys(folders):
        files = _idx_files(folder)
        missing = [stem for stem, f in files.items() if f is None]
        if not missing:
            return _read_idx_folder(name, spec, folder, files)
        if not folder.is_dir():
            tried.append(f"{folder} (no such folder)")
        elif len(missing) == len(_IDX_FILES):
            tried.append(f"{folder} (none of the files)")
        else:
            tried.append(f"{folder} (missing {', '.join(m + '[.gz]' for m in missing)})")
    raise DatasetNotFoundError(_not_found_message(name, spec, tried))


def _check_labels(splits: DatasetSplits, files: dict[str, Path]) -> None:
    for key in ("y_train", "y_test"):
        y = getattr(splits, key)
        if len(y) and (y.min() < 0 or y.max() >= splits.num_classes):
            raise ValueError(
                f"{files[key]}: labels must be in [0, {splits.num_classes}) for "
                f"{splits.name}, got values in [{y.min()}, {y.max()}]; is this file from "
                "another dataset?"
            )


def _not_found_message(name: str, spec: _IdxSpec, tried: list[str]) -> str:
    needed = ", ".join(f"{stem}[.gz]" for stem in _IDX_FILES.values())
    lines = [
        f"dataset {name!r} not found: no folder holds all four IDX files ({needed}).",
        "Folders tried, in order:",
        *(f"  - {t}" for t in tried),
        "To get the data (kdistill never downloads anything):",
    ]
    if spec.apt_package:
        lines.append(
            f"  - on Debian/Ubuntu: sudo apt-get install {spec.apt_package} "
            f"(installs into {DEBIAN_DATASETS / spec.debian_name}, found automatically)"
        )
        lines.append(f"  - otherwise: download the four IDX files from {spec.url}")
    else:
        lines.append(f"  - download the four IDX files from {spec.url}")
    lines.append(
        f"    into a folder DIR, then pass --data-dir DIR (load_dataset(..., data_dir=DIR)) "
        f"or set {DATA_ENV}=DIR"
    )
    return "\n".join(lines)


def _load_digits() -> DatasetSplits:
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise ImportError(
            "the 'digits' dataset needs scikit-learn, which is not installed; "
            "install it with `pip install kdistill[digits]` or `pip install scikit-learn`"
        ) from e
    digits = load_digits()
    # (N, 8, 8) in [0, 16] -> (N, 1, 8, 8) in [0, 1]
    x = (np.asarray(digits.images, dtype=np.float32) / np.float32(16.0))[:, None]
    y = np.asarray(digits.target, dtype=np.int64)
    train, test = _stratified_test_split(y, test_fraction=0.2, seed=0)
    return DatasetSplits(
        name="digits",
        x_train=x[train],
        y_train=y[train],
        x_test=x[test],
        y_test=y[test],
        classes=_DIGITS_CLASSES,
    )


def load_dataset(name: str, data_dir: str | os.PathLike | None = None) -> DatasetSplits:
    """Load a dataset by name from local files (never downloads).

    IDX datasets (``fashion_mnist``, ``mnist``, ``kmnist``) are searched for in
    ``data_dir``, then ``$KDISTILL_DATA``, then Debian's folder
    ``/usr/share/datasets/<name>``. Inside ``data_dir`` and ``$KDISTILL_DATA`` the files
    may lie in the folder itself, in ``<name>/`` or ``<name-with-dashes>/``, or in
    torchvision's ``FashionMNIST/raw/`` (``MNIST/raw``, ``KMNIST/raw``), raw or gzipped.
    ``digits`` is scikit-learn's 8x8 digits with a fixed stratified 80/20 split.
    ``cifar10`` / ``cifar100`` read the python-pickle batches (see
    :func:`kdistill.data.cifar.load_cifar`) from ``data_dir`` or ``$KDISTILL_DATA``.

    A ``data_dir`` that is given is the only place looked in (with the sub-folder layouts
    above): when it does not hold the dataset's files, the error names it and the files
    missing, and ``$KDISTILL_DATA`` or Debian's copy are *not* used in its place.
    ``$KDISTILL_DATA`` is a place to search: when it lacks the dataset, Debian's folder is
    tried next. The folder read is ``DatasetSplits.source``.

    Args:
        name: dataset name, case-insensitive, ``-`` or ``_`` (``"Fashion-MNIST"``).
        data_dir: the folder to read (or its parent, in the layouts above); ``None``:
            search ``$KDISTILL_DATA``, then Debian's folder.

    Returns:
        The :class:`DatasetSplits`, images ``(N, 1, H, W)`` float32 in ``[0, 1]``, with
        ``source`` the folder read (``None`` for ``digits``).

    Raises:
        ValueError: if ``name`` is not one of :data:`DATASETS`, or a file's labels do not
            fit the dataset.
        DatasetNotFoundError: (a ``FileNotFoundError``) if ``data_dir`` is given and does
            not hold the dataset's files (the message names the folder and the files
            missing), or if no folder searched holds them (it lists every folder tried);
            both say how to get the data.
        ImportError: for ``digits`` without scikit-learn installed.
        IdxFormatError: if a file is found but is not valid IDX.
    """
    key = _canonical_name(name)
    if key == "digits":
        return _load_digits()
    if key in ("cifar10", "cifar100"):
        return load_cifar(key, data_dir)
    return _load_idx_dataset(key, data_dir)
