"""The README's front matter works as written: its Python quickstart runs and learns, and
CI runs the same test command the README gives."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def _section(title: str) -> str:
    start = README.index(f"## {title}")
    nxt = README.find("\n## ", start + 3)
    return README[start:nxt if nxt != -1 else None]


def test_the_python_quickstart_runs_and_the_student_learns():
    pytest.importorskip("sklearn")
    code = re.search(r"```python\n(.*?)```", _section("Python quickstart"), re.S).group(1)
    assert len(code.strip().splitlines()) <= 14  # a quickstart, not a tutorial
    env = {**os.environ, "OMP_NUM_THREADS": "1", "KDISTILL_DEVICE": "cpu"}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300,
                         cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    result = ast.literal_eval(run.stdout.strip().splitlines()[-1])  # the printed evaluate() dict
    assert set(result) >= {"loss", "accuracy"}
    assert result["accuracy"] > 0.7  # ten classes: chance is 0.1


def test_the_two_setup_commands_come_first_and_ci_runs_the_readmes_test_command():
    setup = _section("Set-up: two commands")
    commands = [line for line in re.search(r"```bash\n(.*?)```", setup, re.S).group(1).splitlines()
                if line and not line.startswith("#")]
    assert len(commands) == 2
    assert "kdistill classic" in commands[0]
    test_command = commands[1].rsplit("&&", 1)[1].strip()  # python -m pytest -q
    ci = (ROOT / ".ci" / "run").read_text()
    assert test_command.replace("python ", "python3 ") in ci
    assert README.index("## Set-up: two commands") < README.index("## Python quickstart")
