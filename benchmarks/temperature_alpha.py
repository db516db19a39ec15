"""Which temperature and alpha, with few labels and with all of them? A grid on Fashion-MNIST.

The classic Keras-example student (``classic_student``, 21K parameters) distilled from the
classic teacher (``classic_teacher``, 1.4M) over a grid of temperatures T and alphas
(``alpha`` weights the hard-label loss, ``1 - alpha`` the ``T^2``-scaled KL to the
teacher's softened outputs), in two regimes:

* ``few``: ``--labelled`` (1,000) class-balanced labelled images (``split_labelled``, seed
  0) plus the other training images as unlabelled transfer data
  (``Distiller.fit(x_lab, y_lab, unlabelled=x_rest)``: they add the distillation term
  only). The baseline trains from scratch on the labelled images alone with as many
  optimizer steps as the distilled student (``Trainer.fit(..., steps_per_epoch=
  ceil(N / batch))``, N = labelled + unlabelled).
* ``all``: every training image with its label, scratch and distilled alike.

Each cell is paired with the scratch baseline of its regime and seed: the same initial
weights (``seed_everything(seed)`` before the student is built) and data order
(``fit(seed=seed)``), ``--epochs`` (2), batch 64, Adam lr 1e-3, no augmentation. The
teacher's logits come from a float32 ``TeacherCache`` (exact), built once per regime over
the data in the order ``fit`` indexes it (``[labelled, unlabelled]`` for ``few``, the
training set for ``all``). Test accuracy on the 10,000 test images.

JSON: settings, the teacher, every cell (scratch and distilled accuracy, gain in points,
optimizer steps, times), per-regime summaries (mean, median, min, max over seeds; the best
cell), the machine, date, command line and wall time. Figure: gain against T, one panel
per regime, one line per alpha. The JSON is written after every run and a rerun with the
same settings skips the runs it holds (``--fresh`` starts over).

    # the CPU run (benchmarks/results/temperature_alpha_cpu.json, docs/figures/temperature_alpha.png;
    # 3 seeds, ~11 min at 1 thread of a 2-core CPU)
    python benchmarks/temperature_alpha.py --teacher-checkpoint runs/<run>/stages/teacher/checkpoint.pt
    # a check of the script (< 1 minute)
    python benchmarks/temperature_alpha.py --quick
"""

from __future__ import annotations

import argparse
import json
import math
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
from kdistill.runtime import machine_description, seed_everything
from kdistill.teacher.cache import dataset_fingerprint, teacher_fingerprint

from _results import open_results, short, stamp, stats

HERE = Path(__file__).parent
ROOT = HERE.parent
CACHE_ROOT = Path(tempfile.gettempdir()) / "kdistill_benchmarks"
REGIMES = ("few", "all")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--quick", action="store_true",
                   help="check the script: a 2,000-image pool (100 labelled), 1,000 test images, 1 epoch, seed 0 "
                        "(< 1 minute); writes under the temp folder unless --out/--figure are given")
    p.add_argument("--pool", type=int, default=None,
                   help="training images used (class-balanced subset of the 60,000); default all (--quick 2,000)")
    p.add_argument("--labelled", type=int, default=None,
                   help="labelled images of the few-labels regime, class-balanced (default 1,000; --quick 100)")
    p.add_argument("--test-subset", type=int, default=None, help="evaluate on the first N test images (default all)")
    p.add_argument("--temperatures", type=float, nargs="+", default=[1.0, 2.0, 4.0, 10.0])
    p.add_argument("--alphas", type=float, nargs="+", default=[0.1, 0.5], help="weights of the hard-label loss")
    p.add_argument("--regimes", nargs="+", choices=REGIMES, default=list(REGIMES))
    p.add_argument("--epochs", type=int, default=None, help="default 2 (--quick 1)")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="default 0 1 2 (--quick 0)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    p.add_argument("--teacher-checkpoint", default=None,
                   help="a kdistill checkpoint of classic_teacher; without it the teacher is trained here on the "
                        "pool's labels for --teacher-epochs and kept in --cache-dir")
    p.add_argument("--teacher-epochs", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    p.add_argument("--cache-dir", default=str(CACHE_ROOT), help="teacher caches and a teacher trained here")
    p.add_argument("--out", default=None,
                   help="JSON (default benchmarks/results/temperature_alpha_cpu.json; --quick: temp folder)")
    p.add_argument("--figure", default=None,
                   help="PNG (default docs/figures/temperature_alpha.png; --quick: temp folder; 'none': no figure)")
    p.add_argument("--fresh", action="store_true", help="replace an --out made with other settings")
    p.add_argument("--plot-only", action="store_true", help="redraw --figure from --out, run nothing")
    args = p.parse_args(argv)

    quick = {"pool": 2_000, "labelled": 100, "test_subset": 1_000, "epochs": 1, "seeds": [0]}
    default = {"pool": None, "labelled": 1_000, "test_subset": None, "epochs": 2, "seeds": [0, 1, 2]}
    for key, value in (quick if args.quick else default).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.out is None:
        args.out = str(CACHE_ROOT / "temperature_alpha_quick.json") if args.quick else str(
            HERE / "results" / "temperature_alpha_cpu.json")
    if args.figure is None:
        args.figure = str(CACHE_ROOT / "temperature_alpha_quick.png") if args.quick else str(
            ROOT / "docs" / "figures" / "temperature_alpha.png")
    if args.epochs < 1:
        p.error(f"--epochs must be >= 1, got {args.epochs}")
    if any(not 0 <= a <= 1 for a in args.alphas):
        p.error(f"--alphas must be in [0, 1], got {args.alphas}")
    if any(not t > 0 for t in args.temperatures):
        p.error(f"--temperatures must be > 0, got {args.temperatures}")
    pool = args.pool or 60_000
    if not 10 <= args.labelled < pool:
        p.error(f"--labelled must be in [10, {pool}) (the pool's size), got {args.labelled}")
    return args


def evaluate(trainer: Trainer, x, y) -> float:
    return trainer.evaluate(x, y, batch_size=1000)["accuracy"]


def cell_key(t: float, a: float) -> str:
    return f"T{t:g}/alpha{a:g}"


# ---------------------------------------------------------------------------- set-up
def load_teacher(args, x_pool, y_pool) -> tuple[torch.nn.Module, str]:
    teacher = build_model("classic_teacher")
    if args.teacher_checkpoint:
        meta = load_checkpoint(args.teacher_checkpoint, teacher)
        return teacher, f"loaded {args.teacher_checkpoint} (epoch {meta.get('epoch')})"
    what = f"the labels of the {len(x_pool)}-image pool"
    path = Path(args.cache_dir) / f"teacher-e{args.teacher_epochs}-n{len(x_pool)}-{short(dataset_fingerprint(x_pool))}.pt"
    if path.is_file():
        load_checkpoint(path, teacher)
        return teacher, f"trained earlier by this script on {what}, {args.teacher_epochs} epochs; loaded {path}"
    seed_everything(0)
    teacher = build_model("classic_teacher")
    Trainer(teacher, device=args.device).compile(torch.optim.Adam(teacher.parameters(), lr=args.lr)).fit(
        x_pool, y_pool, epochs=args.teacher_epochs, batch_size=args.batch_size, seed=0, verbose=0)
    save_checkpoint(path, teacher.cpu())
    return teacher, f"trained here on {what}, {args.teacher_epochs} epochs (Adam {args.lr:g}, seed 0); saved {path}"


def build_cache(model: torch.nn.Module, x: torch.Tensor, root: Path, device: str) -> tuple[TeacherCache, float]:
    """A float32 full-logits cache of ``model`` over ``x`` in this order (reused if built before)."""
    path = root / "teacher_caches" / f"{short(teacher_fingerprint(model))}-{short(dataset_fingerprint(x))}-float32"
    start = time.perf_counter()
    cache = TeacherCache.build(model, x, path, mode="full", dtype="float32", device=device,
                               dataset_name="fashion_mnist")
    return cache, time.perf_counter() - start


# ---------------------------------------------------------------------------- summary and figure
def summarise(results: dict, args) -> dict:
    runs, out = results["runs"], {}
    for regime in args.regimes:
        scratch = {s: runs[f"{regime}/seed{s}/scratch"]["test_accuracy"] for s in args.seeds
                   if f"{regime}/seed{s}/scratch" in runs}
        cells = {}
        for t in args.temperatures:
            for a in args.alphas:
                c = cell_key(t, a)
                dist = {s: runs[f"{regime}/seed{s}/{c}"]["test_accuracy"] for s in args.seeds
                        if f"{regime}/seed{s}/{c}" in runs}
                gain = {s: 100 * (dist[s] - scratch[s]) for s in dist if s in scratch}
                cells[c] = {"temperature": t, "alpha": a,
                            "distilled_accuracy": {"per_seed": {str(s): v for s, v in dist.items()}, **stats(list(dist.values()))},
                            "gain_points": {"per_seed": {str(s): v for s, v in gain.items()}, **stats(list(gain.values()))}}
        done = [c for c in cells.values() if c["gain_points"]["n"]]
        best = max(done, key=lambda c: c["gain_points"]["mean"]) if done else None
        worst = min(done, key=lambda c: c["gain_points"]["mean"]) if done else None
        out[regime] = {
            "scratch_accuracy": {"per_seed": {str(s): v for s, v in scratch.items()}, **stats(list(scratch.values()))},
            "cells": cells,
            "best": None if best is None else {"temperature": best["temperature"], "alpha": best["alpha"],
                                               "gain_points_mean": best["gain_points"]["mean"],
                                               "distilled_accuracy_mean": best["distilled_accuracy"]["mean"]},
            "worst": None if worst is None else {"temperature": worst["temperature"], "alpha": worst["alpha"],
                                                 "gain_points_mean": worst["gain_points"]["mean"]},
        }
    return out


def plot(results: dict, path: Path) -> None:
    """The figure, from the JSON alone (``--plot-only`` redraws it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    st, summary = results["settings"], results["summary"]
    titles = {"few": f"{st['labelled']:,} labels + {st['unlabelled']:,} unlabelled images",
              "all": f"all {st['pool']:,} labels"}
    temperatures, alphas = st["temperatures"], st["alphas"]
    fig, axes = plt.subplots(1, len(st["regimes"]), figsize=(6 * len(st["regimes"]), 4.6), squeeze=False)
    for ax, regime in zip(axes[0], st["regimes"]):
        s = summary[regime]
        for a in alphas:
            cells = [s["cells"][cell_key(t, a)] for t in temperatures if s["cells"][cell_key(t, a)]["gain_points"]["n"]]
            if not cells:
                continue
            g = [c["gain_points"] for c in cells]
            ax.errorbar([c["temperature"] for c in cells], [x["mean"] for x in g],
                        yerr=[[x["mean"] - x["min"] for x in g], [x["max"] - x["mean"] for x in g]],
                        marker="o", capsize=4, label=f"alpha = {a:g}")
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_xscale("log")
        ax.set_xticks(temperatures)
        ax.set_xticklabels([f"{t:g}" for t in temperatures])
        ax.minorticks_off()
        ax.set_xlabel("temperature T (log scale)")
        ax.set_ylabel("distilled - scratch test accuracy (points)")
        sc = s["scratch_accuracy"]
        ax.set_title(f"{titles[regime]}\nscratch {100 * sc['mean']:.2f}%" if sc["n"] else titles[regime], fontsize=10)
        ax.legend(fontsize=8, title="alpha: weight of the hard-label loss", title_fontsize=8)
    fig.suptitle(
        f"Fashion-MNIST, classic_teacher ({100 * results['teacher']['test_accuracy']:.2f}%) -> classic_student (21K): "
        f"{st['epochs']} epoch(s), batch {st['batch_size']}, Adam {st['lr']:g}, same optimizer steps for scratch and distilled\n"
        + (f"seeds {st['seeds']} (mean, bars min-max)" if len(st["seeds"]) > 1 else
           f"one seed ({st['seeds'][0]}): single runs, no spread")
        + "; same initial weights and data order for each scratch/distilled pair; test on "
        f"{st['test_samples']:,} images; {results['machine'].get('cuda') or 'CPU'}, {results['date'][:10]}", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.plot_only:
        plot(json.loads(Path(args.out).read_text()), Path(args.figure))
        print(f"drew {args.figure} from {args.out}")
        return
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    cache_root = Path(args.cache_dir)
    cache_root.mkdir(parents=True, exist_ok=True)

    # 1. data: the pool, its labelled part and the rest; the test images
    data = load_dataset("fashion_mnist")
    if args.pool and args.pool < len(data.x_train):
        xp, yp, _, _ = split_labelled(data.x_train, data.y_train, args.pool, seed=0)
    else:
        xp, yp = data.x_train, data.y_train
    x_lab, y_lab, x_rest, _ = split_labelled(xp, yp, args.labelled, seed=0)
    x_pool, y_pool = torch.from_numpy(xp), torch.from_numpy(yp)
    x_lab, y_lab, x_rest = torch.from_numpy(x_lab), torch.from_numpy(y_lab), torch.from_numpy(x_rest)
    x_test, y_test = torch.from_numpy(data.x_test), torch.from_numpy(data.y_test)
    if args.test_subset:
        x_test, y_test = x_test[: args.test_subset], y_test[: args.test_subset]
    n = len(x_pool)
    steps_per_epoch = math.ceil(n / args.batch_size)

    # 2. the teacher; one cache per regime, rows in the order fit indexes them
    teacher, teacher_source = load_teacher(args, x_pool, y_pool)
    teacher.eval()
    teacher_acc = evaluate(Trainer(teacher, device=args.device).compile(metrics=["accuracy"]), x_test, y_test)
    fit_x = {"few": torch.cat([x_lab, x_rest]), "all": x_pool}
    caches, cache_seconds = {}, {}
    for regime in args.regimes:
        caches[regime], cache_seconds[regime] = build_cache(teacher, fit_x[regime], cache_root, args.device)
    print(f"teacher ({teacher_source}): {100 * teacher_acc:.2f}%; caches built/opened in "
          + ", ".join(f"{r} {s:.0f} s" for r, s in cache_seconds.items()), flush=True)

    settings = {
        "dataset": "fashion_mnist", "pool": n, "labelled": len(x_lab), "unlabelled": len(x_rest),
        "selection": "kdistill.data.split_labelled(..., seed=0), class-balanced", "test_samples": len(x_test),
        "teacher": "classic_teacher", "teacher_fingerprint": teacher_fingerprint(teacher),
        "student": "classic_student", "regimes": args.regimes, "temperatures": args.temperatures,
        "alphas": args.alphas, "epochs": args.epochs, "seeds": args.seeds, "batch_size": args.batch_size,
        "optimizer": "Adam", "lr": args.lr, "steps_per_epoch": steps_per_epoch,
        "few_scratch": "Trainer.fit(x_labelled, y_labelled, steps_per_epoch=ceil(pool / batch))",
        "few_distilled": "Distiller.fit(x_labelled, y_labelled, unlabelled=x_rest)",
        "distillation_loss": "KDLoss: T^2 * KL(softmax(t/T) || softmax(s/T))",
        "teacher_outputs": "TeacherCache, full logits, float32, one per regime",
        "device": args.device, "threads": args.threads, "augmentation": None,
    }
    out = Path(args.out)
    results = open_results(out, settings, fresh=args.fresh)
    results.update({"benchmark": "temperature_alpha", "settings": settings,
                    "teacher": {"source": teacher_source, "test_accuracy": teacher_acc,
                                "cache_build_seconds": cache_seconds}})
    runs = results.setdefault("runs", {})

    wall_before = results.get("wall_seconds", 0.0)  # earlier invocations that trained (a resumed run)
    trained: list[str] = []  # the runs this invocation adds

    def save() -> None:
        results["summary"] = summarise(results, args)
        if trained:  # a rerun that only finds its runs done leaves date, command and times alone
            stamp(results, wall_seconds=wall_before + time.perf_counter() - t_start, machine=machine_description())
        atomic_write_text(out, json.dumps(results, indent=1))

    # 3. every seed x regime: the scratch baseline, then every (T, alpha) cell from the same init
    for seed in args.seeds:
        seed_everything(seed)
        init = {k: v.clone() for k, v in build_model("classic_student").state_dict().items()}
        for regime in args.regimes:
            variants = [None] + [(t, a) for t in args.temperatures for a in args.alphas]
            for v in variants:
                key = f"{regime}/seed{seed}/" + ("scratch" if v is None else cell_key(*v))
                if key in runs:
                    continue
                student = build_model("classic_student")
                student.load_state_dict(init)
                optimizer = torch.optim.Adam(student.parameters(), lr=args.lr)
                fit_kwargs = {"epochs": args.epochs, "batch_size": args.batch_size, "seed": seed, "verbose": 0}
                if v is None:
                    runner = Trainer(student, device=args.device).compile(optimizer, metrics=["accuracy"])
                    if regime == "few":
                        fit = lambda: runner.fit(x_lab, y_lab, steps_per_epoch=steps_per_epoch, **fit_kwargs)
                    else:
                        fit = lambda: runner.fit(x_pool, y_pool, **fit_kwargs)
                else:
                    t, a = v
                    runner = Distiller(student=student, teacher=caches[regime], device=args.device)
                    runner.compile(optimizer, metrics=["accuracy"], distillation_loss_fn=KDLoss(temperature=t),
                                   alpha=a, temperature=t)
                    if regime == "few":
                        fit = lambda: runner.fit(x_lab, y_lab, unlabelled=x_rest, **fit_kwargs)
                    else:
                        fit = lambda: runner.fit(x_pool, y_pool, **fit_kwargs)
                load_before = os.getloadavg()
                start = time.perf_counter()
                history = fit()
                seconds = time.perf_counter() - start
                acc = evaluate(runner, x_test, y_test)
                runs[key] = {"regime": regime, "seed": seed, "variant": "scratch" if v is None else "distilled",
                             "temperature": None if v is None else v[0], "alpha": None if v is None else v[1],
                             "test_accuracy": acc, "optimizer_steps": runner.global_step, "train_seconds": seconds,
                             "final_train_logs": {k: h[-1] for k, h in history.history.items()},
                             "load_average_before": load_before, "load_average_after": os.getloadavg()}
                gain = "" if v is None or f"{regime}/seed{seed}/scratch" not in runs else (
                    f", gain {100 * (acc - runs[f'{regime}/seed{seed}/scratch']['test_accuracy']):+.2f}")
                trained.append(key)
                print(f"{key}: {100 * acc:.2f}%{gain} ({runner.global_step} steps, {seconds:.0f} s)", flush=True)
                save()

    # 4. summary, figure, table
    save()
    if args.figure.lower() != "none":
        plot(results, Path(args.figure))
    for regime, s in results["summary"].items():
        print(f"{regime}: scratch {100 * s['scratch_accuracy']['mean']:.2f}%; gain in points (mean over seeds)")
        print("| T | " + " | ".join(f"alpha {a:g}" for a in args.alphas) + " |")
        for t in args.temperatures:
            print(f"| {t:g} | " + " | ".join(f"{s['cells'][cell_key(t, a)]['gain_points']['mean']:+.2f}"
                                             for a in args.alphas) + " |")
        print(f"best: {s['best']}")
    print(f"wrote {out}" + ("" if args.figure.lower() == "none" else f" and {args.figure}")
          + f"; {len(trained)} runs trained in {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
