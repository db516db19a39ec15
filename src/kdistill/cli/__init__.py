"""The ``kdistill`` command: one module per subcommand, each with ``add_parser`` and ``run``."""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from .. import __version__
from ..errors import KDistillError
from . import bench, cache, classic, compare, export, layers, report, run, sweep

SUBCOMMANDS = (run, classic, sweep, report, compare, export, bench, layers, cache)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kdistill",
        description="Knowledge distillation for PyTorch: train a small student from a large teacher.",
    )
    parser.add_argument("--version", action="version", version=f"kdistill {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in SUBCOMMANDS:
        module.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit status (2 for usage errors, 1 for failures)."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except KDistillError as e:
        print(f"kdistill {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"kdistill {args.command}: interrupted; continue with `kdistill run --resume RUN_DIR` "
              "(the last checkpoint and finished stages are kept)", file=sys.stderr)
        return 130
