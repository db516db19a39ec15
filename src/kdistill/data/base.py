"""What every dataset reader shares: the splits it returns, where data folders are looked
for, and the message that refuses a folder the user named.

A folder the user names (``--data-dir``, ``data.data_dir``, ``data_dir=``) is read or
refused, never silently replaced by another copy of the dataset; without one,
``$KDISTILL_DATA`` is searched. :class:`DatasetSplits.source` names the folder read.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = ["DATA_ENV", "DatasetSplits", "data_roots", "named_folder_message"]

#: Environment variable naming a folder that holds datasets.
DATA_ENV = "KDISTILL_DATA"


@dataclass(frozen=True, eq=False)
class DatasetSplits:
    """A dataset's train and test arrays and its class names.

    Attributes:
        name: canonical dataset name, e.g. ``"fashion_mnist"``.
        x_train: ``(N, C, H, W)`` float32 images in ``[0, 1]``.
        y_train: ``(N,)`` int64 labels in ``[0, num_classes)``.
        x_test: ``(M, C, H, W)`` float32 images.
        y_test: ``(M,)`` int64 labels.
        classes: human-readable name of each class, by label.
        source: the folder the files were read from (``None`` for data that did not come
            from a folder: ``digits``, arrays built in code, a custom reader's result).
    """

    name: str
    x_train: np.ndarray = field(repr=False)
    y_train: np.ndarray = field(repr=False)
    x_test: np.ndarray = field(repr=False)
    y_test: np.ndarray = field(repr=False)
    classes: tuple[str, ...] = field(repr=False)
    source: Path | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        for split in ("train", "test"):
            x, y = getattr(self, f"x_{split}"), getattr(self, f"y_{split}")
            if len(x) != len(y):
                raise ValueError(
                    f"{self.name}: x_{split} has {len(x)} samples but y_{split} has "
                    f"{len(y)}; images and labels must come from the same split"
                )
        if self.x_train.shape[1:] != self.x_test.shape[1:]:
            raise ValueError(
                f"{self.name}: train samples have shape {self.x_train.shape[1:]} but test "
                f"samples {self.x_test.shape[1:]}; both splits must share a sample shape"
            )

    @property
    def num_classes(self) -> int:
        """Number of classes (``len(classes)``)."""
        return len(self.classes)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one sample, e.g. ``(1, 28, 28)``."""
        return tuple(int(s) for s in self.x_train.shape[1:])

    def __repr__(self) -> str:
        return (
            f"DatasetSplits(name={self.name!r}, train={len(self.x_train)}, "
            f"test={len(self.x_test)}, input_shape={self.input_shape}, "
            f"num_classes={self.num_classes})"
        )


def data_roots(data_dir: str | os.PathLike | None) -> list[Path]:
    """The folders a dataset is looked for in first: ``data_dir``, then ``$KDISTILL_DATA``.

    :func:`~kdistill.data.load_dataset` and :func:`~kdistill.data.load_cifar` themselves
    search ``data_dir`` alone when it is given."""
    roots = []
    if data_dir is not None:
        roots.append(Path(data_dir).expanduser())
    env = os.environ.get(DATA_ENV)
    if env:
        roots.append(Path(env).expanduser())
    return roots


def named_folder_message(
    name: str,
    root: Path,
    checked: list[tuple[Path, dict[str, Path | None]]],
    *,
    needed: str,
    layouts: str,
    fill: str,
    elsewhere: str,
    suffix: str = "",
    how: str = "--data-dir / data.data_dir / load_dataset(data_dir=...)",
) -> str:
    """Why ``root``, the folder the user named, does not hold dataset ``name``.

    Args:
        checked: each folder looked in under ``root``, with ``{file: path or None}``.
        needed: the files, in words; ``layouts``: the sub-folders they may lie in.
        fill: how to put the data there, with ``{folder}`` for ``root``.
        elsewhere: what is used when no folder is named.
        suffix: appended to a missing file's name (``[.gz]``).
        how: the ways the folder can have been named, for the message.
    """
    shown = f"{root} ({root.resolve()})" if not root.is_absolute() else str(root)
    fix = f"To fix: {fill.format(folder=root)}, or drop --data-dir (data.data_dir) to use {elsewhere}."
    if not root.is_dir():
        return "\n".join([
            f"dataset {name!r} not found: the data folder you named ({how}), {shown}, "
            f"{'is not a folder' if root.exists() else 'does not exist'}.",
            f"It must hold {needed}, in the folder itself or in {layouts} under it.",
            fix.replace("To fix: ", "To fix: check the path; or ", 1),
        ])
    lines = [
        f"dataset {name!r} not found in the data folder you named ({how}), {shown}; a folder "
        "you name is read or refused, never replaced by another copy of the dataset.",
        f"It must hold {needed}, in the folder itself or in {layouts} under it. Found:",
    ]
    for folder, files in checked:
        if folder != root and not folder.is_dir():
            continue  # an optional layout that is not there
        have = [p.name for p in files.values() if p is not None]
        missing = [stem + suffix for stem, p in files.items() if p is None]
        if have:
            status = f"missing {', '.join(missing)}; has {', '.join(have)}"
        else:
            entries = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())
            if not entries:
                status = "empty folder"
            else:
                more = f", ... ({len(entries)} entries)" if len(entries) > 8 else ""
                status = f"none of the files; it holds {', '.join(entries[:8])}{more}"
        lines.append(f"  - {folder} ({status})")
    lines.append(fix)
    return "\n".join(lines)
