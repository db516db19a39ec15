"""Atomic file writing: every file kdistill writes is whole or absent, never half-written.

Each writer here takes the same path to the disk:

1. a temporary file in the target's own folder (the same file system, so the rename in
   step 3 is atomic), named ``.NAME.XXXXXXXX.tmp`` (``.copy`` for :func:`atomic_copy`);
2. the content written, flushed and ``fsync``-ed;
3. ``os.replace`` over the target (atomic on POSIX and Windows);
4. the folder ``fsync``-ed, so that the rename itself survives a power cut (POSIX; a no-op
   where folders cannot be opened).

A crash at any moment leaves the old file or the new one. On an error the temporary file is
removed; one left by a killed process keeps its ``.NAME.XXXXXXXX.tmp`` name, which a
continued run removes (:func:`kdistill.run.directory.remove_stale_temp_files`).

Writers:

* :func:`atomic_write`: fill the file through a callback (``torch.jit.save``, ``savefig``);
* :func:`atomic_write_bytes`, :func:`atomic_write_text` (UTF-8);
* :func:`atomic_torch_save`: ``torch.save`` of an object;
* :func:`atomic_copy`: a copy of another file;
* :func:`temp_path_beside` with :func:`replace_durably`: for writers that need a file
  *name* rather than an open file (the ONNX exporters, onnxruntime's quantizer).
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Callable

import torch

#: Ending of the temporary files of :func:`atomic_write` and the writers built on it.
TEMP_SUFFIX = ".tmp"
#: Ending of the temporary files of :func:`atomic_copy`.
COPY_SUFFIX = ".copy"


def fsync_dir(path: str | os.PathLike) -> None:
    """Make the renames inside a folder durable.

    Args:
        path: the folder.

    A no-op where folders cannot be opened or synced (Windows).
    """
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def temp_path_beside(
    path: str | os.PathLike, *, suffix: str = TEMP_SUFFIX, companions: Iterable[str] = ()
) -> Iterator[Path]:
    """A new, empty temporary file in ``path``'s folder, removed when the block ends.

    Rename it over ``path`` with :func:`replace_durably` inside the block to keep it; on
    an error (or without that rename) it is deleted.

    Args:
        path: the file the temporary one stands in for; its folder is created if missing.
        suffix: how the temporary file's name ends (``".tmp.onnx"`` for a writer that
            looks at the extension).
        companions: endings of files a writer may put beside the temporary one (``".data"``
            for ONNX external data), deleted with it.

    Yields:
        The temporary file's path, ``.NAME.XXXXXXXX<suffix>``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
    finally:
        for leftover in (tmp, *(tmp.with_name(tmp.name + ending) for ending in companions)):
            with contextlib.suppress(FileNotFoundError):
                leftover.unlink()


def _rename_into_place(tmp: Path, path: Path) -> Path:
    """``os.replace`` a written, synced ``tmp`` over ``path`` and sync the folder."""
    os.replace(tmp, path)
    fsync_dir(path.parent)
    return path


def replace_durably(tmp: str | os.PathLike, path: str | os.PathLike) -> Path:
    """``fsync`` a finished temporary file and rename it over ``path`` (steps 2-4 above).

    Args:
        tmp: the temporary file, in ``path``'s folder (from :func:`temp_path_beside`).
        path: the destination.

    Returns:
        The destination path.
    """
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    return _rename_into_place(Path(tmp), Path(path))


def atomic_write(
    path: str | os.PathLike, write: Callable[[Any], None], *, mode: str = "wb", suffix: str = TEMP_SUFFIX
) -> Path:
    """Write a file atomically: ``write(fileobj)`` fills a temporary file, then it is renamed.

    Args:
        path: the destination; its folder is created if missing.
        write: called once with the open temporary file.
        mode: ``"wb"`` or ``"w"``.
        suffix: how the temporary file's name ends.

    Returns:
        The destination path.
    """
    path = Path(path)
    with temp_path_beside(path, suffix=suffix) as tmp:
        with open(tmp, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        return _rename_into_place(tmp, path)


def atomic_write_bytes(path: str | os.PathLike, data: bytes | bytearray | memoryview) -> Path:
    """Write ``data`` to ``path`` atomically; returns the path."""
    return atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; returns the path."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save(obj)`` to ``path`` atomically; returns the path.

    The object is serialised in memory first, so an object ``torch.save`` refuses leaves
    no temporary file behind.
    """
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return atomic_write_bytes(path, buffer.getbuffer())


def atomic_copy(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Copy the file ``src`` to ``dst`` atomically; returns ``dst``.

    The temporary file is named ``.NAME.XXXXXXXX.copy``; its unique name lets several
    processes publish the same file at once (the last rename wins, each copy whole).
    """
    with temp_path_beside(dst, suffix=COPY_SUFFIX) as tmp:
        shutil.copyfile(src, tmp)
        return replace_durably(tmp, dst)


__all__ = [
    "atomic_copy",
    "atomic_torch_save",
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_text",
    "fsync_dir",
    "replace_durably",
    "temp_path_beside",
]
