"""Reliability of run directories: checksummed checkpoints, the run-directory lock, and
leftover temporary files of interrupted writes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import pytest
import torch

from experiment_configs import tiny_config, write_config
from kdistill.checkpoint import DIGEST_KEY, file_sha256, read_training_state
from kdistill.cli import main
from kdistill.config import validate_config
from kdistill.errors import CheckpointError, RunDirectoryError
from kdistill.experiment import load_stage_model, run_experiment

pytest.importorskip("sklearn")


def _run(raw, run_dir, logs=None):
    return run_experiment(validate_config(raw), run_dir=run_dir, verbose=0,
                          log=(logs.append if logs is not None else lambda m: None))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A finished tiny run, never modified: tests work on copies of it."""
    out = tmp_path_factory.mktemp("reliability") / "ref"
    raw = tiny_config(out)
    raw["stages"]["teacher"]["epochs"] = 2
    metrics = _run(raw, out)
    weights = {s: torch.load(out / "stages" / s / "checkpoint.pt", weights_only=True)["state_dict"]
               for s in ("teacher", "scratch", "distil")}
    return out, raw, metrics, weights


def _copy(reference, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(reference[0], out)
    return out


def _mark_unfinished(run_dir: Path) -> None:
    """As if killed before the end: run.json says running, no metrics."""
    info = json.loads((run_dir / "run.json").read_text())
    (run_dir / "run.json").write_text(json.dumps({**info, "status": "running"}))
    (run_dir / "metrics.json").unlink()


def _flip_tensor_bytes(path: Path) -> None:
    """Flip two bytes inside the data of the largest tensor of a torch.save zip file
    (low mantissa bytes of float32 values: the file still loads, with other numbers)."""
    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
        assert info.compress_type == zipfile.ZIP_STORED
    with open(path, "r+b") as f:
        f.seek(info.header_offset)
        header = f.read(30)
        assert header[:4] == b"PK\x03\x04"
        name_len, extra_len = int.from_bytes(header[26:28], "little"), int.from_bytes(header[28:30], "little")
        start = info.header_offset + 30 + name_len + extra_len
        for offset in (start + 4 * (info.file_size // 8), start + 4 * (info.file_size // 8) + 4):
            f.seek(offset)
            byte = f.read(1)[0]
            f.seek(offset)
            f.write(bytes([byte ^ 0x01]))


# --------------------------------------------------------------------------- 1. checksums
def test_a_flipped_finished_checkpoint_is_retrained_not_reused(reference, tmp_path):
    out = _copy(reference, tmp_path)
    ckpt = out / "stages" / "teacher" / "checkpoint.pt"
    recorded = json.loads((ckpt.parent / "done.json").read_text())["checkpoint_sha256"]
    assert recorded == file_sha256(ckpt)
    _flip_tensor_bytes(ckpt)
    # the damage is invisible to torch.load: only the hash can tell
    flipped = torch.load(ckpt, weights_only=True)["state_dict"]
    assert any(not torch.equal(flipped[k], v) for k, v in reference[3]["teacher"].items())
    bad = file_sha256(ckpt)
    _mark_unfinished(out)

    logs: list[str] = []
    metrics = _run(reference[1], out, logs)
    why = next(m for m in logs if m.startswith("[teacher] cannot reuse the finished stage"))
    assert str(ckpt) in why and recorded in why and bad in why and why.endswith("training again")
    assert not any(m.startswith("[teacher] finished earlier") for m in logs)
    # ends where the uninterrupted run ended
    for stage, expected in reference[3].items():
        got = torch.load(out / "stages" / stage / "checkpoint.pt", weights_only=True)["state_dict"]
        assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got), stage
    assert metrics["models"]["teacher"]["test_accuracy"] == reference[2]["models"]["teacher"]["test_accuracy"]
    assert metrics["models"]["distil"]["test_accuracy"] == reference[2]["models"]["distil"]["test_accuracy"]
    assert json.loads((ckpt.parent / "done.json").read_text())["checkpoint_sha256"] == file_sha256(ckpt) == recorded


def test_resuming_a_finished_run_with_a_flipped_checkpoint_trains_that_stage_again(reference, tmp_path):
    """What the error of load_stage_model advises: `kdistill run --resume RUN_DIR`."""
    out = _copy(reference, tmp_path)
    ckpt = out / "stages" / "distil" / "checkpoint.pt"
    _flip_tensor_bytes(ckpt)
    with pytest.raises(CheckpointError, match=f"kdistill run --resume {out}"):
        load_stage_model(out, "distil")
    assert main(["run", "--resume", str(out), "--quiet"]) == 0
    log = (out / "run.log").read_text()
    assert "checkpoint of stage(s) distil changed on disk" in log and "[distil] cannot reuse" in log
    assert "[teacher] finished earlier in this run directory: reusing it" in log
    model = load_stage_model(out, "distil")
    assert all(torch.equal(v, reference[3]["distil"][k]) for k, v in model.state_dict().items())


def test_a_flipped_checkpoint_in_the_stage_store_is_not_reused_and_is_replaced(tmp_path):
    store = tmp_path / "store"
    raw = tiny_config(tmp_path / "a", teacher_store=str(store))
    raw["stages"]["teacher"]["epochs"] = 1
    _run(raw, tmp_path / "a")
    stored = next(store.glob("teacher-*"))
    _flip_tensor_bytes(stored / "checkpoint.pt")
    logs: list[str] = []
    _run({**raw, "output_dir": str(tmp_path / "b")}, tmp_path / "b", logs)
    why = next(m for m in logs if m.startswith("[teacher] the stored stage"))
    assert str(stored / "checkpoint.pt") in why and "expected" in why and why.endswith("training")
    assert any(m.startswith("[scratch] reusing the scratch trained by") for m in logs)  # intact: still shared
    # the damaged copy in the store was replaced by the retrained one (same weights)
    done = json.loads((stored / "done.json").read_text())
    assert done["checkpoint_sha256"] == file_sha256(stored / "checkpoint.pt")
    assert file_sha256(stored / "checkpoint.pt") == file_sha256(tmp_path / "a" / "stages" / "teacher" / "checkpoint.pt")


def test_load_stage_model_refuses_a_flipped_checkpoint(reference, tmp_path):
    out = _copy(reference, tmp_path)
    ckpt = out / "stages" / "distil" / "checkpoint.pt"
    recorded = json.loads((ckpt.parent / "done.json").read_text())["checkpoint_sha256"]
    _flip_tensor_bytes(ckpt)
    with pytest.raises(CheckpointError) as e:
        load_stage_model(out, "distil")
    assert str(ckpt) in str(e.value) and recorded in str(e.value) and file_sha256(ckpt) in str(e.value)
    # without the record in done.json, the digest inside the checkpoint still catches it
    done = json.loads((ckpt.parent / "done.json").read_text())
    done.pop("checkpoint_sha256")
    (ckpt.parent / "done.json").write_text(json.dumps(done))
    with pytest.raises(CheckpointError, match="SHA-256 of its contents"):
        load_stage_model(out, "distil")


def test_bench_on_a_run_with_a_flipped_checkpoint_fails_naming_it(reference, tmp_path, capsys):
    out = _copy(reference, tmp_path)
    ckpt = out / "stages" / "scratch" / "checkpoint.pt"
    _flip_tensor_bytes(ckpt)
    assert main(["bench", str(out), "--repeats", "1", "--throughput-batch", "4"]) == 1
    err = capsys.readouterr().err
    assert str(ckpt) in err and "expected" in err and "found" in err


def test_run_directories_without_recorded_hashes_still_load(reference, tmp_path):
    """Run directories of older versions: no hash in done.json, no digest in the file."""
    out = _copy(reference, tmp_path)
    sdir = out / "stages" / "distil"
    done = json.loads((sdir / "done.json").read_text())
    done.pop("checkpoint_sha256")
    (sdir / "done.json").write_text(json.dumps(done))
    payload = torch.load(sdir / "checkpoint.pt", weights_only=True)
    payload.pop(DIGEST_KEY)
    torch.save(payload, sdir / "checkpoint.pt")
    model = load_stage_model(out, "distil")
    assert all(torch.equal(v, reference[3]["distil"][k]) for k, v in model.state_dict().items())
    _mark_unfinished(out)
    logs: list[str] = []
    _run(reference[1], out, logs)
    assert "[distil] finished earlier in this run directory: reusing it" in logs


def test_a_flipped_training_state_restarts_the_stage(reference, tmp_path):
    out = _copy(reference, tmp_path)
    sdir = out / "stages" / "distil"
    (sdir / "done.json").unlink()  # as if killed before the stage's end
    (sdir / "checkpoint.pt").unlink()
    _flip_tensor_bytes(sdir / "last.pt")
    torch.load(sdir / "last.pt", weights_only=True)  # loads, with other numbers
    with pytest.raises(CheckpointError, match="corrupt"):
        read_training_state(sdir / "last.pt")
    _mark_unfinished(out)
    logs: list[str] = []
    _run(reference[1], out, logs)
    why = next(m for m in logs if m.startswith("[distil] cannot resume"))
    assert str(sdir / "last.pt") in why and why.endswith("training from the start")
    got = torch.load(sdir / "checkpoint.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(got[k], v) for k, v in reference[3]["distil"].items())


# --------------------------------------------------------------------------- 2. the lock
_HOLD = textwrap.dedent("""
    import sys, time
    from kdistill.run.locks import exclusive_lock
    with exclusive_lock(sys.argv[1]):
        print("locked", flush=True)
        time.sleep(120)
""")


def test_a_run_directory_in_use_is_refused_then_taken_over_when_its_holder_dies(reference, tmp_path):
    out = _copy(reference, tmp_path)
    _mark_unfinished(out)
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(out / ".lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = sorted(p.name for p in out.rglob("*"))
        with pytest.raises(RunDirectoryError) as e:
            _run(reference[1], out)
        message = str(e.value)
        assert f"pid {holder.pid}" in message and "in use by another kdistill run" in message
        assert "--out" in message
        assert sorted(p.name for p in out.rglob("*")) == before  # nothing was written
    finally:
        holder.kill()  # SIGKILL: no clean release, the lock file keeps its content
        holder.wait()
    assert str(holder.pid) in (out / ".lock").read_text()
    logs: list[str] = []
    metrics = _run(reference[1], out, logs)
    assert any("taking over the lock left by" in m and f"pid {holder.pid}" in m for m in logs)
    assert metrics["models"]["distil"]["test_accuracy"] == reference[2]["models"]["distil"]["test_accuracy"]
    assert (out / ".lock").read_text() == ""  # released cleanly at the end


def test_a_stale_lock_file_of_a_dead_process_does_not_block(reference, tmp_path):
    out = _copy(reference, tmp_path)
    _mark_unfinished(out)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    (out / ".lock").write_text(json.dumps({"pid": pid, "host": "elsewhere", "started_at": "2020-01-01T00:00:00"}))
    logs: list[str] = []
    _run(reference[1], out, logs)
    assert json.loads((out / "run.json").read_text())["status"] == "finished"
    assert any(f"pid {pid} on host elsewhere" in m for m in logs)


def test_a_second_kdistill_run_into_a_directory_in_use_is_refused(tmp_path):
    """The hostile tester's case (two `kdistill run CONFIG --out SAME`): while one runs,
    the other exits 1 naming it, and the first finishes with its own result."""
    raw = tiny_config(tmp_path / "same")
    raw["stages"]["teacher"]["epochs"] = 40  # long enough to still run when the second one starts
    config = write_config(tmp_path / "tiny.yaml", raw)
    cmd = [sys.executable, "-m", "kdistill", "run", str(config), "--out", str(tmp_path / "same"), "--quiet"]
    first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lock = tmp_path / "same" / ".lock"
        deadline = time.monotonic() + 120
        while not (lock.is_file() and f'"pid": {first.pid}' in lock.read_text()):
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()
            time.sleep(0.05)
        second = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert first.poll() is None, "the first run ended before the second one tried the lock"
        out, err = first.communicate(timeout=300)
    finally:
        first.kill()
    assert first.returncode == 0, err
    assert second.returncode == 1, (second.stdout, second.stderr)
    assert "in use by another kdistill run" in second.stderr and f"pid {first.pid}" in second.stderr
    assert "test accuracy" in out.lower() or "distilled" in out
    log = (tmp_path / "same" / "run.log").read_text()
    assert log.count("[teacher] training") == 1


def test_a_folder_that_is_not_a_run_gets_no_lock_file(tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(RunDirectoryError, match="not a kdistill run directory"):
        _run(tiny_config(folder), folder)
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt"]


# --------------------------------------------------------------------------- 3. temp files
def test_leftover_temp_files_are_removed_when_a_run_continues(reference, tmp_path):
    out = _copy(reference, tmp_path)
    _mark_unfinished(out)
    planted = [out / "stages" / "teacher" / ".last.pt.k2j3h4.tmp", out / "stages" / "distil" / ".history.jsonl.x9.tmp",
               out / "stages" / "distil" / ".last.pt.q1.tmp", out / ".run.json.abc.tmp",
               out / "stages" / "scratch" / ".checkpoint.pt.zz.copy"]
    for f in planted:
        f.write_bytes(os.urandom(1000))
    keep = out / "stages" / "distil" / "notes.tmp"  # not a temp file of ours
    keep.write_text("keep")
    logs: list[str] = []
    _run(reference[1], out, logs)
    assert not any(f.exists() for f in planted)
    assert keep.read_text() == "keep"
    assert any(m.startswith("removed 5 leftover temporary file(s)") for m in logs), logs
    assert "removed 5 leftover temporary file(s)" in (out / "run.log").read_text()
