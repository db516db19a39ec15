"""``kdistill classic``: the main job, distillation shown where it pays, end to end.

Runs ``configs/fashion_mnist/kd/classic_cnn.yaml`` (shipped with kdistill; the Keras
example's teacher and student CNNs) in two regimes that share one teacher
(:mod:`kdistill.regimes`):

1. the teacher (1.4M parameters) on every label of the training set: it stands for the
   large model you already have (``--teacher-checkpoint FILE`` uses yours instead);
2. **few labels** (the lead result): the student (21K parameters) from scratch on
   ``--labels`` class-balanced labelled samples (default 1,000), and the same student,
   from the same initial weights, distilled from the teacher on those samples plus the
   rest of the training set as soft-target-only data; the scratch student takes as
   many optimizer steps as the distilled one;
3. **all labels**: the same pair with every label, the comparison most papers make
   (``--labels all`` runs this regime alone; ``--no-all-labels`` skips it).

The teacher's outputs are cached once over the training set, so distillation costs
about what plain student training costs. Each regime is a run directory with its own
report (``OUT/few_labels``, ``OUT/all_labels``); ``OUT/report.html`` and ``OUT/report.md``
show both side by side, with the time each stage took. The flags below are shortcuts
for ``--set`` overrides of the config. Reported accuracies are those of the final
weights: the test set is evaluated each epoch for the curves but never picks a model.
"""

from __future__ import annotations

import argparse
from importlib import resources
from pathlib import Path

from ..config import load_config
from ..errors import ConfigError
from ..regimes import run_regimes
from .run import add_common

CONFIG = "configs/fashion_mnist/kd/classic_cnn.yaml"

#: flag -> (config path, how the flag's value becomes the override's)
FLAGS = {
    "dataset": "data.dataset",
    "data_dir": "data.data_dir",
    "teacher_epochs": "stages.teacher.epochs",
    "student_epochs": ("stages.scratch.epochs", "stages.distil.epochs"),
    "batch_size": "data.batch_size",
    "lr": ("stages.teacher.optimizer.lr", "stages.scratch.optimizer.lr", "stages.distil.optimizer.lr"),
    "alpha": "stages.distil.alpha",
    "temperature": "stages.distil.temperature",
    "teacher_temperature": "stages.teacher.temperature",
    "seed": "seed",
    "threads": "threads",
}


def shipped_config(relative: str = CONFIG) -> Path:
    """A config file shipped with kdistill (``configs/...`` in a checkout, package data
    in an installed wheel)."""
    return Path(str(resources.files("kdistill") / relative))


def add_parser(sub: argparse._SubParsersAction) -> None:
    # the flags default to None (the config's value); their help says the shipped config's
    p = sub.add_parser("classic", help="teacher, student from scratch and distilled student, with a report",
                       description=__doc__)
    p.add_argument("--out", default=None, help="folder of both regimes' run directories and their joint report (default: the config's output_dir)")
    p.add_argument("--dataset", default=None, help="fashion_mnist, mnist, kmnist or digits (default: fashion_mnist)")
    p.add_argument("--data-dir", default=None,
                   help="folder holding the dataset's files (default: $KDISTILL_DATA, then Debian's folder)")
    p.add_argument("--teacher-epochs", type=int, default=None,
                   help="epochs of the teacher (default: 2; with --teacher-checkpoint: 0, use it as it is)")
    p.add_argument("--student-epochs", type=int, default=None, help="epochs of both students (default: 5)")
    p.add_argument("--batch-size", type=int, default=None, help="batch size of every stage (default: 64)")
    p.add_argument("--lr", type=float, default=None, help="Adam learning rate of every stage (default: 0.001)")
    p.add_argument("--alpha", type=float, default=None, help="weight of the hard-label loss (default: 0.1)")
    p.add_argument("--temperature", type=float, default=None, help="distillation temperature (default: 10)")
    p.add_argument("--teacher-temperature", type=float, default=None,
                   help="softmax temperature the teacher trains with (default: 1)")
    p.add_argument("--labels", default="1000", metavar="N|all",
                   help="labelled samples of the few-label regime (class-balanced; the rest of the training set is "
                        "its unlabelled transfer set); 'all' runs the all-label regime alone")
    p.add_argument("--subset", type=int, default=None, metavar="N", help="the same as --labels N")
    p.add_argument("--no-all-labels", dest="all_labels", action="store_false",
                   help="run the few-label regime alone (no all-label comparison)")
    p.add_argument("--unlabelled", action="store_true", help=argparse.SUPPRESS)  # the transfer set is always used
    p.add_argument("--teacher-checkpoint", default=None, metavar="FILE",
                   help="a teacher you already have (kdistill checkpoint, PyTorch state_dict or .safetensors of the "
                        "config's teacher architecture), used as it is (with --teacher-epochs N: fine-tuned)")
    p.add_argument("--seed", type=int, default=None, help="random seed of data splits and initial weights (default: 0)")
    p.add_argument("--threads", type=int, default=None, help="PyTorch CPU threads (default: PyTorch's choice)")
    p.add_argument("--config", default=None, metavar="FILE",
                   help=f"another experiment file to run (default: the shipped {CONFIG})")
    add_common(p)
    p.set_defaults(run=run)


def overrides_from_args(args: argparse.Namespace) -> list[str]:
    """The ``--set`` overrides the shortcut flags stand for (then the explicit ``--set``)."""
    out = []
    for flag, paths in FLAGS.items():
        value = getattr(args, flag)
        if value is not None:
            for path in (paths,) if isinstance(paths, str) else paths:
                out.append(f"{path}={value}")
    if args.teacher_checkpoint is not None:
        out.append(f"teacher.checkpoint={args.teacher_checkpoint}")
        if args.teacher_epochs is None:
            out.append("stages.teacher.epochs=0")
    return out + list(args.overrides)


def labels_from_args(args: argparse.Namespace) -> int | None:
    """``--labels``/``--subset`` -> labelled samples of the few-label regime (``None``: all).

    Raises:
        ConfigError: not a positive integer or ``all``.
    """
    if args.subset is not None:
        return args.subset
    text = str(args.labels).strip().lower()
    if text == "all":
        return None
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise ConfigError(f"--labels must be a positive number of labelled samples or 'all', got {args.labels!r}")
    return n


def run(args: argparse.Namespace) -> int:
    labels = labels_from_args(args)
    config = load_config(args.config or shipped_config(), overrides_from_args(args))
    out_dir = Path(args.out) if args.out else config.run_dir()
    summary = run_regimes(config, out_dir, labels=labels, compare_all_labels=args.all_labels, force=args.force,
                          verbose=2 if args.quiet else 1)
    from .. import distributed

    if distributed.is_main():
        print_regimes(summary, out_dir)
    return 0


def print_regimes(summary: dict, out_dir: Path) -> None:
    """The regimes table and the headline sentences, on the terminal."""
    from ..report.regimes import HEADER, headline, table_rows

    rows = [HEADER] + table_rows(summary)
    widths = [max(len(r[i]) for r in rows) for i in range(len(HEADER))]
    print()
    for r in rows:
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
    print()
    for line in headline(summary):
        print(line)
    print(f"\n{summary['wall_seconds']:.0f} s wall. Report: {out_dir / 'report.html'} and {out_dir / 'report.md'}")
