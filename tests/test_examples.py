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


def test_cached_teacher_example_distils_from_augmented_views(tmp_path):
    env = {**os.environ, "KDISTILL_DEVICE": "cpu", "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, str(EXAMPLES / "cached_teacher.py")], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.strip().splitlines()
    assert lines[0] == "cache: 1438 samples x 4 views, 112 bytes/sample"  # 10 float16 logits + a seed, per view
    assert float(lines[-1].rsplit(" ", 1)[1]) > 0.8  # it learnt from the cached teacher
    assert (tmp_path / "runs" / "example_cache" / "teacher" / "manifest.json").is_file()
