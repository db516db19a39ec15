"""``kdistill classic``: the classic distillation experiment, end to end.

Runs ``configs/fashion_mnist/kd/classic_cnn.yaml`` (shipped with kdistill): with the
Keras example's settings (Adam, alpha 0.1, temperature 10) it trains

1. the teacher (Keras example CNN, 1.4M parameters) on the full training set;
2. the student architecture (21K parameters) from scratch, on the labelled training data;
3. the same student, from the same initial weights and data order, distilled from the
   teacher (plus, with ``--unlabelled``, the rest of the training set as soft-target-only
   data);

then measures each (test accuracy, agreement with the teacher, parameters, size on disk,
CPU latency at batch 1, throughput at batch 256) and writes the run directory and report
of ``kdistill run`` (see :mod:`kdistill.experiment`). The flags below are shortcuts for
``--set`` overrides of that config. Reported accuracies are those of the final weights:
the test set is evaluated each epoch for the curves but never used to pick a model.
"""

from __future__ import annotations

import argparse
from importlib import resources
from pathlib import Path

from ..config import load_config
from ..experiment import run_experiment
from .run import add_common, print_summary

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
    "subset": "data.subset",
    "seed": "seed",
    "threads": "threads",
}


def shipped_config(relative: str = CONFIG) -> Path:
    """A config file shipped with kdistill (``configs/...`` in a checkout, package data
    in an installed wheel)."""
    return Path(str(resources.files("kdistill") / relative))


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "classic",
        help="teacher, student from scratch and distilled student, with a report",
        description=__doc__.split("\n\n")[1],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--out", default=None, help="run directory (default: the config's output_dir)")
    p.add_argument("--dataset", default=None, help="fashion_mnist, mnist, kmnist or digits (default: fashion_mnist)")
    p.add_argument("--data-dir", default=None, help="folder holding the dataset's files (else $KDISTILL_DATA, then Debian's)")
    p.add_argument("--teacher-epochs", type=int, default=None, help="(default 1)")
    p.add_argument("--student-epochs", type=int, default=None, help="epochs of both students (default 2)")
    p.add_argument("--batch-size", type=int, default=None, help="(default 64)")
    p.add_argument("--lr", type=float, default=None, help="Adam learning rate of every stage (default 0.001)")
    p.add_argument("--alpha", type=float, default=None, help="weight of the hard-label loss (default 0.1)")
    p.add_argument("--temperature", type=float, default=None, help="distillation temperature (default 10)")
    p.add_argument("--teacher-temperature", type=float, default=None, help="softmax temperature the teacher trains with (default 1)")
    p.add_argument("--subset", type=int, default=None, metavar="N",
                   help="students see only N labelled training samples (class-balanced); the teacher sees all")
    p.add_argument("--unlabelled", action="store_true",
                   help="with --subset: the rest of the training set joins distillation as soft-target-only data")
    p.add_argument("--seed", type=int, default=None, help="(default 0)")
    p.add_argument("--threads", type=int, default=None, help="PyTorch CPU threads (default: PyTorch's choice)")
    p.add_argument("--config", default=None, help=f"another experiment file to run instead of {CONFIG}")
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
    if args.unlabelled:
        out.append("data.unlabelled=true")
    return out + list(args.overrides)


def run(args: argparse.Namespace) -> int:
    config = load_config(args.config or shipped_config(), overrides_from_args(args))
    run_dir = Path(args.out) if args.out else config.run_dir()
    metrics = run_experiment(config, run_dir=run_dir, force=args.force, verbose=2 if args.quiet else 1)
    from .. import distributed

    if distributed.is_main():
        print_summary(metrics, run_dir)
    return 0
