"""Starting test workers on CPU processes with torchrun (Gloo), and reading their results.

A worker script writes ``result-<rank>.json`` into the output folder given to it; the
tests read those files rather than the exit status alone, so a case that fails on one
process is reported with its own error."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def torchrun_env(tmp_path: Path) -> dict[str, str]:
    """The environment of a launch: this folder and ``tests/`` importable, a private
    kdistill cache, one thread per process, collectives that fail in a minute, and no
    leftover device or process-group variables of the calling process."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(HERE.parent), str(HERE), env.get("PYTHONPATH", "")])
    env["KDISTILL_CACHE"] = str(tmp_path / "kdistill-cache")
    env["KDISTILL_DIST_TIMEOUT"] = "60"  # a process left waiting in a collective fails in a minute, not in ten
    env["OMP_NUM_THREADS"] = "1"
    for name in ("KDISTILL_DEVICE", "WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return env


def torchrun(args: list[str], tmp_path: Path, nproc: int = 2, timeout: int = 300) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run --standalone --nproc-per-node=N *args`` (a plain
    ``python *args`` for one process), its output captured."""
    cmd = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *args]
           if nproc > 1 else [sys.executable, *args])
    return subprocess.run(cmd, env=torchrun_env(tmp_path), capture_output=True, text=True, timeout=timeout)


def worker_results(workers: Path, cases: str, out: Path, nproc: int = 2) -> tuple[dict[Any, Any], subprocess.CompletedProcess]:
    """Run ``workers`` on ``nproc`` processes for the comma-separated ``cases``, writing into
    ``out``: ``({rank: result, ..., "log": the tail of stderr}, the process)``. Asserts that
    some process wrote a result (the exit status is the caller's to check: a case may be
    expected to abort the processes)."""
    proc = torchrun([str(workers), cases, str(out)], out, nproc)
    found: dict[Any, Any] = {int(f.stem.split("-")[1]): json.loads(f.read_text()) for f in out.glob("result-*.json")}
    assert found, f"no results (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    found["log"] = proc.stderr[-3000:]
    return found, proc


def case_results(found: dict[Any, Any], case: str) -> tuple[dict, dict]:
    """Both processes' results of one case, after checking both ran it without an error."""
    assert sorted(k for k in found if k != "log") == [0, 1], found["log"]
    a, b = found[0].get(case), found[1].get(case)
    assert a is not None and b is not None, f"{case} did not run on every process:\n{found['log']}"
    assert "error" not in a and "error" not in b, (a, b)
    assert found[0]["world"] == found[1]["world"] == 2
    return a, b
