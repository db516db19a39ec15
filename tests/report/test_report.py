"""Report pieces: the comparison table and the accuracy plot."""

from __future__ import annotations

import pytest

from kdistill.report import comparison_table, human_bytes, plot_curves


def _row(acc: float, params: int, latency: float, throughput: float) -> dict:
    return dict(parameters=params, size_bytes=4 * params, test_accuracy=acc, latency_ms=latency,
                latency_p90_ms=1.5 * latency, latency_batch=1, throughput=throughput, throughput_batch=256)


@pytest.mark.parametrize("n, text", [(0, "0 B"), (1023, "1023 B"), (1536, "1.5 KiB"), (5 * 2**20, "5.0 MiB"), (3 * 2**30, "3.0 GiB")])
def test_human_bytes(n, text):
    assert human_bytes(n) == text


def test_comparison_table_rows_and_speedups():
    table = comparison_table({"teacher": _row(0.9, 1_000_000, 4.0, 300.0), "student": _row(0.85, 20_000, 0.5, 15_000.0)})
    lines = table.splitlines()
    assert lines[0].startswith("| model | parameters | size on disk | test accuracy")
    assert "latency b=1" in lines[0] and "throughput b=256" in lines[0]
    assert len(lines) == 4  # header, rule, two rows
    teacher, student = lines[2], lines[3]
    assert "| teacher | 1,000,000 | 3.8 MiB | 90.00% |" in teacher and "1.0x / 1.0x" in teacher
    # 4.0 / 0.5 ms = 8x lower latency; 15000 / 300 = 50x the throughput
    assert "| student | 20,000 | 78.1 KiB | 85.00% |" in student and "8.0x / 50.0x" in student


def test_plot_curves_writes_a_png_atomically(tmp_path):
    path = tmp_path / "sub" / "acc.png"
    plot_curves({"a": [0.5, 0.7, 0.8], "b": [0.6]}, path, references={"teacher (final)": 0.9})
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5_000
    assert [p.name for p in path.parent.iterdir()] == ["acc.png"]  # no temp file left
