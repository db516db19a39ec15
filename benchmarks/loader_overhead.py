"""In-memory batching by index slicing vs per-sample ``DataLoader`` + collate.

Times one epoch of plain student training (batch 64) of each of two small students (the
classic Keras-example CNN and an MLP) over the same
in-memory tensors fed two ways: kdistill's ``ArrayLoader`` (one ``index_select`` per
batch) and a ``torch.utils.data.DataLoader`` over a map-style dataset (``__getitem__``
per sample, default collate), the way most PyTorch code feeds in-memory data.
Also times the data pipeline alone (iterating batches, no model). Medians over repeats,
interleaved.

    python benchmarks/loader_overhead.py [--samples 20000] [--repeats 3] [--models classic_student mlp]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from kdistill import Trainer, build_model
from kdistill.data import ArrayLoader
from kdistill.data.loader import DataLoaderAdapter
from kdistill.runtime import machine_description, seed_everything


class PerSample(Dataset):
    """A plain map-style dataset over tensors: what a hand-written loader looks like."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.x[i], self.y[i]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", type=int, default=20000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--models", nargs="+", default=["classic_student", "mlp"])
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "loader_overhead.json"))
    args = p.parse_args()

    seed_everything(0)
    x = torch.rand(args.samples, 1, 28, 28)
    y = torch.randint(0, 10, (args.samples,))
    g = torch.Generator().manual_seed(0)
    loaders = {
        "array_loader": ArrayLoader(x, y, batch_size=args.batch_size, shuffle=True, generator=g),
        "dataloader_per_sample": DataLoaderAdapter(
            DataLoader(PerSample(x, y), batch_size=args.batch_size, shuffle=True, generator=g)
        ),
    }
    result = {
        "benchmark": "loader_overhead",
        "samples": args.samples,
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "models": {},
        "machine": machine_description(),
    }
    for model_name in args.models:
        model = build_model(model_name)
        trainer = Trainer(model, device="cpu").compile("adam")
        model.train()
        data_only: dict[str, list[float]] = {k: [] for k in loaders}
        epoch: dict[str, list[float]] = {k: [] for k in loaders}
        for _ in range(args.repeats):
            for name, loader in loaders.items():
                start = time.perf_counter()
                for _batch in loader:
                    pass
                data_only[name].append(time.perf_counter() - start)
                start = time.perf_counter()
                for batch in loader:
                    trainer.train_step(batch)
                epoch[name].append(time.perf_counter() - start)
        med_data = {k: statistics.median(v) for k, v in data_only.items()}
        med_epoch = {k: statistics.median(v) for k, v in epoch.items()}
        result["models"][model_name] = {
            "data_only_seconds": med_data,
            "epoch_seconds": med_epoch,
            "data_only_speedup": med_data["dataloader_per_sample"] / med_data["array_loader"],
            "epoch_speedup": med_epoch["dataloader_per_sample"] / med_epoch["array_loader"],
            "training_samples_per_second": {k: args.samples / v for k, v in med_epoch.items()},
        }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(json.dumps({m: {k: r[k] for k in ("data_only_speedup", "epoch_speedup")} for m, r in result["models"].items()}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
