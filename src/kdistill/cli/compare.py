"""``kdistill compare RUN_DIR...``: several finished runs in one table (e.g. one run per
method, temperature or student), as Markdown on stdout and optionally to a file.

Image runs are compared on test accuracy; language-model runs (``data.text``) on held-out
perplexity: the teacher's, the scratch student's and the distilled student's, the perplexity
gain (scratch - distilled) and the share of the teacher-scratch gap in held-out loss that
distillation recovered. Image and language-model runs can be given together: each kind gets
a table of its own."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..atomic import atomic_write_text
from .report import read_metrics


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compare", help="put several runs in one table", description=__doc__)
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                   help="finished run directories, one row each (image and language-model runs in separate tables)")
    p.add_argument("--out", default=None, help="also write the table here (.md) and the rows beside it (.json)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..report.compare import compare_runs, compare_table

    rows = compare_runs([(str(Path(d)), read_metrics(d)) for d in args.run_dirs])
    table = compare_table(rows)
    print(table)
    if args.out:
        out = Path(args.out)
        atomic_write_text(out, table + "\n")
        atomic_write_text(out.with_suffix(".json"), json.dumps(rows, indent=1, default=str))
        print(f"\nwritten: {out}, {out.with_suffix('.json')}")
    return 0
