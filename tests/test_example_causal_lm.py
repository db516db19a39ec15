"""examples/distil_causal_lm.py runs as documented: its demo (tiny random models) and
with directories given on the command line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "distil_causal_lm.py"
ENV = {**os.environ, "KDISTILL_DEVICE": "cpu", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def _run(args, cwd):
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=cwd, env=ENV, capture_output=True, text=True,
                          timeout=300)


def test_demo_distils_a_saved_student_that_loads_back(tmp_path):
    run = _run([], tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    loss = float(run.stdout.strip().splitlines()[-1].rsplit(" ", 1)[1])
    assert 0 < loss < 6.2  # below uniform over the 512-token vocabulary (ln 512 = 6.24): it learnt

    import torch
    from transformers import AutoModelForCausalLM

    from kdistill.data.text import load_tokenizer

    student = AutoModelForCausalLM.from_pretrained(tmp_path / "distilled", local_files_only=True)
    before = AutoModelForCausalLM.from_pretrained(tmp_path / "demo_student", local_files_only=True)
    tok = load_tokenizer(tmp_path / "distilled")
    assert len(tok) == student.config.vocab_size
    changed = [not torch.equal(a, b) for a, b in zip(student.parameters(), before.parameters())]
    assert all(changed)  # every tensor of the student trained


def test_a_missing_model_directory_is_named(tmp_path):
    (tmp_path / "t.txt").write_text("x = 1\n" * 50)
    run = _run(["no_teacher_here", "no_student", "t.txt"], tmp_path)
    assert run.returncode != 0
    assert "no_teacher_here" in run.stderr and "never downloads" in run.stderr
