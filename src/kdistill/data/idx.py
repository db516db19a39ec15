"""Read IDX files, the format of MNIST, Fashion-MNIST and KMNIST.

An IDX file is a tiny header followed by one big-endian array::

    bytes 0-1   0x00 0x00                      magic
    byte  2     dtype code (see _IDX_DTYPES)
    byte  3     ndim
    4 * ndim    dims, each a big-endian uint32
    ...         prod(dims) items of the dtype, big-endian, C order

Files may be gzip-compressed (``.gz``); that is decided by the gzip magic bytes, not by
the file name. The data is turned into an array with one ``np.frombuffer`` call.
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from pathlib import Path

import numpy as np

from ..errors import IdxFormatError

__all__ = ["IdxFormatError", "read_idx", "load_idx_images", "load_idx_labels"]

#: IDX dtype code -> big-endian numpy dtype.
_IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),  # unsigned byte
    0x09: np.dtype(">i1"),  # signed byte
    0x0B: np.dtype(">i2"),  # short
    0x0C: np.dtype(">i4"),  # int
    0x0D: np.dtype(">f4"),  # float
    0x0E: np.dtype(">f8"),  # double
}

_GZIP_MAGIC = b"\x1f\x8b"


def _read_bytes(path: Path) -> bytes:
    """Return the (decompressed) contents of ``path``; gzip is detected by magic bytes."""
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:2] != _GZIP_MAGIC:
        return raw
    try:
        return gzip.decompress(raw)
    except (EOFError, OSError, zlib.error) as e:
        raise IdxFormatError(
            f"{path}: gzip data is corrupt or truncated ({e}); download the file again "
            "or reinstall the package that provides it"
        ) from e


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (raw or gzip-compressed) into a numpy array.

    Args:
        path: the IDX file, e.g. ``train-images-idx3-ubyte.gz``. Whether it is gzipped is
            decided by its first two bytes, not by its suffix.

    Returns:
        A writable array in native byte order with the file's shape and dtype (``uint8``
        for MNIST-style images and labels). Bytes after the declared data are ignored.

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        IdxFormatError: (a ``ValueError``) if the file is empty, its magic number or dtype
            code is not IDX, or it is shorter than its header says.
    """
    path = Path(path)
    buf = _read_bytes(path)

    # 1. Header: magic (2 zero bytes), dtype code, ndim.
    if len(buf) == 0:
        raise IdxFormatError(
            f"{path} is empty (0 bytes); expected an IDX file. Download it again or point "
            "to the right file"
        )
    if len(buf) < 4:
        raise IdxFormatError(
            f"{path} is truncated: expected at least 4 header bytes, got {len(buf)}"
        )
    zero0, zero1, code, ndim = buf[0], buf[1], buf[2], buf[3]
    if zero0 != 0 or zero1 != 0:
        raise IdxFormatError(
            f"{path} is not an IDX file: its first bytes are {buf[:4].hex(' ')}, expected "
            "00 00 <dtype code> <ndim>"
        )
    if code not in _IDX_DTYPES:
        known = ", ".join(f"0x{c:02X}" for c in _IDX_DTYPES)
        raise IdxFormatError(
            f"{path} has unknown IDX dtype code 0x{code:02X}; expected one of {known}"
        )
    dtype = _IDX_DTYPES[code]

    # 2. Dims: ndim big-endian uint32s.
    header_len = 4 + 4 * ndim
    if len(buf) < header_len:
        raise IdxFormatError(
            f"{path} is truncated: its header declares {ndim} dims, so expected at least "
            f"{header_len} header bytes, got {len(buf)}"
        )
    shape = struct.unpack(f">{ndim}I", buf[4:header_len])

    # 3. Data: prod(shape) items right after the header.
    count = 1
    for d in shape:
        count *= d
    expected = header_len + count * dtype.itemsize
    if len(buf) < expected:
        raise IdxFormatError(
            f"{path} is truncated: header says shape {tuple(shape)} of {dtype.name}, so "
            f"expected {expected} bytes, got {len(buf)}. Download the file again"
        )
    arr = np.frombuffer(buf, dtype=dtype, count=count, offset=header_len)
    # Native byte order, and a writable copy (frombuffer over bytes is read-only).
    return arr.astype(dtype.newbyteorder("="), copy=True).reshape(shape)


def load_idx_images(path: str | os.PathLike) -> np.ndarray:
    """Load an IDX image file as float32 images in ``[0, 1]``.

    Args:
        path: a 3-D ``uint8`` IDX file of ``(N, H, W)`` images (raw or gzipped).

    Returns:
        ``(N, 1, H, W)`` float32 array, pixel values divided by 255.

    Raises:
        IdxFormatError: if the file is not valid IDX, not 3-D, or not ``uint8``.
    """
    arr = read_idx(path)
    if arr.ndim != 3:
        raise IdxFormatError(
            f"{path}: an image file must be 3-D (N, H, W), got shape {arr.shape}; "
            "is this a label file?"
        )
    if arr.dtype != np.uint8:
        raise IdxFormatError(
            f"{path}: image pixels must be unsigned bytes (IDX code 0x08), got {arr.dtype}"
        )
    # (N, H, W) -> (N, 1, H, W)
    return np.divide(arr[:, None], np.float32(255.0), dtype=np.float32)


def load_idx_labels(path: str | os.PathLike) -> np.ndarray:
    """Load an IDX label file as int64 class indices.

    Args:
        path: a 1-D integer IDX file of ``N`` labels (raw or gzipped).

    Returns:
        ``(N,)`` int64 array.

    Raises:
        IdxFormatError: if the file is not valid IDX, not 1-D, or not an integer type.
    """
    arr = read_idx(path)
    if arr.ndim != 1:
        raise IdxFormatError(
            f"{path}: a label file must be 1-D (N,), got shape {arr.shape}; "
            "is this an image file?"
        )
    if not np.issubdtype(arr.dtype, np.integer):
        raise IdxFormatError(
            f"{path}: labels must be integers, got {arr.dtype}"
        )
    return arr.astype(np.int64)
