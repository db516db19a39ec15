"""Resumable result files shared by the benchmark scripts.

A benchmark writes its JSON after every finished run; a rerun with the same settings
keeps the runs it finds and adds the missing ones, and a rerun with other settings is
refused unless the caller asks for a fresh file (it would mix two experiments).
"""

from __future__ import annotations

import datetime
import json
import shlex
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any


def open_results(out: str | Path, settings: dict[str, Any], *, fresh: bool) -> dict[str, Any]:
    """The results already in ``out`` if they were made with ``settings``, else ``{}``.

    Raises:
        SystemExit: ``out`` holds runs made with other settings and ``fresh`` is false.
    """
    out = Path(out)
    results = json.loads(out.read_text()) if out.is_file() else {}
    if results.get("settings", settings) != settings:
        if not fresh:
            raise SystemExit(f"{out} holds runs made with other settings ({results['settings']}); "
                             "give another --out, or --fresh to replace them")
        results = {}
    return results


def stamp(results: dict[str, Any], *, wall_seconds: float, machine: dict[str, Any]) -> None:
    """Record who measured, and how long it took: the machine, the UTC date, the command
    line and ``wall_seconds`` (every invocation's time spent training, summed by the caller)."""
    results["machine"] = machine
    results["date"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    results["command"] = shlex.join([sys.executable, *sys.argv])
    results["wall_seconds"] = wall_seconds


def short(fingerprint: str) -> str:
    """``"sha256:<hex>"`` -> its first 16 hex digits (for file names)."""
    return fingerprint.split(":")[-1][:16]


def stats(values: list[float]) -> dict[str, float]:
    """``n``, mean, median, min and max of ``values`` (``{"n": 0}`` when empty)."""
    if not values:
        return {"n": 0}
    return {"n": len(values), "mean": statistics.mean(values), "median": statistics.median(values),
            "min": min(values), "max": max(values)}


def package_source() -> dict[str, Any]:
    """Which kdistill was measured: its folder and, in a git checkout, the commit and whether
    the folder has uncommitted changes (a run of an older commit's package, e.g. from a
    worktree on PYTHONPATH, says so)."""
    import kdistill

    where = Path(kdistill.__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "-C", str(where), "rev-parse", "HEAD"], capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "-C", str(where), "status", "--porcelain", "--", "."],
                                    capture_output=True, text=True, check=True).stdout.strip())
    except (OSError, subprocess.CalledProcessError):
        commit, dirty = None, None
    return {"path": str(where), "commit": commit, "uncommitted_changes": dirty}
