"""``kdistill report RUN_DIR``: (re)write ``report.md`` and ``report.html`` of a finished run
from its ``metrics.json`` (``kdistill run`` does this itself at the end). Numbers derived
from the measured accuracies (gain, accuracy recovered) are recomputed with this version's
definitions; for a language-model run, from the held-out losses and perplexities
(perplexity gain, loss gap recovered)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..errors import RunDirectoryError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="write report.md and report.html of a finished run", description=__doc__)
    p.add_argument("run_dir", help="a run directory written by `kdistill run`")
    p.set_defaults(run=run)


def read_metrics(run_dir: str | Path) -> dict:
    """A run's ``metrics.json``; a clear error when the run is not finished."""
    path = Path(run_dir) / "metrics.json"
    if not path.is_file():
        raise RunDirectoryError(
            f"{run_dir} has no metrics.json: not a finished kdistill run (finish it with "
            f"`kdistill run --resume {run_dir}`)")
    return json.loads(path.read_text())


def run(args: argparse.Namespace) -> int:
    from ..run.measure import refresh_metrics, write_run_report

    run_dir = Path(args.run_dir)
    paths = write_run_report(run_dir, refresh_metrics(run_dir, read_metrics(run_dir)))
    for name in ("report.md", "report.html"):
        print(Path(args.run_dir) / name)
    return 0 if paths else 1
