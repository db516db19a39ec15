"""``kdistill run CONFIG.yaml [--set key.path=value ...]`` and ``kdistill run --resume RUN_DIR``.

Runs an experiment file end to end (teacher -> student from scratch -> distilled student ->
report) into its run directory. ``--resume RUN_DIR`` continues a run that was interrupted
(killed, crashed, out of time) from its last training state, with the config saved in the
run directory. A directory that holds a finished run is never overwritten without
``--force``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..config import load_config
from ..errors import RunDirectoryError
from ..experiment import run_experiment
from ..run.directory import read_run_config
from ..report import comparison_table
from ..report.content import stage_label
from .config import add_set_option


def add_common(p: argparse.ArgumentParser, *, config: str = "config", key_value: tuple[str, ...] = ("overrides",)) -> None:
    """``--set`` (see :func:`kdistill.cli.config.add_set_option`), ``--force`` and ``--quiet``."""
    add_set_option(p, config=config, key_value=key_value)
    p.add_argument("--force", action="store_true", help="replace a run directory that holds a finished or different run")
    p.add_argument("--quiet", action="store_true", help="one line per epoch instead of progress bars")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="run an experiment config (teacher, scratch, distilled, report)",
                       description=__doc__)
    p.add_argument("config", nargs="?", metavar="CONFIG", help="experiment YAML, e.g. configs/fashion_mnist/kd/classic_cnn.yaml (may also come after --set)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run from its last checkpoint")
    p.add_argument("--out", default=None, help="run directory (default: the config's output_dir)")
    add_common(p)
    p.set_defaults(run=run)


def print_summary(metrics: dict, run_dir: Path) -> None:
    print()
    if metrics.get("task") == "text":  # a language-model run: perplexities
        from ..report.text import text_model_table

        print(text_model_table(metrics))
        if metrics.get("perplexity_gain") is not None:
            rec = metrics.get("loss_gap_recovered")
            rec_text = "" if rec is None else f"; {100 * rec:.0f}% of the teacher-scratch gap in held-out loss recovered"
            print(f"\nheld-out perplexity, scratch - distilled: {metrics['perplexity_gain']:+.2f}{rec_text}")
        print(f"report: {run_dir / 'report.html'} and {run_dir / 'report.md'}")
        return
    print(comparison_table({stage_label(k): v for k, v in metrics["models"].items()}))
    if metrics.get("distillation_gain_points") is not None:
        rec = metrics.get("accuracy_recovered")
        rec_text = "" if rec is None else f"; accuracy recovered {100 * rec:.0f}% of the teacher-scratch gap"
        print(f"\ndistilled - scratch: {metrics['distillation_gain_points']:+.2f} points{rec_text}")
    print(f"report: {run_dir / 'report.html'} and {run_dir / 'report.md'}")


def run(args: argparse.Namespace) -> int:
    if (args.config is None) == (args.resume is None):
        raise SystemExit("kdistill run: give a config file or --resume RUN_DIR (one of them)")
    verbose = 2 if args.quiet else 1
    if args.resume is not None:
        run_dir = Path(args.resume)
        if args.overrides:
            raise RunDirectoryError("--resume continues a run with its saved config; --set cannot change it. "
                                    "Start a new run (another --out) to change settings.")
        config = read_run_config(run_dir)
        if not (run_dir / "run.json").is_file():
            raise RunDirectoryError(f"{run_dir} has no run.json: it is not a run kdistill started")
        metrics = run_experiment(config, run_dir=run_dir, verbose=verbose)
    else:
        config = load_config(args.config, args.overrides)
        run_dir = Path(args.out) if args.out else config.run_dir()
        metrics = run_experiment(config, run_dir=run_dir, force=args.force, verbose=verbose)
    from .. import distributed

    if distributed.is_main():  # one table, not one per process
        print_summary(metrics, run_dir)
    return 0
