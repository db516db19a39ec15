"""Born-again networks on Fashion-MNIST: test accuracy per generation, per seed.

Generation 0 (the teacher) is a mid-sized CNN (``classic_student`` at width 4: 64 and 128
filters, 137K parameters) trained on the labelled subset; generation ``k`` is a new
network of the same architecture distilled from generation ``k - 1`` with
:func:`kdistill.born_again` (Furlanello et al. 2018's setting: the distillation loss
only, ``alpha = 0``, at ``T = 1``), the same epochs and optimizer for every generation.
Also recorded: the accuracy of the generations' ensemble (mean of their probabilities, as
the paper's BAN ensembles), and the time per seed.

Sized for a 2-core CPU shared with other work (about 12 minutes): a labelled subset and
few epochs, so the numbers are those of short training, not of converged networks.

    python benchmarks/born_again_fashion_mnist.py [--generations 3] [--seeds 0 1 2]
        [--train 10000] [--epochs 3] [--alpha 0] [--temperature 1] [--ensemble]
        [--out benchmarks/results/born_again_fashion_mnist.json]

``--ensemble``: the last generation learns from the ensemble of every earlier one, the
teacher included (``born_again(ensemble=True)``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _results import open_results, package_source, stamp  # noqa: E402

from kdistill import Trainer, born_again, build_model, load_dataset  # noqa: E402
from kdistill.atomic import atomic_write_text  # noqa: E402
from kdistill.data import split_labelled  # noqa: E402
from kdistill.runtime import machine_description, seed_everything  # noqa: E402

HERE = Path(__file__).parent


def logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return Trainer(model, device="cpu").predict(x, batch_size=1000)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--generations", type=int, default=3)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--train", type=int, default=10000, help="labelled training samples")
    p.add_argument("--epochs", type=int, default=3, help="epochs of every generation (and of the teacher)")
    p.add_argument("--width", type=float, default=4.0, help="classic_student width of every generation")
    p.add_argument("--alpha", type=float, default=0.0)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--ensemble", action="store_true", help="the last generation learns from the ensemble of all "
                   "earlier ones (the teacher included)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--fresh", action="store_true", help="replace a results file made with other settings")
    p.add_argument("--out", default=str(HERE / "results" / "born_again_fashion_mnist.json"))
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = {"model": f"classic_student(width={args.width})", "train": args.train, "epochs": args.epochs,
                "generations": args.generations, "alpha": args.alpha, "temperature": args.temperature,
                "batch_size": 64, "optimizer": "adam lr 1e-3", "test": "the 10,000 test images"}
    if args.ensemble:  # (absent otherwise: files made before the option keep their settings)
        settings["ensemble"] = True
    results = open_results(args.out, settings, fresh=args.fresh)
    results["settings"] = settings
    runs = results.setdefault("runs", {})

    # 1. data: a labelled subset (the same for every seed), the whole test set
    data = load_dataset("fashion_mnist")
    xl, yl, _, _ = split_labelled(data.x_train, data.y_train, args.train, seed=0)
    x, y = torch.from_numpy(xl), torch.from_numpy(yl)
    x_test, y_test = torch.from_numpy(data.x_test), torch.from_numpy(data.y_test)
    fit = dict(epochs=args.epochs, batch_size=64, verbose=0)
    wall = results.get("wall_seconds", 0.0)

    # 2. per seed: the teacher (generation 0), then the generations
    for seed in args.seeds:
        key = f"seed{seed}"
        if key in runs:
            continue
        started = time.perf_counter()
        seed_everything(seed)
        teacher = build_model("classic_student", width=args.width)
        Trainer(teacher, device="cpu").compile("adam", learning_rate=1e-3).fit(x, y, seed=seed, **fit)
        built = iter(range(1, args.generations + 1))

        def model_fn():
            seed_everything(1000 * seed + next(built))  # each generation from its own initial weights
            return build_model("classic_student", width=args.width)

        gens = born_again(model_fn, teacher, x, y, generations=args.generations, optimizer="adam",
                          learning_rate=1e-3, alpha=args.alpha, temperature=args.temperature, ensemble=args.ensemble,
                          seed=seed, **fit)
        nets = [teacher] + [g.student for g in gens]
        outs = [logits(n, x_test) for n in nets]
        acc = [float((o.argmax(-1) == y_test).float().mean()) for o in outs]
        probs = [o.softmax(-1) for o in outs]
        ens = [float((torch.stack(probs[: k + 1]).mean(0).argmax(-1) == y_test).float().mean())
               for k in range(len(probs))]
        seconds = time.perf_counter() - started
        wall += seconds
        runs[key] = {"seed": seed, "accuracy": acc, "ensemble_accuracy": ens, "seconds": seconds}
        print(f"{key}: " + ", ".join(f"gen{k} {100 * a:.2f}%" for k, a in enumerate(acc))
              + f"; ensemble of all {100 * ens[-1]:.2f}% ({seconds:.0f} s)", flush=True)
        results["summary"] = summary(runs, args.generations)
        stamp(results, wall_seconds=wall, machine=machine_description())
        results["package"] = package_source()
        atomic_write_text(Path(args.out), json.dumps(results, indent=1))


def summary(runs: dict, generations: int) -> dict:
    """Mean, standard deviation, min and max over seeds, per generation (0 = the teacher)."""
    out = {}
    for what in ("accuracy", "ensemble_accuracy"):
        rows = []
        for k in range(generations + 1):
            v = [r[what][k] for r in runs.values()]
            rows.append({"generation": k, "mean": statistics.mean(v), "std": statistics.stdev(v) if len(v) > 1 else 0.0,
                         "min": min(v), "max": max(v), "seeds": len(v)})
        out[what] = rows
    return out


if __name__ == "__main__":
    main()
