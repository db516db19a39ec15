"""Deep mutual learning on Fashion-MNIST: each peer vs the same network trained alone,
per seed.

Per seed: the network alone (``classic_student`` at width 4: 137K parameters), and two
peers of that architecture trained together with :class:`kdistill.MutualLearning` (the
paper's loss: ``alpha = 0.5``, ``T = 1``); peer 1 starts from the alone network's initial
weights, peer 2 from its own. Same data, epochs, batch and optimizer (Adam 1e-3, one per
peer). Also recorded: the accuracy of the peers' ensemble (mean of probabilities).

Sized for a 2-core CPU shared with other work (about 10 minutes): a labelled subset and
few epochs, so the numbers are those of short training, not of converged networks.

    python benchmarks/mutual_fashion_mnist.py [--peers 2] [--seeds 0 1 2] [--train 10000]
        [--epochs 3] [--out benchmarks/results/mutual_fashion_mnist.json]
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

from kdistill import MutualLearning, Trainer, build_model, load_dataset  # noqa: E402
from kdistill.atomic import atomic_write_text  # noqa: E402
from kdistill.data import split_labelled  # noqa: E402
from kdistill.runtime import machine_description, seed_everything  # noqa: E402

HERE = Path(__file__).parent


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--peers", type=int, default=2)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--train", type=int, default=10000, help="labelled training samples")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--width", type=float, default=4.0, help="classic_student width of every network")
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--fresh", action="store_true", help="replace a results file made with other settings")
    p.add_argument("--out", default=str(HERE / "results" / "mutual_fashion_mnist.json"))
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = {"model": f"classic_student(width={args.width})", "peers": args.peers, "train": args.train,
                "epochs": args.epochs, "alpha": args.alpha, "temperature": args.temperature, "batch_size": 64,
                "optimizer": "adam lr 1e-3 (one per peer)", "test": "the 10,000 test images"}
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

    for seed in args.seeds:
        key = f"seed{seed}"
        if key in runs:
            continue
        started = time.perf_counter()
        # 2. the network alone
        seed_everything(seed)
        alone = build_model("classic_student", width=args.width)
        t0 = time.perf_counter()
        trainer = Trainer(alone, device="cpu").compile("adam", learning_rate=1e-3, metrics=["accuracy"])
        trainer.fit(x, y, seed=seed, **fit)
        alone_seconds = time.perf_counter() - t0
        alone_acc = trainer.evaluate(x_test, y_test, batch_size=1000)["accuracy"]
        # 3. the peers together (peer 1 from the alone network's initial weights)
        peers = []
        for k in range(args.peers):
            seed_everything(seed if k == 0 else 1000 * seed + k)
            peers.append(build_model("classic_student", width=args.width))
        t0 = time.perf_counter()
        dml = MutualLearning(peers, device="cpu").compile("adam", learning_rate=1e-3, metrics=["accuracy"],
                                                          alpha=args.alpha, temperature=args.temperature)
        dml.fit(x, y, seed=seed, **fit)
        dml_seconds = time.perf_counter() - t0
        z = dml.predict(x_test, batch_size=1000)  # (K, N, C)
        peer_acc = [float((z[k].argmax(-1) == y_test).float().mean()) for k in range(args.peers)]
        ens_acc = float((z.softmax(-1).mean(0).argmax(-1) == y_test).float().mean())
        seconds = time.perf_counter() - started
        wall += seconds
        runs[key] = {"seed": seed, "alone": alone_acc, "peers": peer_acc, "peer_ensemble": ens_acc,
                     "alone_seconds": alone_seconds, "mutual_seconds": dml_seconds}
        print(f"{key}: alone {100 * alone_acc:.2f}%, peers " + ", ".join(f"{100 * a:.2f}%" for a in peer_acc)
              + f", ensemble {100 * ens_acc:.2f}% ({alone_seconds:.0f} s alone, {dml_seconds:.0f} s together)",
              flush=True)
        results["summary"] = summary(runs, args.peers)
        stamp(results, wall_seconds=wall, machine=machine_description())
        results["package"] = package_source()
        atomic_write_text(Path(args.out), json.dumps(results, indent=1))


def summary(runs: dict, peers: int) -> dict:
    """Mean, standard deviation, min and max over seeds of the alone network, each peer,
    each peer's gain over the alone network of its seed, and the peers' ensemble."""
    def st(v):
        return {"mean": statistics.mean(v), "std": statistics.stdev(v) if len(v) > 1 else 0.0,
                "min": min(v), "max": max(v), "seeds": len(v)}

    rs = list(runs.values())
    out = {"alone": st([r["alone"] for r in rs]), "peer_ensemble": st([r["peer_ensemble"] for r in rs])}
    for k in range(peers):
        out[f"peer{k + 1}"] = st([r["peers"][k] for r in rs])
        out[f"peer{k + 1}_gain_points"] = st([100 * (r["peers"][k] - r["alone"]) for r in rs])
    return out


if __name__ == "__main__":
    main()
