"""Every distillation method of the zoo on Fashion-MNIST, CPU-sized, 3 seeds.

One teacher and one student from the zoo: the Keras-example teacher (``classic_teacher``,
1.4M parameters, trained on the full training set) and student (``classic_student``,
21K). The students see ``--train`` class-balanced labelled samples (default 5,000) for
``--epochs`` epochs (default 4), Adam lr 1e-3, batch 64, no augmentation; each method
runs with its own default hyper-parameters (the published CIFAR-100 ones) and the loss
weighting its authors use; 3 seeds (the student's initial weights and data order). Rows:
the student from scratch, every method, and the teacher.

To fit on 2 CPU cores the teacher's outputs are computed once for the students' training
samples (logits and the tapped layer, stored in float16 for the feature map) and looked up
by sample index: what an offline teacher cache does. No augmentation, so a cached output
is exactly what the live teacher would give.

Taps: student ``4`` (its last conv, 32x7x7) against teacher ``4`` (512x7x7) for the
feature methods and SP (FT's paraphraser first pre-trains for one epoch, not CRD's 30); penultimate vectors (``6:input`` for both, the flattened
last conv) for RKD, PKT, CC and CRD.

    python benchmarks/methods_fashion_mnist.py [--teacher-checkpoint PATH] [--seeds 0 1 2]
        [--methods kd dkd ...] [--out benchmarks/results/methods_fashion_mnist.json]

Runs already in the output JSON are skipped, so a killed benchmark continues.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

from kdistill import Distiller, Trainer, build_model, load_checkpoint, load_dataset, save_checkpoint
from kdistill.atomic import atomic_write_text
from kdistill.data import split_labelled
from kdistill.losses import KDLoss
from kdistill.outputs import Batch, Outputs
from kdistill.runtime import machine_description, seed_everything
from kdistill.taps import FeatureTaps

HERE = Path(__file__).parent
S_MAP, T_MAP = "4", "4"            # last conv maps: student (B, 32, 7, 7), teacher (B, 512, 7, 7)
S_VEC, T_VEC = "6:input", "6:input"  # penultimate vectors: the flattened last conv


class CachedOutputs:
    """The teacher's logits and tapped layers for a fixed set of samples, by batch index."""

    def __init__(self, teacher: torch.nn.Module, x: torch.Tensor, layers: list[str], batch_size: int = 256):
        teacher.eval()
        logits, feats = [], {p: [] for p in layers}
        with FeatureTaps(teacher, layers, role="teacher") as taps, torch.inference_mode():
            for i in range(0, len(x), batch_size):
                logits.append(teacher(x[i : i + batch_size]))
                for p, v in taps.pop().items():
                    feats[p].append(v.half())  # (B, ...) float16: half the memory
        self.logits = torch.cat(logits)
        self.features = {p: torch.cat(v) for p, v in feats.items()}

    def parameters(self):
        return iter(())

    def __call__(self, batch: Batch) -> Outputs:
        i = batch.index.cpu()
        return Outputs(self.logits[i].clone(), {p: f[i].float() for p, f in self.features.items()})


def methods(n_data: int) -> dict[str, tuple[dict, Callable[[], object] | None]]:
    """``{name: (compile kwargs, loss factory)}``; ``None`` loss: the student from scratch.

    Weighting follows the method's reference code: KD as Hinton (alpha 0.1 form, as
    RepDistiller's ``-r 0.1 -a 0.9``); the others with cross-entropy weight 1 plus the
    method's weighted term (RepDistiller ``-r 1 -a 0 -b <weight>``, mdistiller's
    CE_WEIGHT 1).
    """
    from kdistill import losses as L

    ce1 = {"label_loss_weight": 1.0}
    table = {
        "scratch": ({}, None),
        "kd": ({"alpha": 0.1}, lambda: KDLoss(temperature=4.0)),
    }
    optional = {
        "dkd": (ce1, lambda: L.DKDLoss()),
        "dist": (ce1, lambda: L.DISTLoss()),
        "kd_logit_std": ({"label_loss_weight": 0.1}, lambda: L.LogitStandardKDLoss()),
        "reverse_kl": ({"alpha": 0.1}, lambda: L.ReverseKLLoss(temperature=4.0)),
        "js": ({"alpha": 0.1}, lambda: L.JSDivergenceLoss(temperature=4.0)),
        "fitnets": (ce1, lambda: L.HintLoss(S_MAP, T_MAP)),
        "at": (ce1, lambda: L.ATLoss(S_MAP, T_MAP)),
        "nst": (ce1, lambda: L.NSTLoss(S_MAP, T_MAP)),
        "vid": (ce1, lambda: L.VIDLoss(S_MAP, T_MAP)),
        "ft": (ce1, lambda: L.FTLoss(S_MAP, T_MAP, pretrain_epochs=1)),
        "sp": (ce1, lambda: L.SPLoss(S_MAP, T_MAP)),
        "rkd": (ce1, lambda: L.RKDLoss(S_VEC, T_VEC)),
        "pkt": (ce1, lambda: L.PKTLoss(S_VEC, T_VEC)),
        "cc": (ce1, lambda: L.CCLoss(S_VEC, T_VEC)),
        "crd": (ce1, lambda: L.CRDLoss(S_VEC, T_VEC, n_data=n_data)),
    }
    for name, spec in optional.items():
        try:
            spec[1]()  # the class exists and builds with its defaults
        except (AttributeError, TypeError) as e:
            print(f"skipping {name}: {e}")
            continue
        table[name] = spec
    return table


def train_teacher(x, y, epochs: int, seed: int) -> torch.nn.Module:
    seed_everything(seed)
    teacher = build_model("classic_teacher")
    Trainer(teacher, device="cpu").compile("adam", metrics=["accuracy"]).fit(x, y, epochs=epochs, batch_size=64, seed=seed, verbose=2)
    return teacher


def accuracy(model, x, y) -> float:
    pred = Trainer(model, device="cpu").predict(x).argmax(-1)
    return float((pred == y).float().mean())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher-checkpoint", default=str(HERE / ".cache" / "classic_teacher.pt"),
                   help="trained classic_teacher (trained and saved here if missing)")
    p.add_argument("--teacher-epochs", type=int, default=1)
    p.add_argument("--train", type=int, default=5000, help="labelled training samples of the students")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--methods", nargs="+", default=None, help="a subset of the methods")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=str(HERE / "results" / "methods_fashion_mnist.json"))
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    # 1. data and the teacher
    data = load_dataset("fashion_mnist")
    x_all, y_all = torch.from_numpy(data.x_train), torch.from_numpy(data.y_train)
    x_test, y_test = torch.from_numpy(data.x_test), torch.from_numpy(data.y_test)
    xl, yl, _, _ = split_labelled(data.x_train, data.y_train, args.train, seed=0)
    x_lab, y_lab = torch.from_numpy(xl), torch.from_numpy(yl)
    teacher = build_model("classic_teacher")
    ckpt = Path(args.teacher_checkpoint)
    if ckpt.is_file():
        load_checkpoint(ckpt, teacher)
    else:
        teacher = train_teacher(x_all, y_all, args.teacher_epochs, seed=0)
        save_checkpoint(ckpt, teacher)
    teacher_acc = accuracy(teacher, x_test, y_test)
    print(f"teacher test accuracy {100 * teacher_acc:.2f}%")
    start = time.perf_counter()
    cached = CachedOutputs(teacher, x_lab, [T_MAP, T_VEC])
    cache_seconds = time.perf_counter() - start

    # 2. every method x seed (runs already in the JSON are kept)
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.is_file() else {}
    runs = results.setdefault("runs", {})
    table = methods(len(x_lab))
    names = args.methods or list(table)
    for seed in args.seeds:
        for name in names:
            key = f"{name}/seed{seed}"
            if key in runs:
                continue
            seed_everything(seed)
            student = build_model("classic_student")
            kwargs, make_loss = table[name]
            t0 = time.perf_counter()
            if make_loss is None:
                trainer = Trainer(student, device="cpu").compile("adam", metrics=["accuracy"])
                trainer.fit(x_lab, y_lab, epochs=args.epochs, batch_size=64, seed=seed, verbose=0)
            else:
                trainer = Distiller(student=student, teacher=cached, device="cpu")
                loss = make_loss()
                trainer.compile(torch.optim.Adam(student.parameters(), lr=1e-3), metrics=["accuracy"],
                                distillation_loss_fn=loss, **kwargs)
                trainer.fit(x_lab, y_lab, epochs=args.epochs, batch_size=64, seed=seed, verbose=0)
            seconds = time.perf_counter() - t0
            acc = accuracy(student, x_test, y_test)
            runs[key] = {"method": name, "seed": seed, "test_accuracy": acc, "seconds": seconds}
            print(f"{key}: {100 * acc:.2f}% ({seconds:.0f} s)", flush=True)
            atomic_write_text(out, json.dumps(results, indent=1))

    # 3. summary: mean and spread over seeds
    summary = {}
    for name in names:
        accs = [r["test_accuracy"] for r in runs.values() if r["method"] == name]
        if accs:
            summary[name] = {"mean": statistics.mean(accs), "std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                             "min": min(accs), "max": max(accs), "seeds": len(accs),
                             "seconds_mean": statistics.mean(r["seconds"] for r in runs.values() if r["method"] == name)}
    results.update({
        "setting": {"teacher": "classic_teacher", "student": "classic_student", "teacher_test_accuracy": teacher_acc,
                    "labelled_train": len(x_lab), "epochs": args.epochs, "batch_size": 64, "optimizer": "Adam lr 1e-3",
                    "taps": {"map": [S_MAP, T_MAP], "vector": [S_VEC, T_VEC]}, "teacher_cache_seconds": cache_seconds},
        "summary": summary,
        "machine": machine_description(),
    })
    atomic_write_text(out, json.dumps(results, indent=1))
    kd = summary.get("kd", {}).get("mean")
    print("\n| method | test accuracy (mean ± std, 3 seeds) | vs KD |\n|---|---|---|")
    for name, s in sorted(summary.items(), key=lambda kv: -kv[1]["mean"]):
        vs = "" if kd is None or name == "kd" else f"{100 * (s['mean'] - kd):+.2f}"
        print(f"| {name} | {100 * s['mean']:.2f} ± {100 * s['std']:.2f} | {vs} |")
    print(f"| teacher | {100 * teacher_acc:.2f} | |")


if __name__ == "__main__":
    main()
