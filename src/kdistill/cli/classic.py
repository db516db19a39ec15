"""``kdistill classic``: the classic distillation experiment, end to end.

Trains, on one dataset (Fashion-MNIST by default) and with the Keras example's settings
(Adam, alpha 0.1, temperature 10):

1. the teacher (Keras example CNN, 1.4M parameters) on the full training set;
2. the student architecture (21K parameters) from scratch, on the labelled training data;
3. the same student, from the same initial weights and data order, distilled from the
   teacher (plus, with ``--unlabelled``, the rest of the training set as soft-target-only
   data);

then measures each (test accuracy, parameters, size on disk, CPU latency at batch 1,
throughput at batch 256) and writes a run directory::

    RUN_DIR/
      config.json           the settings of this run
      stages/<stage>/       teacher, scratch, distilled: checkpoint.pt, history.json,
                            log.csv, done.json (written last: marks the stage finished)
      metrics.json          every number of the report, and the machine
      accuracy.png          test accuracy per epoch of the three models
      report.md             the comparison table

A finished stage is reused when the command is run again with the same settings (a run
killed mid-way restarts at the first unfinished stage); changed settings retrain the
stages they affect. Reported accuracies are those of the final epoch: the test set is
evaluated each epoch for the curves but never used to pick a model.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from .. import __version__
from ..bench import benchmark_model
from ..callbacks import CSVLogger, History
from ..checkpoint import CheckpointError, atomic_write_text, load_checkpoint, save_checkpoint
from ..data import load_dataset, split_labelled
from ..distiller import Distiller, Trainer
from ..losses.logits import check_temperature
from ..models import build_model
from ..report import comparison_table, human_bytes, plot_curves
from ..runtime import get_device, machine_description, seed_everything, set_threads

STAGES = ("teacher", "scratch", "distilled")


@dataclass(frozen=True)
class ClassicConfig:
    """Settings of the classic experiment (defaults finish in about 10 minutes on 2 CPU cores)."""

    dataset: str = "fashion_mnist"
    data_dir: str | None = None
    teacher: str = "classic_teacher"
    student: str = "classic_student"
    teacher_epochs: int = 1
    student_epochs: int = 2
    batch_size: int = 64
    learning_rate: float = 1e-3
    alpha: float = 0.1
    temperature: float = 10.0
    teacher_temperature: float = 1.0
    subset: int | None = None
    unlabelled: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("teacher_epochs", "student_epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        # fail now, not after the teacher has trained for minutes
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")
        check_temperature(self.temperature)
        check_temperature(self.teacher_temperature)
        if self.learning_rate <= 0:
            raise ValueError(f"learning rate must be > 0, got {self.learning_rate}")
        if self.subset is not None and self.subset < 1:
            raise ValueError(f"--subset must be >= 1, got {self.subset}")
        if self.unlabelled and self.subset is None:
            raise ValueError("--unlabelled needs --subset N: the samples beyond the first N labelled ones are the unlabelled data")


def _fingerprint(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _stage(
    run_dir: Path,
    name: str,
    fingerprint: str,
    model: torch.nn.Module,
    train: Callable[[list], History],
    log: Callable[[str], None],
) -> dict:
    """Train one stage, or reuse it if it already finished with the same fingerprint.

    Returns:
        ``{"history": ..., "seconds": ..., "reused": bool}``.
    """
    stage_dir = run_dir / "stages" / name
    done_path = stage_dir / "done.json"
    if done_path.is_file():
        done = json.loads(done_path.read_text())
        if done.get("fingerprint") == fingerprint:
            try:
                load_checkpoint(stage_dir / "checkpoint.pt", model)
                log(f"[{name}] finished earlier with the same settings: reusing {stage_dir / 'checkpoint.pt'}")
                return {**done, "reused": True}
            except CheckpointError as e:
                log(f"[{name}] cannot reuse the earlier checkpoint ({e}); training again")
        else:
            log(f"[{name}] settings changed since the earlier run: training again")
        done_path.unlink()
    log(f"[{name}] training")
    start = time.perf_counter()
    history = train([CSVLogger(stage_dir / "log.csv")])
    seconds = time.perf_counter() - start
    save_checkpoint(stage_dir / "checkpoint.pt", model, epoch=len(history.epoch) - 1)
    done = {"fingerprint": fingerprint, "seconds": seconds, "history": history.to_dict()}
    atomic_write_text(stage_dir / "history.json", json.dumps(history.to_dict(), indent=1))
    atomic_write_text(done_path, json.dumps(done))
    return {**done, "reused": False}


def run_classic(
    config: ClassicConfig,
    run_dir: str | Path = "runs/classic",
    *,
    verbose: int = 1,
    log: Callable[[str], None] = print,
) -> dict:
    """Run the experiment into ``run_dir``; returns what ``metrics.json`` holds."""
    # 1. set up: data, run directory, seeds
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    device = get_device()
    data = load_dataset(config.dataset, config.data_dir)
    x_train, y_train = torch.from_numpy(data.x_train), torch.from_numpy(data.y_train)
    x_test, y_test = torch.from_numpy(data.x_test), torch.from_numpy(data.y_test)
    if config.subset is not None:
        xl, yl, xr, _ = split_labelled(data.x_train, data.y_train, config.subset, seed=config.seed)
        x_lab, y_lab = torch.from_numpy(xl), torch.from_numpy(yl)
        x_unl = torch.from_numpy(xr) if config.unlabelled else None
    else:
        x_lab, y_lab, x_unl = x_train, y_train, None
    atomic_write_text(run_dir / "config.json", json.dumps({**asdict(config), "kdistill_version": __version__}, indent=1))
    in_channels, size = data.input_shape[0], data.input_shape[-1]

    def build(name: str) -> torch.nn.Module:
        seed_everything(config.seed)  # scratch and distilled students start from the same weights
        return build_model(name, num_classes=data.num_classes, in_channels=in_channels, input_size=size)

    common = dict(batch_size=config.batch_size, validation_data=(x_test, y_test), verbose=verbose, seed=config.seed)
    data_id = (data.name, len(data.x_train), len(data.x_test))
    log(f"data: {data.name}, {len(x_lab)} labelled training samples"
        + (f" + {len(x_unl)} unlabelled" if x_unl is not None else "") + f", {len(x_test)} test samples; device {device}")

    # 2. the teacher, on the full training set
    teacher = build(config.teacher)
    t_fp = _fingerprint(data_id, config.teacher, config.teacher_epochs, config.batch_size,
                        config.learning_rate, config.teacher_temperature, config.seed)

    def train_teacher(callbacks: list) -> History:
        trainer = Trainer(teacher, device=device)
        trainer.compile("adam", metrics=["accuracy"], temperature=config.teacher_temperature,
                        learning_rate=config.learning_rate)
        return trainer.fit(x_train, y_train, epochs=config.teacher_epochs, callbacks=callbacks, **common)

    stages = {"teacher": _stage(run_dir, "teacher", t_fp, teacher, train_teacher, log)}

    # 3. the student from scratch, on the labelled data
    scratch = build(config.student)
    # with unlabelled data the distilled student takes more steps per epoch; give the scratch
    # student as many (cycling its labelled samples), so neither is short of optimisation
    steps = None if x_unl is None else -(-(len(x_lab) + len(x_unl)) // config.batch_size)
    student_id = (data_id, config.student, config.student_epochs, config.batch_size,
                  config.learning_rate, config.subset, config.seed)
    s_fp = _fingerprint(student_id, steps)

    def train_scratch(callbacks: list) -> History:
        trainer = Trainer(scratch, device=device)
        trainer.compile("adam", metrics=["accuracy"], learning_rate=config.learning_rate)
        return trainer.fit(x_lab, y_lab, epochs=config.student_epochs, steps_per_epoch=steps,
                           callbacks=callbacks, **common)

    stages["scratch"] = _stage(run_dir, "scratch", s_fp, scratch, train_scratch, log)

    # 4. the same student distilled from the teacher
    distilled = build(config.student)
    d_fp = _fingerprint(student_id, t_fp, config.alpha, config.temperature, config.unlabelled)

    def train_distilled(callbacks: list) -> History:
        distiller = Distiller(student=distilled, teacher=teacher, device=device)
        distiller.compile(torch.optim.Adam(distilled.parameters(), lr=config.learning_rate), metrics=["accuracy"],
                          alpha=config.alpha, temperature=config.temperature)
        return distiller.fit(x_lab, y_lab, unlabelled=x_unl, epochs=config.student_epochs, callbacks=callbacks, **common)

    stages["distilled"] = _stage(run_dir, "distilled", d_fp, distilled, train_distilled, log)

    # 5. measure and report
    log("measuring accuracy, size and speed")
    models = {"teacher": teacher, "scratch": scratch, "distilled": distilled}
    results: dict[str, dict] = {}
    curves = {name: stages[name]["history"]["history"]["val_accuracy"] for name in STAGES}
    for name, model in models.items():
        model.cpu()  # latency and throughput are the CPU's, whatever trained the model
        # the final weights were evaluated on the test set after the last epoch
        results[name] = {"test_accuracy": curves[name][-1], **benchmark_model(model, data.input_shape)}
        results[name]["train_seconds"] = stages[name]["seconds"]
    metrics = {
        "kdistill_version": __version__,
        "config": asdict(config),
        "dataset": {"name": data.name, "train": len(x_train), "labelled": len(x_lab),
                    "unlabelled": 0 if x_unl is None else len(x_unl), "test": len(x_test)},
        "scratch_steps_per_epoch": steps,
        "models": results,
        "distillation_gain_points": 100 * (results["distilled"]["test_accuracy"] - results["scratch"]["test_accuracy"]),
        "curves": {"val_accuracy": curves},
        "machine": machine_description(),
    }
    atomic_write_text(run_dir / "metrics.json", json.dumps(metrics, indent=1))
    plot_curves(curves, run_dir / "accuracy.png", title=f"Test accuracy per epoch ({data.name})",
                references={"teacher (final)": results["teacher"]["test_accuracy"]})
    atomic_write_text(run_dir / "report.md", render_report(metrics))
    return metrics


def render_report(metrics: dict) -> str:
    """``report.md`` of a classic run from its ``metrics.json``."""
    cfg, ds, m = metrics["config"], metrics["dataset"], metrics["models"]
    gain = metrics["distillation_gain_points"]
    machine = metrics["machine"]
    data_line = f"{ds['labelled']:,} labelled training samples"
    if ds["unlabelled"]:
        data_line += f" + {ds['unlabelled']:,} unlabelled (soft targets only)"
    steps = metrics.get("scratch_steps_per_epoch")
    same_steps = (
        f" The scratch student takes as many optimizer steps as the distilled one ({steps} per epoch, "
        "cycling its labelled samples)." if steps else ""
    )
    lines = [
        f"# Knowledge distillation on {ds['name']}",
        "",
        f"Teacher `{cfg['teacher']}` ({cfg['teacher_epochs']} epoch(s) on {ds['train']:,} samples); "
        f"student `{cfg['student']}` from scratch and distilled ({cfg['student_epochs']} epoch(s) on {data_line}); "
        f"Adam lr {cfg['learning_rate']}, batch {cfg['batch_size']}, alpha {cfg['alpha']}, "
        f"temperature {cfg['temperature']}, seed {cfg['seed']}. Test set: {ds['test']:,} samples.{same_steps}",
        "",
        comparison_table(m),
        "",
        f"**What distillation bought:** the distilled student is {gain:+.2f} points against the same "
        f"student trained from scratch, at {m['teacher']['parameters'] / m['distilled']['parameters']:.0f}x fewer "
        f"parameters and {human_bytes(m['teacher']['size_bytes'])} -> {human_bytes(m['distilled']['size_bytes'])} "
        f"on disk compared with the teacher.",
        "",
        *_advice(m, gain),
        "Training time (s): " + ", ".join(f"{k} {v['train_seconds']:.0f}" for k, v in m.items()) + ".",
        "",
        "![test accuracy per epoch](accuracy.png)",
        "",
        f"Accuracy is that of the final epoch (no selection on the test set). Latency and throughput: "
        f"median of repeated forward passes after warm-up, on {machine['processor']} with "
        f"{machine['torch_threads']} PyTorch thread(s), torch {machine['torch']}.",
        "",
    ]
    return "\n".join(lines)


def _advice(models: dict, gain: float) -> list[str]:
    """A paragraph explaining a result where distillation did not help, else nothing."""
    if gain > 0:
        return []
    gap = 100 * (models["teacher"]["test_accuracy"] - models["scratch"]["test_accuracy"])
    if gap < 1.0:
        t, sc = 100 * models["teacher"]["test_accuracy"], 100 * models["scratch"]["test_accuracy"]
        standing = "only slightly more accurate than" if gap > 0 else "no more accurate than"
        why = (f"The teacher ({t:.2f}%) is {standing} the student trained from scratch ({sc:.2f}%), so "
               "it has little to teach: train it longer (`--teacher-epochs`), or give the students "
               "fewer labels (`--subset N --unlabelled`), where soft targets matter most.")
    else:
        why = ("The student did not catch up with its softened targets in this budget: try more "
               "`--student-epochs`, or a lower `--temperature`.")
    return [f"**Why no gain here:** {why}", ""]


def add_parser(sub: argparse._SubParsersAction) -> None:
    d = ClassicConfig()
    p = sub.add_parser(
        "classic",
        help="teacher, student from scratch and distilled student, with a report",
        description=__doc__.split("\n\n")[1] if __doc__ else None,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--out", default="runs/classic", help="run directory")
    p.add_argument("--dataset", default=d.dataset, help="fashion_mnist, mnist, kmnist or digits")
    p.add_argument("--data-dir", default=None, help="folder holding the dataset's files (else $KDISTILL_DATA, then Debian's)")
    p.add_argument("--teacher-epochs", type=int, default=d.teacher_epochs)
    p.add_argument("--student-epochs", type=int, default=d.student_epochs, help="epochs of both students")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.learning_rate, help="Adam learning rate")
    p.add_argument("--alpha", type=float, default=d.alpha, help="weight of the hard-label loss")
    p.add_argument("--temperature", type=float, default=d.temperature, help="distillation temperature")
    p.add_argument("--teacher-temperature", type=float, default=d.teacher_temperature,
                   help="softmax temperature the teacher is trained with")
    p.add_argument("--subset", type=int, default=None, metavar="N",
                   help="students see only N labelled training samples (class-balanced); the teacher sees all")
    p.add_argument("--unlabelled", action="store_true",
                   help="with --subset: the rest of the training set joins distillation as soft-target-only data")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--threads", type=int, default=None, help="PyTorch CPU threads (default: PyTorch's choice)")
    p.add_argument("--quiet", action="store_true", help="one line per epoch instead of progress bars")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    set_threads(args.threads)
    try:
        config = _config_from_args(args)
    except ValueError as e:
        print(f"kdistill classic: error: {e}", file=sys.stderr)
        return 2
    metrics = run_classic(config, args.out, verbose=2 if args.quiet else 1)
    print()
    print(comparison_table(metrics["models"]))
    print(f"\ndistilled - scratch: {metrics['distillation_gain_points']:+.2f} points")
    print(f"report: {Path(args.out) / 'report.md'}")
    return 0


def _config_from_args(args: argparse.Namespace) -> ClassicConfig:
    return ClassicConfig(
        dataset=args.dataset, data_dir=args.data_dir, teacher_epochs=args.teacher_epochs,
        student_epochs=args.student_epochs, batch_size=args.batch_size, learning_rate=args.lr,
        alpha=args.alpha, temperature=args.temperature, teacher_temperature=args.teacher_temperature,
        subset=args.subset, unlabelled=args.unlabelled, seed=args.seed,
    )
