"""Does a student learn more from an ensemble of teachers than from the best one of them?

Fashion-MNIST. Three teachers of different architectures, each from its own seed, trained
on every label: a CNN (``classic_cnn``, the Keras example's teacher with filters 64 and 128
instead of 256 and 512, seed 1, 2 epochs), a narrower one (filters 32 and 64, seed 2, 3
epochs) and an MLP (``mlp`` 512-256, seed 3, 5 epochs). The Keras example's full-width
teacher costs 14 minutes an epoch on a shared 2-core CPU, too much for this budget.
Their logits over the training set are cached once per teacher (a cache per member,
float32: exact), so every distillation costs what plain student training costs.

Then, per student seed, the same ``classic_student`` (same initial weights, same data
order, same epochs, same loss: KD at ``--temperature`` with ``alpha`` 0.1) is distilled
from (a) the ensemble of the three (``--combine``, default the mean of probabilities at
T), (b) the best single teacher (highest test accuracy), and trained (c) from scratch; in
two regimes: every label (``all``), and 1,000 class-balanced labels with the other 59,000
training images as an unlabelled transfer set (``labels1000``, the main job's few-label
regime; the scratch student gets as many optimizer steps on its 1,000 samples).
Reported: each teacher's and the ensemble's test accuracy, each student's test accuracy
and its agreement (same predicted class on the test set) with each teacher and the
ensemble; per arm mean, min and max over seeds, and the per-seed gain of (a) over (b).

    python benchmarks/ensemble_fashion_mnist.py [--seeds 0 1 2] [--epochs 3]
        [--out benchmarks/results/ensemble_fashion_mnist.json] [--work runs/ensemble_fashion_mnist]

Resumable: trained teachers and caches are kept in ``--work``, and each finished student
run in the JSON; a rerun with the same settings adds what is missing. About 20 minutes on a
shared 2-core CPU with the defaults.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))

from _results import open_results, package_source, stamp  # noqa: E402

import kdistill  # noqa: E402
from kdistill.atomic import atomic_write_text  # noqa: E402
from kdistill.data import load_dataset, split_labelled  # noqa: E402
from kdistill.losses import KDLoss  # noqa: E402
from kdistill.models import build_model  # noqa: E402
from kdistill.runtime import machine_description, seed_everything, set_threads  # noqa: E402
from kdistill.teacher import EnsembleTeacher, TeacherCache, combine_logits  # noqa: E402

#: (name, builder, builder keywords, seed, epochs)
TEACHERS = [
    ("cnn", "classic_cnn", {"filters": [64, 128]}, 1, 2),
    ("cnn_small", "classic_cnn", {"filters": [32, 64]}, 2, 3),
    ("mlp", "mlp", {"hidden": [512, 256]}, 3, 5),
]
SIZE = {"num_classes": 10, "in_channels": 1, "input_size": 28}


def predict(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return kdistill.Trainer(model, device="cpu").predict(x, batch_size=1000)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=3, help="student epochs, every arm")
    p.add_argument("--regimes", nargs="+", default=["all", "labels1000"],
                   help="all: every label; labels<N>: N labels + the rest as an unlabelled transfer set")
    p.add_argument("--temperature", type=float, default=4.0)
    p.add_argument("--alpha", type=float, default=0.1)
    p.add_argument("--combine", default="mean_probs", choices=["mean_probs", "mean_logits", "confidence"])
    p.add_argument("--threads", type=int, default=1, help="1: a shared machine wastes less")
    p.add_argument("--work", default="runs/ensemble_fashion_mnist")
    p.add_argument("--out", default=str(HERE / "results" / "ensemble_fashion_mnist.json"))
    p.add_argument("--fresh", action="store_true", help="replace results made with other settings")
    args = p.parse_args(argv)

    settings = {"teachers": TEACHERS, "student": "classic_student", "epochs": args.epochs, "batch_size": 64,
                "optimizer": "adam lr 1e-3", "temperature": args.temperature, "alpha": args.alpha,
                "combine": args.combine, "threads": args.threads, "regimes": args.regimes}
    results = open_results(args.out, settings, fresh=args.fresh)
    results["settings"] = settings
    runs = results.setdefault("runs", {})
    wall = float(results.get("wall_seconds", 0.0))
    set_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    data = load_dataset("fashion_mnist")
    x, y = torch.from_numpy(data.x_train), torch.from_numpy(data.y_train)
    xt, yt = torch.from_numpy(data.x_test), torch.from_numpy(data.y_test)

    def save() -> None:
        stamp(results, wall_seconds=wall, machine=machine_description())
        results["package"] = package_source()
        atomic_write_text(Path(args.out), json.dumps(results, indent=1))

    # 1. the teachers: trained once (kept in --work), each from its own seed
    teachers, caches, preds = {}, {}, {}
    for name, builder, kw, seed, epochs in TEACHERS:
        t0 = time.time()
        seed_everything(seed)
        model = build_model(builder, **SIZE, **kw)
        path = work / f"teacher_{name}.pt"
        if path.is_file():
            model.load_state_dict(torch.load(path))
        else:
            trainer = kdistill.Trainer(model, device="cpu")
            trainer.compile("adam", metrics=["accuracy"])
            trainer.fit(x, y, epochs=epochs, batch_size=64, seed=seed, verbose=0)
            torch.save(model.state_dict(), path)
        model.eval()
        teachers[name] = model
        # 2. a cache of its logits over the training set, per teacher (float32: exact)
        caches[name] = TeacherCache.build(model, x, work / f"cache_{name}", dtype="float32", device="cpu")
        preds[name] = predict(model, xt)
        wall += time.time() - t0
        print(f"teacher {name}: {float((preds[name].argmax(-1) == yt).float().mean()):.4f}", flush=True)
    names = [t[0] for t in TEACHERS]
    teacher_acc = {n: float((preds[n].argmax(-1) == yt).float().mean()) for n in names}
    ens_logits = combine_logits([preds[n] for n in names], args.combine, args.temperature)
    ens_pred = ens_logits.argmax(-1)
    results["teachers"] = {n: {"builder": b, "kwargs": kw, "seed": s, "epochs": e, "test_accuracy": teacher_acc[n],
                               "parameters": sum(q.numel() for q in teachers[n].parameters())}
                           for n, b, kw, s, e in TEACHERS}
    results["ensemble"] = {"combine": args.combine, "temperature": args.temperature,
                           "test_accuracy": float((ens_pred == yt).float().mean()),
                           "pairwise_teacher_agreement": {
                               f"{a}-{b}": float((preds[a].argmax(-1) == preds[b].argmax(-1)).float().mean())
                               for i, a in enumerate(names) for b in names[i + 1:]}}
    best = max(names, key=lambda n: teacher_acc[n])
    results["best_single"] = best
    save()

    # 3. per regime and seed: the same student distilled from the ensemble, from the best teacher, and from
    #    scratch. Regime "all": every label. Regime "labels<N>": N class-balanced labels (picked by the seed) and
    #    the other training images as a transfer set with soft targets only; the scratch student gets as many
    #    optimizer steps, cycling its N samples.
    n = len(y)
    full_steps = -(-n // 64)
    arms = ("ensemble", "best_single", "scratch")
    for regime in args.regimes:
        for seed in args.seeds:
            if regime == "all":
                rows, x_lab, y_lab, x_unl, scratch_steps = np.arange(n), x, y, None, None
            else:
                il, _, ir, _ = split_labelled(np.arange(n), data.y_train, int(regime[len("labels"):]), seed=seed)
                rows, x_lab, y_lab, x_unl, scratch_steps = np.concatenate([il, ir]), x[il], y[il], x[ir], full_steps
            for arm in arms:
                key = f"{regime}/{arm}/seed{seed}"
                if key in runs:
                    continue
                t0 = time.time()
                seed_everything(seed)
                student = build_model("classic_student", **SIZE)
                served = {k: c.reindexed(rows) for k, c in caches.items()}  # fit's order: labelled, then the rest
                if arm == "scratch":
                    trainer = kdistill.Trainer(student, device="cpu")
                    trainer.compile("adam", metrics=["accuracy"])
                    trainer.fit(x_lab, y_lab, epochs=args.epochs, batch_size=64, seed=seed, verbose=0,
                                steps_per_epoch=scratch_steps)
                else:
                    teacher = (EnsembleTeacher([served[k] for k in names], combine=args.combine, names=names)
                               if arm == "ensemble" else served[best])
                    trainer = kdistill.Distiller(student, teacher=teacher, device="cpu")
                    trainer.compile("adam", metrics=["accuracy"], alpha=args.alpha,
                                    distillation_loss_fn=KDLoss(temperature=args.temperature))
                    trainer.fit(x_lab, y_lab, unlabelled=x_unl, epochs=args.epochs, batch_size=64, seed=seed,
                                verbose=0)
                sp = predict(student, xt).argmax(-1)
                runs[key] = {"test_accuracy": float((sp == yt).float().mean()),
                             "agreement": {**{k: float((sp == preds[k].argmax(-1)).float().mean()) for k in names},
                                           "ensemble": float((sp == ens_pred).float().mean())},
                             "seconds": time.time() - t0}
                wall += time.time() - t0
                print(f"{key}: {runs[key]['test_accuracy']:.4f} ({runs[key]['seconds']:.0f} s)", flush=True)
                save()

    # 4. summary per regime and arm, and the gain of the ensemble over the best teacher per seed
    summary: dict = {}
    for regime in args.regimes:
        part = summary[regime] = {}
        for arm in arms:
            done = [runs[f"{regime}/{arm}/seed{s}"] for s in args.seeds if f"{regime}/{arm}/seed{s}" in runs]
            if done:
                accs = [r["test_accuracy"] for r in done]
                part[arm] = {"mean": statistics.mean(accs), "min": min(accs), "max": max(accs),
                             "std": statistics.stdev(accs) if len(accs) > 1 else 0.0, "n": len(accs),
                             "agreement_with_ensemble_mean": statistics.mean(r["agreement"]["ensemble"] for r in done),
                             "agreement_with_best_mean": statistics.mean(r["agreement"][best] for r in done)}
        pairs = [(runs.get(f"{regime}/ensemble/seed{s}"), runs.get(f"{regime}/best_single/seed{s}"))
                 for s in args.seeds]
        gains = [100 * (e["test_accuracy"] - b["test_accuracy"]) for e, b in pairs if e and b]
        part["ensemble_minus_best_single_points"] = {"per_seed": gains,
                                                     "mean": statistics.mean(gains) if gains else None}
    results["summary"] = summary
    save()
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
