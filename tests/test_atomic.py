"""Atomic file writing (kdistill.atomic): whole or absent, never half-written, and durable."""

from __future__ import annotations

import io
import os
import stat
from pathlib import Path

import pytest
import torch

import kdistill.checkpoint
from kdistill import atomic
from kdistill.atomic import (
    atomic_copy,
    atomic_torch_save,
    atomic_write,
    atomic_write_bytes,
    atomic_write_text,
    replace_durably,
    temp_path_beside,
)


@pytest.fixture
def disk_log(monkeypatch):
    """Record, in order, each fsync (of a file or of a folder) and each rename."""
    events: list[tuple] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", "dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file"))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", Path(src), Path(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return events


@pytest.mark.parametrize(
    "write, expected",
    [
        (lambda p: atomic_write_text(p, "héllo\n"), "héllo\n".encode()),
        (lambda p: atomic_write_bytes(p, b"\x00\x01\x02"), b"\x00\x01\x02"),
        (lambda p: atomic_write(p, lambda f: f.write("text mode"), mode="w"), b"text mode"),
    ],
)
def test_writes_go_through_a_synced_temp_file_in_the_same_folder_then_the_folder_is_synced(
    tmp_path, disk_log, write, expected
):
    target = tmp_path / "sub" / "out.bin"
    assert write(target) == target
    assert target.read_bytes() == expected
    # (temp file synced) -> renamed over the target from the same folder -> folder synced
    assert [e[0] for e in disk_log] == ["fsync", "replace", "fsync"]
    assert disk_log[0] == ("fsync", "file") and disk_log[2] == ("fsync", "dir")
    _, src, dst = disk_log[1]
    assert dst == target and src.parent == target.parent
    assert src.name.startswith(".out.bin.") and src.name.endswith(".tmp")
    assert [p.name for p in target.parent.iterdir()] == ["out.bin"]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp_file(tmp_path):
    target = atomic_write_text(tmp_path / "a.txt", "old")

    def half_then_crash(f):
        f.write(b"new but ")
        raise RuntimeError("crash mid-write")

    with pytest.raises(RuntimeError, match="crash mid-write"):
        atomic_write(target, half_then_crash)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_a_failed_rename_keeps_the_old_file_and_leaves_no_temp_file(tmp_path, monkeypatch):
    target = atomic_write_text(tmp_path / "a.txt", "old")

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_text(target, "new")
    monkeypatch.undo()
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_atomic_torch_save_writes_the_bytes_torch_save_writes(tmp_path):
    obj = {"w": torch.arange(6.0).reshape(2, 3), "step": 3}
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    path = atomic_torch_save(obj, tmp_path / "x.pt")
    assert path.read_bytes() == buffer.getvalue()
    back = torch.load(path, weights_only=True)
    assert torch.equal(back["w"], obj["w"]) and back["step"] == 3


class _Unsavable:
    def __reduce__(self):
        raise TypeError("this object cannot be saved")


def test_atomic_torch_save_of_an_unsavable_object_leaves_nothing(tmp_path):
    with pytest.raises(TypeError, match="cannot be saved"):
        atomic_torch_save({"x": _Unsavable()}, tmp_path / "x.pt")
    assert list(tmp_path.iterdir()) == []


def test_atomic_copy_copies_through_a_copy_temp_file(tmp_path, disk_log):
    src = tmp_path / "src.pt"
    src.write_bytes(os.urandom(3000))
    dst = atomic_copy(src, tmp_path / "stage" / "src.pt")
    assert dst.read_bytes() == src.read_bytes()
    renames = [e for e in disk_log if e[0] == "replace"]
    assert len(renames) == 1 and renames[0][1].name.endswith(".copy") and renames[0][1].parent == dst.parent
    assert disk_log[-1] == ("fsync", "dir")
    assert [p.name for p in dst.parent.iterdir()] == ["src.pt"]


def test_temp_path_beside_removes_the_file_and_its_companions_unless_replaced(tmp_path):
    target = tmp_path / "model.onnx"
    with temp_path_beside(target, suffix=".tmp.onnx", companions=(".data",)) as tmp:
        assert tmp.parent == tmp_path and tmp.name.endswith(".tmp.onnx") and tmp.exists()
        tmp.with_name(tmp.name + ".data").write_bytes(b"external weights")
    assert list(tmp_path.iterdir()) == []

    with temp_path_beside(target) as tmp:
        tmp.write_bytes(b"graph")
        assert replace_durably(tmp, target) == target
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]
    assert target.read_bytes() == b"graph"


def test_atomic_writing_has_one_home():
    """Only kdistill.atomic renames files into place (besides the teacher cache's directory
    swap), and nothing else defines or re-exports an atomic writer."""
    src = Path(kdistill.__file__).parent
    for f in src.rglob("*.py"):
        if f.name == "atomic.py":
            continue
        text = f.read_text()
        assert "os.replace(" not in text or f.relative_to(src).as_posix() == "teacher/cache/build.py", f
        assert "def atomic_" not in text, f
    assert not hasattr(kdistill.checkpoint, "atomic_write_text")
