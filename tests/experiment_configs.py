"""Tiny experiment configs for tests: digits (scikit-learn), small MLPs, seconds per run."""

from __future__ import annotations

from pathlib import Path

import yaml


def tiny_config(out: Path, **sections) -> dict:
    """A raw config dict; keyword arguments update its sections one level deep (``teacher``
    and ``student`` are replaced whole)."""
    raw = {
        "name": "tiny",
        "seed": 0,
        "output_dir": str(out),
        "threads": 1,
        "teacher_store": None,
        "data": {"dataset": "digits", "batch_size": 64},
        "teacher": {"name": "mlp", "hidden": [64]},
        "student": {"name": "mlp", "hidden": [8]},
        "stages": {
            "teacher": {"epochs": 3, "optimizer": {"name": "adam", "lr": 0.005}},
            "scratch": {"epochs": 2, "optimizer": {"name": "adam", "lr": 0.005}},
            "distil": {"epochs": 2, "optimizer": {"name": "adam", "lr": 0.005}, "alpha": 0.3, "temperature": 4.0},
        },
        "report": {"latency_batch": 1, "throughput_batch": 32, "repeats": 3},
    }
    for key, value in sections.items():
        if key not in ("teacher", "student") and isinstance(value, dict) and isinstance(raw.get(key), dict):
            raw[key] = {**raw[key], **value}
        else:
            raw[key] = value
    return raw


def write_config(path: Path, raw: dict) -> Path:
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path
