"""Markdown reports: the teacher / scratch / distilled comparison table."""

from __future__ import annotations

from typing import Mapping


def human_bytes(n: float) -> str:
    """``1536 -> '1.5 KiB'``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"  # pragma: no cover


def comparison_table(models: Mapping[str, Mapping[str, float]], *, reference: str = "teacher") -> str:
    """A Markdown table, one row per model.

    Args:
        models: ``{name: {"parameters", "size_bytes", "test_accuracy", "latency_ms",
            "latency_p90_ms", "latency_batch", "throughput", "throughput_batch"}}``
            (the dict :func:`kdistill.bench.benchmark_model` returns plus ``test_accuracy``).
        reference: the row speed-ups are measured against.
    """
    ref = models.get(reference)
    any_row = next(iter(models.values()))
    lb, tb = int(any_row["latency_batch"]), int(any_row["throughput_batch"])
    header = (
        f"| model | parameters | size on disk | test accuracy | latency b={lb} (ms, median / p90) "
        f"| throughput b={tb} (samples/s) | speed-up vs {reference} (latency / throughput) |"
    )
    lines = [header, "|" + "---|" * 7]
    for name, m in models.items():
        if ref is not None:
            speed = f"{ref['latency_ms'] / m['latency_ms']:.1f}x / {m['throughput'] / ref['throughput']:.1f}x"
        else:
            speed = "-"
        lines.append(
            f"| {name} | {int(m['parameters']):,} | {human_bytes(m['size_bytes'])} | "
            f"{100 * m['test_accuracy']:.2f}% | {m['latency_ms']:.3f} / {m['latency_p90_ms']:.3f} | "
            f"{m['throughput']:,.0f} | {speed} |"
        )
    return "\n".join(lines)
