"""The examples run as documented (fast ones only)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("sklearn")
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_resumable_fit_continues_where_it_stopped(tmp_path):
    env = {**os.environ, "KDISTILL_DEVICE": "cpu", "OMP_NUM_THREADS": "1"}
    script = str(EXAMPLES / "resumable_fit.py")
    first = subprocess.run([sys.executable, script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    assert (tmp_path / "runs" / "example_resumable" / "last.pt").is_file()
    # a second start finds the finished state: no epoch runs again, same final accuracy
    second = subprocess.run([sys.executable, script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr
    assert "epoch " not in second.stdout
    assert first.stdout.strip().splitlines()[-1] == second.stdout.strip().splitlines()[-1]
