"""IDX reader: round trips for every dtype, raw and gzipped, and clear errors."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest

from kdistill.data import load_idx_images, load_idx_labels, read_idx
from kdistill.data.idx import IdxFormatError
from kdistill.errors import KDistillError

_CODES = {np.uint8: 0x08, np.int8: 0x09, np.int16: 0x0B, np.int32: 0x0C,
          np.float32: 0x0D, np.float64: 0x0E}


def idx_bytes(arr: np.ndarray) -> bytes:
    """Encode ``arr`` as an IDX file, written independently of the reader."""
    code = _CODES[arr.dtype.type]
    header = struct.pack(">BBBB", 0, 0, code, arr.ndim)
    header += struct.pack(f">{arr.ndim}I", *arr.shape)
    return header + arr.astype(arr.dtype.newbyteorder(">")).tobytes()


def write_idx(path, arr: np.ndarray, *, gz: bool) -> None:
    data = idx_bytes(arr)
    path.write_bytes(gzip.compress(data) if gz else data)


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gz"])
@pytest.mark.parametrize("dtype", list(_CODES), ids=lambda d: d.__name__)
def test_read_idx_round_trip(tmp_path, dtype, gz):
    rng = np.random.default_rng(0)
    arr = (rng.standard_normal((3, 4, 5)) * 100).astype(dtype)
    path = tmp_path / "a.idx"
    write_idx(path, arr, gz=gz)

    out = read_idx(path)

    assert out.shape == (3, 4, 5)
    assert out.dtype == np.dtype(dtype)
    assert out.dtype.isnative
    np.testing.assert_array_equal(out, arr)
    out[0, 0, 0] = 1  # writable


def test_gzip_is_detected_by_content_not_suffix(tmp_path):
    arr = np.arange(12, dtype=np.uint8).reshape(3, 4)
    gz_without_suffix = tmp_path / "data-idx2-ubyte"
    raw_with_gz_suffix = tmp_path / "data-idx2-ubyte.gz"
    write_idx(gz_without_suffix, arr, gz=True)
    write_idx(raw_with_gz_suffix, arr, gz=False)
    np.testing.assert_array_equal(read_idx(gz_without_suffix), arr)
    np.testing.assert_array_equal(read_idx(raw_with_gz_suffix), arr)


def test_load_idx_images_scales_to_unit_float32(tmp_path):
    arr = np.array([[[0, 255], [51, 102]], [[1, 2], [3, 4]]], dtype=np.uint8)
    path = tmp_path / "images.gz"
    write_idx(path, arr, gz=True)

    x = load_idx_images(path)

    assert x.shape == (2, 1, 2, 2)
    assert x.dtype == np.float32
    np.testing.assert_allclose(x[:, 0], arr / 255.0, rtol=1e-6)
    assert x.min() == 0.0 and x.max() == 1.0


def test_load_idx_labels_int64(tmp_path):
    arr = np.array([3, 0, 9, 1], dtype=np.uint8)
    path = tmp_path / "labels"
    write_idx(path, arr, gz=False)

    y = load_idx_labels(path)

    assert y.dtype == np.int64
    np.testing.assert_array_equal(y, [3, 0, 9, 1])


def test_images_must_be_3d_and_labels_1d(tmp_path):
    labels = tmp_path / "labels"
    images = tmp_path / "images"
    write_idx(labels, np.zeros(5, dtype=np.uint8), gz=False)
    write_idx(images, np.zeros((2, 3, 3), dtype=np.uint8), gz=False)
    with pytest.raises(ValueError, match=r"image file must be 3-D.*\(5,\)"):
        load_idx_images(labels)
    with pytest.raises(ValueError, match=r"label file must be 1-D.*\(2, 3, 3\)"):
        load_idx_labels(images)


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gz"])
def test_truncated_data_says_expected_and_got(tmp_path, gz):
    data = idx_bytes(np.zeros((4, 5, 5), dtype=np.uint8))  # 16 header + 100 data bytes
    path = tmp_path / "short"
    cut = data[:-10]
    path.write_bytes(gzip.compress(cut) if gz else cut)
    with pytest.raises(IdxFormatError, match=r"truncated.*expected 116 bytes, got 106") as e:
        read_idx(path)
    assert str(path) in str(e.value)


def test_truncated_header(tmp_path):
    path = tmp_path / "hdr"
    path.write_bytes(bytes([0, 0, 0x08, 3, 0, 0, 0, 1]))  # 3 dims declared, 1 given
    with pytest.raises(IdxFormatError, match=r"truncated.*expected at least 16.*got 8"):
        read_idx(path)


def test_truncated_gzip_stream(tmp_path):
    path = tmp_path / "broken.gz"
    path.write_bytes(gzip.compress(idx_bytes(np.zeros(1000, dtype=np.uint8)))[:20])
    with pytest.raises(IdxFormatError, match="gzip"):
        read_idx(path)


def test_bad_magic(tmp_path):
    path = tmp_path / "notidx"
    path.write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(IdxFormatError, match=r"not an IDX file.*50 4b 03 04") as e:
        read_idx(path)
    assert str(path) in str(e.value)
    assert isinstance(e.value, KDistillError) and isinstance(e.value, ValueError)


def test_unknown_dtype_code(tmp_path):
    path = tmp_path / "code"
    path.write_bytes(bytes([0, 0, 0x07, 1, 0, 0, 0, 1, 0]))
    with pytest.raises(IdxFormatError, match=r"unknown IDX dtype code 0x07"):
        read_idx(path)


def test_empty_file(tmp_path):
    path = tmp_path / "empty"
    path.write_bytes(b"")
    with pytest.raises(IdxFormatError, match=r"empty") as e:
        read_idx(path)
    assert str(path) in str(e.value)
