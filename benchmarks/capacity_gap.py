"""Does distillation help a student more, or less, the closer its size is to the teacher's?

Fashion-MNIST, a teacher (``--teacher-arch``, any ``kdistill.models`` builder; default the
classic Keras-example teacher ``classic_teacher``, 1.4M parameters) and students of growing width (``classic_student(width=w)``: filters ``(16w, 32w)``; width 16 is
the teacher's architecture). For every seed and width the same student (``seed_everything
(seed)`` before it is built: the same initial weights; ``fit(seed=seed)``: the same data
order) is

* trained from scratch on the labels (``kdistill.Trainer``), and
* distilled from the teacher at every ``--temperature`` (``kdistill.Distiller``, loss
  ``alpha * CE + (1 - alpha) * T^2 * KL``),

with the same budget: ``--epochs`` over the same training samples, batch 64, Adam lr 1e-3.
The teacher's logits are cached once (``TeacherCache.build``, float32, bit-exact), so a
distillation step costs about what a plain step does. Teacher-assistant distillation
(TAKD, Mirzadeh et al. 2020, arXiv 1902.03393): the assistant (``--assistant-width``,
default 4) is distilled from the teacher, its logits cached, and the width-1 student
distilled from the assistant with the same settings and budget as the direct width-1
distillation it is compared with (same initial weights and data order).

Reported (JSON): per width and seed the parameters, scratch and distilled test accuracy
(10,000 images) per temperature and the gain (distilled - scratch, in points); TAKD rows
(assistant, TAKD student, direct student, TAKD - direct); mean, median, min and max over
seeds; the teacher's test accuracy; training times and load averages; the machine, date,
command line and wall time. Figure: gain against student parameters (one line per
temperature, mean over seeds with min/max bars, TAKD marked), and the accuracies
themselves beside it with the teacher's as a line. ``--series A.json B.json`` draws several
series (one per teacher: colour per teacher, solid/dashed per temperature) on one figure.

The teacher comes from ``--teacher-checkpoint``, or is trained here on all 60,000 labels
(Adam ``--lr``, batch ``--batch-size``, seed 0) for ``--teacher-epochs``, with a constant
learning rate or (``--teacher-schedule cosine``) one annealed to 0 over all its steps; it is
saved under ``--cache-dir`` (the file name holds architecture, schedule, epochs, optimizer
settings and the data's fingerprint) and a rerun loads it. The JSON's ``teacher`` records its
architecture, parameters, epochs, schedule, test accuracy and training seconds.

The JSON is written after every run; a rerun with the same settings skips the runs it
already holds (``--fresh`` starts over). Caches and the assistants' weights are kept under
``--cache-dir``.

    # the CPU run (benchmarks/results/capacity_gap_cpu.json, docs/figures/capacity_gap.png):
    # all 60,000 labels, 1 epoch (the 1-epoch teacher's own budget), seed 0, T 1 and 4;
    # ~20 min at 1 thread of a 2-core CPU, the width-16 student two thirds of it
    python benchmarks/capacity_gap.py --teacher-checkpoint runs/<run>/stages/teacher/checkpoint.pt
    # a stronger teacher (benchmarks/results/capacity_gap_vgg8_cpu.json): vgg8 (3.9M params, BatchNorm)
    # trained here 4 epochs with a cosine schedule, the same students; ~35 min at 1 thread
    python benchmarks/capacity_gap.py --teacher-arch vgg8 --teacher-epochs 4 --teacher-schedule cosine \\
        --threads 1 --out benchmarks/results/capacity_gap_vgg8_cpu.json
    # the figure from both series, nothing trained
    python benchmarks/capacity_gap.py --plot-only --series benchmarks/results/capacity_gap_cpu.json \\
        benchmarks/results/capacity_gap_vgg8_cpu.json --figure docs/figures/capacity_gap.png
    # a GPU: all 60,000 labels, 10 epochs, 3 seeds, device cuda
    python benchmarks/capacity_gap.py --full [--teacher-checkpoint PATH]
    # a check of the script (< 1 minute)
    python benchmarks/capacity_gap.py --quick
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from kdistill import Distiller, Trainer, TeacherCache, build_model, load_dataset
from kdistill.atomic import atomic_write_text
from kdistill.checkpoint import load_checkpoint, save_checkpoint
from kdistill.data import split_labelled
from kdistill.losses import KDLoss
from kdistill.models import MODELS
from kdistill.runtime import machine_description, seed_everything
from kdistill.teacher.cache import dataset_fingerprint, teacher_fingerprint

from _results import open_results, short, stamp, stats

HERE = Path(__file__).parent
ROOT = HERE.parent
CACHE_ROOT = Path(tempfile.gettempdir()) / "kdistill_benchmarks"

PRESETS = {
    # (flag: value) filled in where the command line leaves a flag unset
    "default": {"train_subset": None, "epochs": 1, "seeds": [0], "device": "cpu", "teacher_epochs": 1,
                "test_subset": None},
    "full": {"train_subset": None, "epochs": 10, "seeds": [0, 1, 2], "device": "cuda", "teacher_epochs": 10,
             "test_subset": None},
    "quick": {"train_subset": 1_000, "epochs": 1, "seeds": [0], "device": "cpu", "teacher_epochs": 1,
              "test_subset": 1_000},
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    g = p.add_mutually_exclusive_group()
    g.add_argument("--full", action="store_true",
                   help="GPU preset: all 60,000 labels, 10 epochs, seeds 0 1 2, device cuda, teacher 10 epochs "
                        "if trained here")
    g.add_argument("--quick", action="store_true",
                   help="check the script: 1,000 training and 1,000 test images, 1 epoch, seed 0 (< 1 minute); "
                        "writes under the temp folder unless --out/--figure are given")
    p.add_argument("--train-subset", type=int, default=None,
                   help="class-balanced subset of the 60,000 training images the students train on "
                        "(kdistill.data.split_labelled, seed 0); default all 60,000")
    p.add_argument("--test-subset", type=int, default=None, help="evaluate on the first N test images (default all)")
    p.add_argument("--epochs", type=int, default=None, help="epochs of every student (default 1, the main job's teacher's budget; --full 10)")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="default 0 (--full 0 1 2)")
    p.add_argument("--widths", type=float, nargs="+", default=[1, 2, 4, 8, 16],
                   help="student widths (classic_student(width=w); 16 is the teacher's architecture)")
    p.add_argument("--alpha", type=float, default=0.1, help="weight of the hard-label loss")
    p.add_argument("--temperature", type=float, nargs="+", default=[1.0, 4.0],
                   help="distillation temperatures, each a separate distilled student")
    p.add_argument("--assistant-width", type=float, default=4.0, help="TAKD assistant's width (0: no TAKD)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    p.add_argument("--teacher-arch", default="classic_teacher", choices=sorted(MODELS), metavar="NAME",
                   help="the teacher's kdistill.models builder (10 classes, 1 channel, 28x28); default classic_teacher")
    p.add_argument("--teacher-checkpoint", default=None,
                   help="a kdistill checkpoint of --teacher-arch; without it the teacher is trained here on all "
                        "60,000 labels (--quick: on the training subset) for --teacher-epochs and kept in --cache-dir")
    p.add_argument("--teacher-epochs", type=int, default=None, help="default 1 (--full 10)")
    p.add_argument("--teacher-schedule", choices=["constant", "cosine"], default="constant",
                   help="learning rate of a teacher trained here: constant (default, as the classic teacher) or "
                        "cosine-annealed from --lr to 0 over all its steps")
    p.add_argument("--device", default=None, help="cpu (default) or cuda (--full)")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    p.add_argument("--cache-dir", default=str(CACHE_ROOT), help="teacher caches, a trained teacher, assistants")
    p.add_argument("--out", default=None,
                   help="JSON to write (default benchmarks/results/capacity_gap_cpu.json; --full: "
                        "capacity_gap_gpu.json; --quick: in the temp folder)")
    p.add_argument("--figure", default=None,
                   help="PNG to write (default docs/figures/capacity_gap.png; --full: capacity_gap_gpu.png; "
                        "--quick: in the temp folder; 'none' for no figure)")
    p.add_argument("--fresh", action="store_true", help="replace an --out made with other settings")
    p.add_argument("--plot-only", action="store_true",
                   help="redraw --figure from --out (or from the --series files), run nothing")
    p.add_argument("--series", nargs="+", default=None, metavar="JSON",
                   help="results of other runs (e.g. with another teacher) drawn with this one on the figure; with "
                        "--plot-only, exactly these files")
    args = p.parse_args(argv)

    preset = "full" if args.full else "quick" if args.quick else "default"
    for key, value in PRESETS[preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    names = {"default": ("capacity_gap_cpu.json", "capacity_gap.png"),
             "full": ("capacity_gap_gpu.json", "capacity_gap_gpu.png")}
    if args.out is None:
        args.out = str(CACHE_ROOT / "capacity_gap_quick.json") if args.quick else str(HERE / "results" / names[preset][0])
    if args.figure is None:
        args.figure = str(CACHE_ROOT / "capacity_gap_quick.png") if args.quick else str(ROOT / "docs" / "figures" / names[preset][1])
    args.preset = preset

    if args.teacher_epochs < 1:
        p.error(f"--teacher-epochs must be >= 1, got {args.teacher_epochs}")
    if args.epochs < 1:
        p.error(f"--epochs must be >= 1, got {args.epochs}")
    if args.train_subset is not None and not 10 <= args.train_subset <= 60_000:
        p.error(f"--train-subset must be in [10, 60000], got {args.train_subset}")
    if not 0 <= args.alpha <= 1:
        p.error(f"--alpha must be in [0, 1], got {args.alpha}")
    if any(not t > 0 for t in args.temperature):
        p.error(f"--temperature values must be > 0, got {args.temperature}")
    if any(not w > 0 for w in args.widths):
        p.error(f"--widths must be > 0, got {args.widths}")
    if args.assistant_width and 1.0 not in args.widths:
        p.error("TAKD compares with the direct width-1 student: keep 1 in --widths, or --assistant-width 0")
    return args


def width_key(w: float) -> str:
    return f"x{w:g}"


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_accuracy(trainer: Trainer, x: torch.Tensor, y: torch.Tensor) -> float:
    return trainer.evaluate(x, y, batch_size=1000)["accuracy"]


def model_accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, device: str) -> float:
    """Test accuracy of a trained network (the teacher, an assistant)."""
    return test_accuracy(Trainer(model, device=device).compile(metrics=["accuracy"]), x, y)


# ---------------------------------------------------------------------------- set-up
def teacher_steps(n: int, batch_size: int, epochs: int) -> int:
    """Optimizer steps of the teacher's training (the last, smaller batch included)."""
    return epochs * -(-n // batch_size)


def load_teacher(args, x_all, y_all, x_sub, y_sub) -> tuple[torch.nn.Module, dict]:
    """The teacher from --teacher-checkpoint, else trained here (and kept for reruns).

    Returns the network and what the JSON records of it (``source``, ``arch``, ``epochs``,
    ``schedule``, ``train_seconds``, ...)."""
    arch = args.teacher_arch
    teacher = build_model(arch, num_classes=10, in_channels=1, input_size=28)
    if args.teacher_checkpoint:
        meta = load_checkpoint(args.teacher_checkpoint, teacher)
        last = meta.get("epoch")  # kdistill's stages save the index of the last epoch (0-based)
        extra = meta.get("extra") or {}
        return teacher, {"source": f"loaded {args.teacher_checkpoint} (epoch {last})", "arch": arch,
                         "epochs": extra.get("epochs", None if last is None else last + 1),
                         "schedule": extra.get("schedule"), "train_seconds": extra.get("train_seconds"),
                         "trained_on": extra.get("trained_on")}
    x_t, y_t, what = (x_sub, y_sub, f"the {len(x_sub)}-image training subset") if args.quick else (
        x_all, y_all, "all 60,000 labels")
    fp = short(dataset_fingerprint(x_t))
    if arch == "classic_teacher" and args.teacher_schedule == "constant":
        name = f"teacher-e{args.teacher_epochs}-n{len(x_t)}-{fp}.pt"  # the name of the earlier version's files
    else:
        name = (f"teacher-{arch}-{args.teacher_schedule}-e{args.teacher_epochs}-lr{args.lr:g}-b{args.batch_size}"
                f"-n{len(x_t)}-{fp}.pt")
    path = Path(args.cache_dir) / name
    steps = teacher_steps(len(x_t), args.batch_size, args.teacher_epochs)
    info = {"arch": arch, "epochs": args.teacher_epochs, "schedule": args.teacher_schedule,
            "trained_on": what, "train_samples": len(x_t), "optimizer": "Adam", "lr": args.lr,
            "batch_size": args.batch_size, "steps": steps, "seed": 0,
            "schedule_detail": (f"CosineAnnealingLR(T_max={steps}), stepped after every optimizer step: "
                                f"lr {args.lr:g} -> 0" if args.teacher_schedule == "cosine" else f"lr {args.lr:g}"),
            "checkpoint": str(path)}
    if path.is_file():
        meta = load_checkpoint(path, teacher)
        extra = meta.get("extra") or {}
        info.update(train_seconds=extra.get("train_seconds"), train_threads=extra.get("train_threads"),
                    final_train_logs=extra.get("final_train_logs"))
        return teacher, {"source": f"trained earlier by this script on {what}, {args.teacher_epochs} epochs "
                                   f"({args.teacher_schedule} lr); loaded {path}", **info}
    seed_everything(0)
    teacher = build_model(arch, num_classes=10, in_channels=1, input_size=28)
    optimizer = torch.optim.Adam(teacher.parameters(), lr=args.lr)
    scheduler = (torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
                 if args.teacher_schedule == "cosine" else None)
    print(f"training the teacher {arch} ({n_params(teacher):,} params) on {what}: {args.teacher_epochs} epochs, "
          f"{steps} steps, {info['schedule_detail']}", flush=True)
    start = time.perf_counter()
    history = Trainer(teacher, device=args.device).compile(
        optimizer, metrics=["accuracy"], scheduler=scheduler, scheduler_interval="step").fit(
        x_t, y_t, epochs=args.teacher_epochs, batch_size=args.batch_size, seed=0, verbose=2)
    seconds = time.perf_counter() - start
    info.update(train_seconds=seconds, train_threads=torch.get_num_threads(),
                final_train_logs={k: v[-1] for k, v in history.history.items()})
    save_checkpoint(path, teacher.cpu(), epoch=args.teacher_epochs - 1, extra={
        k: info[k] for k in ("epochs", "schedule", "schedule_detail", "trained_on", "train_samples", "optimizer",
                             "lr", "batch_size", "steps", "seed", "train_seconds", "train_threads",
                             "final_train_logs")})
    return teacher, {"source": f"trained here on {what}, {args.teacher_epochs} epochs (Adam {args.lr:g}, "
                               f"{args.teacher_schedule} lr, seed 0); saved {path}", **info}


def build_cache(model: torch.nn.Module, x: torch.Tensor, root: Path, device: str) -> tuple[TeacherCache, float]:
    """A float32 full-logits cache of ``model`` over ``x`` (reused if built before)."""
    path = root / "teacher_caches" / f"{short(teacher_fingerprint(model))}-{short(dataset_fingerprint(x))}-float32"
    start = time.perf_counter()
    cache = TeacherCache.build(model, x, path, mode="full", dtype="float32", device=device,
                               dataset_name="fashion_mnist")
    return cache, time.perf_counter() - start


# ---------------------------------------------------------------------------- one run
def train(args, init: dict, width: float, x, y, x_test, y_test, teacher=None, temperature=None, seed=0):
    """One student from ``init``: from scratch (``teacher=None``) or distilled. Returns (row, model)."""
    student = build_model("classic_student", width=width)
    student.load_state_dict(init)
    optimizer = torch.optim.Adam(student.parameters(), lr=args.lr)
    if teacher is None:
        runner = Trainer(student, device=args.device).compile(optimizer, metrics=["accuracy"])
    else:
        runner = Distiller(student=student, teacher=teacher, device=args.device)
        runner.compile(optimizer, metrics=["accuracy"], distillation_loss_fn=KDLoss(temperature=temperature),
                       alpha=args.alpha, temperature=temperature)
    load_before = os.getloadavg()
    start = time.perf_counter()
    history = runner.fit(x, y, epochs=args.epochs, batch_size=args.batch_size, seed=seed, verbose=0)
    seconds = time.perf_counter() - start
    acc = test_accuracy(runner, x_test, y_test)
    last = {k: v[-1] for k, v in history.history.items()}
    row = {"test_accuracy": acc, "train_seconds": seconds, "samples_per_second": len(x) * args.epochs / seconds,
           "final_train_logs": last, "load_average_before": load_before, "load_average_after": os.getloadavg()}
    return row, student


# ---------------------------------------------------------------------------- summary
def summarise(results: dict, args) -> dict:
    runs = results["runs"]
    temps = [f"T{t:g}" for t in args.temperature]
    widths = []
    for w in args.widths:
        k = width_key(w)
        scratch = {s: runs[f"{k}/seed{s}/scratch"]["test_accuracy"] for s in args.seeds if f"{k}/seed{s}/scratch" in runs}
        row = {"width": w, "filters": [round(16 * w), round(32 * w)], "params": results["params"][k],
               "scratch_accuracy": {"per_seed": {str(s): a for s, a in scratch.items()}, **stats(list(scratch.values()))},
               "distilled_accuracy": {}, "gain_points": {}}
        for t in temps:
            dist = {s: runs[f"{k}/seed{s}/{t}"]["test_accuracy"] for s in args.seeds if f"{k}/seed{s}/{t}" in runs}
            gain = {s: 100 * (dist[s] - scratch[s]) for s in dist if s in scratch}
            row["distilled_accuracy"][t] = {"per_seed": {str(s): a for s, a in dist.items()}, **stats(list(dist.values()))}
            row["gain_points"][t] = {"per_seed": {str(s): g for s, g in gain.items()}, **stats(list(gain.values()))}
        widths.append(row)
    takd = {}
    if args.assistant_width:
        a = width_key(args.assistant_width)
        for t in temps:
            rows = {s: runs[f"takd/seed{s}/{t}"] for s in args.seeds if f"takd/seed{s}/{t}" in runs}
            direct = {s: runs[f"x1/seed{s}/{t}"]["test_accuracy"] for s in rows if f"x1/seed{s}/{t}" in runs}
            scratch = {s: runs[f"x1/seed{s}/scratch"]["test_accuracy"] for s in rows if f"x1/seed{s}/scratch" in runs}
            vs_direct = [100 * (rows[s]["test_accuracy"] - direct[s]) for s in rows if s in direct]
            vs_scratch = [100 * (rows[s]["test_accuracy"] - scratch[s]) for s in rows if s in scratch]
            takd[t] = {
                "assistant_width": args.assistant_width,
                "assistant_accuracy": stats([r["assistant_accuracy"] for r in rows.values()]),
                "takd_accuracy": stats([r["test_accuracy"] for r in rows.values()]),
                "direct_accuracy": stats(list(direct.values())),
                "scratch_accuracy": stats(list(scratch.values())),
                "takd_minus_direct_points": {"per_seed": dict(zip(map(str, rows), vs_direct)), **stats(vs_direct)},
                "takd_minus_scratch_points": {"per_seed": dict(zip(map(str, rows), vs_scratch)), **stats(vs_scratch)},
                "assistant_key": f"{a}/seed*/{t}",
            }
    return {"widths": widths, "takd": takd}


STUDENT_SETTINGS = ("dataset", "student", "widths", "train_samples", "train_fingerprint", "test_samples", "epochs",
                    "seeds", "batch_size", "optimizer", "lr", "alpha", "temperatures", "distillation_loss",
                    "assistant_width", "device", "threads", "augmentation")


def teacher_label(results: dict) -> str:
    """``"vgg8 4 epochs, cosine lr (92.10%)"``; earlier files without the teacher's epochs recorded
    give them from the loaded checkpoint's ``(epoch N)`` (kdistill's 0-based index of the last one)."""
    t, st = results["teacher"], results["settings"]
    arch = t.get("arch") or st.get("teacher", "teacher")
    epochs = t.get("epochs")
    if epochs is None:
        import re

        m = re.search(r"\(epoch (\d+)\)", t.get("source", ""))
        epochs = int(m.group(1)) + 1 if m else None
    label = arch + ("" if epochs is None else f" {epochs} epoch{'s' if epochs != 1 else ''}")
    if t.get("schedule") == "cosine":
        label += ", cosine lr"
    return f"{label} ({100 * t['test_accuracy']:.1f}%)"


def plot(series: dict | list[dict], path: Path) -> None:
    """The figure, from the JSON(s) alone (``--plot-only`` redraws it): one or more series, each a
    teacher with the same students (colour per teacher, solid/dashed/dotted per temperature)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    series = [series] if isinstance(series, dict) else list(series)
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(13, 6.4))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    all_temps = sorted({t for r in series for t in r["settings"]["temperatures"]}, reverse=True)
    styles = dict(zip(all_temps, ["-", "--", ":", "-."] * 4))  # the highest temperature solid
    first = series[0]["settings"]
    differ = [k for k in STUDENT_SETTINGS if any(r["settings"].get(k) != first.get(k) for r in series)]
    x1 = min(r["params"] for res in series for r in res["summary"]["widths"])
    handles = []
    for i, res in enumerate(series):
        summary, st, color = res["summary"], res["settings"], colors[i % len(colors)]
        name = teacher_label(res)
        shown = [k for k in differ if k not in ("train_fingerprint", "widths", "distillation_loss")]
        if shown:  # the students were not trained alike: say how each series differs
            name += " [" + ", ".join(f"{k}={st.get(k)}" for k in shown) + "]"
        handles.append(Line2D([], [], color=color, linewidth=3, label=f"teacher {name}"))
        for t in (f"T{t:g}" for t in st["temperatures"]):
            pts = [(r["params"], r["gain_points"][t]) for r in summary["widths"] if r["gain_points"][t]["n"]]
            if not pts:
                continue
            ls = styles[float(t[1:])]
            px = [p for p, _ in pts]
            mean = [g["mean"] for _, g in pts]
            err = [[g["mean"] - g["min"] for _, g in pts], [g["max"] - g["mean"] for _, g in pts]]
            ax.errorbar(px, mean, yerr=err, marker="o", capsize=4, color=color, linestyle=ls)
            tk = summary["takd"].get(t)
            if tk and tk["takd_minus_scratch_points"]["n"]:
                g = tk["takd_minus_scratch_points"]
                ax.errorbar([x1 * (1.15 + 0.1 * i)], [g["mean"]], yerr=[[g["mean"] - g["min"]], [g["max"] - g["mean"]]],
                            marker="*", markersize=13, capsize=4, color=color, linestyle="none",
                            markerfacecolor=color if ls == "-" else "white")
            d = [r["distilled_accuracy"][t] for r in summary["widths"] if r["distilled_accuracy"][t]["n"]]
            ax2.plot(px, [100 * a["mean"] for a in d], marker="o", color=color, linestyle=ls)
        ax2.axhline(100 * res["teacher"]["test_accuracy"], color=color, linewidth=1, alpha=0.7, linestyle=(0, (1, 3)))
        sc = [r for r in summary["widths"] if r["scratch_accuracy"]["n"]]
        ax2.plot([r["params"] for r in sc], [100 * r["scratch_accuracy"]["mean"] for r in sc], marker="s",
                 color="black", linewidth=1, markersize=5, zorder=1 if i else 3)
    handles += [Line2D([], [], color="gray", linestyle=styles[t], marker="o", label=f"distilled, T = {t:g}")
                for t in all_temps]
    assistant = first.get("assistant_width")
    if assistant:
        handles += [Line2D([], [], color="gray", marker="*", markersize=12, linestyle="none",
                           markerfacecolor="gray" if styles[t] == "-" else "white",
                           label=f"TAKD: x1 via x{assistant:g} assistant, T = {t:g}") for t in all_temps]
    ax.axhline(0, color="black", linewidth=0.8)
    for r in series[0]["summary"]["widths"]:  # width labels above the top edge
        ax.annotate(width_key(r["width"]), (r["params"], 1), xycoords=ax.get_xaxis_transform(),
                    textcoords="offset points", xytext=(0, 3), ha="center", va="bottom", fontsize=8, color="gray")
    ax.set_xscale("log")
    ax.set_xlabel("student parameters (log scale)")
    ax.set_ylabel("distilled - scratch test accuracy (points)")
    ax.set_title("Gain from distillation by student size (width above)", pad=16)
    ax2.set_xscale("log")
    ax2.set_xlabel("student parameters (log scale)")
    ax2.set_ylabel("test accuracy (%), mean over seeds")
    ax2.set_title("Test accuracy (dotted: the teachers)", pad=16)
    handles.insert(len(series), Line2D([], [], color="black", marker="s", markersize=5, linewidth=1,
                                       label="from scratch (right)"))
    fig.legend(handles=handles, loc="lower center", ncol=2 if len(handles) > 5 else len(handles), fontsize=8.5,
               frameon=False)
    n_train, st = first["train_samples"], first
    teachers = ", ".join(f"{r['settings']['teacher']} ({r['teacher']['params'] / 1e6:.2f}M params)" for r in series)
    seeds = (f"seeds {st['seeds']} (mean, bars min-max)" if len(st["seeds"]) > 1 else
             f"one seed ({st['seeds'][0]}): single runs, no spread")
    dates = sorted({r["date"][:10] for r in series if r.get("date")})
    students = (f"students (the same in every series): {n_train:,} labelled training images, {st['epochs']} "
                f"epoch(s), batch {st['batch_size']}, Adam {st['lr']:g}, alpha {st['alpha']:g}, "
                f"T {', '.join(f'{t:g}' for t in st['temperatures'])}; test on {st['test_samples']:,} images"
                if not differ else f"students trained differently between the series ({', '.join(differ)}): see legend")
    fig.suptitle(
        f"Fashion-MNIST, teacher{'s' if len(series) > 1 else ''} {teachers} -> classic_student(width)\n{students}\n"
        f"{seeds}; same initial weights and data order for each scratch/distilled pair"
        + (" (and across teachers)" if len(series) > 1 and not differ else "")
        + f"; {series[0].get('machine', {}).get('cuda') or 'CPU'}, {' and '.join(dates)}",
        fontsize=9)
    rows = -(-len(handles) // (2 if len(handles) > 5 else len(handles)))
    fig.tight_layout(rect=(0, 0.035 * rows + 0.02, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.plot_only:
        files = args.series or [args.out]
        plot([json.loads(Path(f).read_text()) for f in files], Path(args.figure))
        print(f"drew {args.figure} from {', '.join(files)}")
        return
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    cache_root = Path(args.cache_dir)
    cache_root.mkdir(parents=True, exist_ok=True)

    # 1. data: the students' class-balanced training subset, the test images
    data = load_dataset("fashion_mnist")
    x_all, y_all = torch.from_numpy(data.x_train), torch.from_numpy(data.y_train)
    if args.train_subset and args.train_subset < len(x_all):
        xs, ys, _, _ = split_labelled(data.x_train, data.y_train, args.train_subset, seed=0)
        x, y = torch.from_numpy(xs), torch.from_numpy(ys)
    else:
        x, y = x_all, y_all
    x_test, y_test = torch.from_numpy(data.x_test), torch.from_numpy(data.y_test)
    if args.test_subset:
        x_test, y_test = x_test[: args.test_subset], y_test[: args.test_subset]

    # 2. the teacher and its cached logits over the students' training images
    teacher, teacher_info = load_teacher(args, x_all, y_all, x, y)
    teacher_source = teacher_info["source"]
    teacher.eval()
    teacher_acc = model_accuracy(teacher, x_test, y_test, args.device)
    teacher_cache, cache_seconds = build_cache(teacher, x, cache_root, args.device)
    print(f"teacher ({teacher_source}): {100 * teacher_acc:.2f}% on {len(x_test)} test images; "
          f"cache over {len(x)} images in {cache_seconds:.1f} s", flush=True)

    settings = {
        "dataset": "fashion_mnist", "train_samples": len(x), "train_subset": args.train_subset,
        "train_subset_selection": "kdistill.data.split_labelled(x_train, y_train, n, seed=0), class-balanced",
        "test_samples": len(x_test), "train_fingerprint": dataset_fingerprint(x),
        "teacher": args.teacher_arch, "teacher_fingerprint": teacher_fingerprint(teacher),
        "student": "classic_student(width=w)", "widths": args.widths, "epochs": args.epochs, "seeds": args.seeds,
        "batch_size": args.batch_size, "optimizer": "Adam", "lr": args.lr, "alpha": args.alpha,
        "temperatures": args.temperature, "distillation_loss": "KDLoss: T^2 * KL(softmax(t/T) || softmax(s/T))",
        "teacher_outputs": "TeacherCache, full logits, float32", "assistant_width": args.assistant_width,
        "device": args.device, "threads": args.threads, "augmentation": None, "preset": args.preset,
    }
    out = Path(args.out)
    results = open_results(out, settings, fresh=args.fresh)
    results.update({
        "benchmark": "capacity_gap", "settings": settings,
        "teacher": {**teacher_info, "test_accuracy": teacher_acc, "params": n_params(teacher),
                    "cache_build_seconds": cache_seconds},
        "params": {width_key(w): n_params(build_model("classic_student", width=w)) for w in args.widths},
    })
    runs = results.setdefault("runs", {})
    weights_dir = cache_root / f"capacity_gap-{short(settings['train_fingerprint'])}-{short(settings['teacher_fingerprint'])}"
    weights_dir.mkdir(parents=True, exist_ok=True)

    wall_before = results.get("wall_seconds", 0.0)  # earlier invocations that trained (a resumed run)
    trained: list[str] = []  # the runs this invocation adds

    def save() -> None:
        results["summary"] = summarise(results, args)
        if trained:  # a rerun that only finds its runs done leaves date, command and times alone
            stamp(results, wall_seconds=wall_before + time.perf_counter() - t_start, machine=machine_description())
        atomic_write_text(out, json.dumps(results, indent=1))

    def assistant_path(seed: int, t: float) -> Path:
        return weights_dir / (f"assistant-{width_key(args.assistant_width)}-e{args.epochs}-a{args.alpha:g}"
                              f"-T{t:g}-lr{args.lr:g}-b{args.batch_size}-seed{seed}.pt")

    # 3. every seed x width: scratch, then distilled at every temperature (same init, same data order)
    for seed in args.seeds:
        for w in args.widths:
            k = width_key(w)
            seed_everything(seed)
            init = {n: v.clone() for n, v in build_model("classic_student", width=w).state_dict().items()}
            for t in [None, *args.temperature]:
                key = f"{k}/seed{seed}/" + ("scratch" if t is None else f"T{t:g}")
                keep = t is not None and w == args.assistant_width and not assistant_path(seed, t).is_file()
                if key in runs and not keep:
                    continue
                row, model = train(args, init, w, x, y, x_test, y_test,
                                   teacher=None if t is None else teacher_cache, temperature=t, seed=seed)
                if t is not None and w == args.assistant_width:
                    torch.save(model.state_dict(), assistant_path(seed, t))
                runs[key] = {"width": w, "seed": seed, "variant": "scratch" if t is None else "distilled",
                             "temperature": t, **row}
                trained.append(key)
                print(f"{key}: {100 * row['test_accuracy']:.2f}% ({row['train_seconds']:.0f} s)", flush=True)
                save()

        # 4. TAKD: teacher -> assistant (the distilled run above) -> width-1 student, per temperature
        if not args.assistant_width:
            continue
        seed_everything(seed)
        init1 = {n: v.clone() for n, v in build_model("classic_student", width=1.0).state_dict().items()}
        for t in args.temperature:
            key = f"takd/seed{seed}/T{t:g}"
            if key in runs:
                continue
            assistant = build_model("classic_student", width=args.assistant_width)
            if assistant_path(seed, t).is_file():
                assistant.load_state_dict(torch.load(assistant_path(seed, t), map_location="cpu", weights_only=True))
            else:  # an assistant width outside --widths: distil it here
                seed_everything(seed)
                init_a = {n: v.clone() for n, v in assistant.state_dict().items()}
                _, assistant = train(args, init_a, args.assistant_width, x, y, x_test, y_test,
                                     teacher=teacher_cache, temperature=t, seed=seed)
                torch.save(assistant.state_dict(), assistant_path(seed, t))
            assistant.eval()
            assistant_acc = model_accuracy(assistant, x_test, y_test, args.device)
            assistant_cache, a_seconds = build_cache(assistant, x, cache_root, args.device)
            row, _ = train(args, init1, 1.0, x, y, x_test, y_test, teacher=assistant_cache, temperature=t, seed=seed)
            runs[key] = {"width": 1.0, "seed": seed, "variant": "takd", "temperature": t,
                         "assistant_width": args.assistant_width, "assistant_accuracy": assistant_acc,
                         "assistant_cache_build_seconds": a_seconds, **row}
            trained.append(key)
            print(f"{key} (via {width_key(args.assistant_width)}, {100 * assistant_acc:.2f}%): "
                  f"{100 * row['test_accuracy']:.2f}% ({row['train_seconds']:.0f} s)", flush=True)
            save()

    # 5. summary, figure, table
    save()
    if args.figure.lower() != "none":
        plot([results] + [json.loads(Path(f).read_text()) for f in args.series or []], Path(args.figure))
    s = results["summary"]
    temps = [f"T{t:g}" for t in args.temperature]
    print(f"teacher {100 * teacher_acc:.2f}%")
    print("| width | params | scratch | " + " | ".join(f"distilled {t} | gain {t}" for t in temps) + " |")
    for r in s["widths"]:
        cells = [f"{100 * r['distilled_accuracy'][t]['mean']:.2f} | {r['gain_points'][t]['mean']:+.2f} "
                 f"[{r['gain_points'][t]['min']:+.2f}, {r['gain_points'][t]['max']:+.2f}]" for t in temps]
        print(f"| {width_key(r['width'])} | {r['params']:,} | {100 * r['scratch_accuracy']['mean']:.2f} | "
              + " | ".join(cells) + " |")
    for t, r in s["takd"].items():
        print(f"TAKD {t}: assistant {100 * r['assistant_accuracy']['mean']:.2f}%, takd {100 * r['takd_accuracy']['mean']:.2f}%, "
              f"direct {100 * r['direct_accuracy']['mean']:.2f}%, takd - direct {r['takd_minus_direct_points']['mean']:+.2f} pts")
    print(f"wrote {out}" + ("" if args.figure.lower() == "none" else f" and {args.figure}")
          + f"; {len(trained)} runs trained in {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
