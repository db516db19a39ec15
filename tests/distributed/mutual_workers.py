"""The program the mutual-learning DDP test starts with torchrun (or alone, for the
one-process reference): two peers trained with :class:`kdistill.MutualLearning` on fixed
data, global batch 16, 2 epochs of 4 steps; ``resume`` checkpoints every step, stops after
global step 5 and resumes.

    python -m torch.distributed.run --standalone --nproc-per-node 2 mutual_workers.py CASES OUT_DIR

Every process saves the peers' weights to ``OUT_DIR/<case>-<rank>.pt`` and writes
``OUT_DIR/result-<rank>.json`` (the world size, each case's final loss or its error).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from torch import nn

from kdistill import MutualLearning, distributed
from kdistill.callbacks import TrainingCheckpoint

from crashing import Crash, CrashAt

FIT = dict(epochs=2, batch_size=16, verbose=0, seed=0)


def data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return torch.randn(64, 6, generator=g), torch.randint(0, 4, (64,), generator=g)


def trainer() -> MutualLearning:
    peers = []
    for k in range(2):
        torch.manual_seed(10 + k)
        peers.append(nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 4)))
    return MutualLearning(peers, device="cpu").compile("sgd", learning_rate=0.1, alpha=0.5, temperature=2.0)


def run(case: str, out: Path) -> dict:
    x, y = data()
    t = trainer()
    if case == "plain":
        history = t.fit(x, y, **FIT)
    elif case == "resume":
        state = out / "resume-state.pt"
        try:
            t.fit(x, y, callbacks=[TrainingCheckpoint(state, every_steps=1), CrashAt(5)], **FIT)
        except Crash:
            pass
        distributed.barrier()
        t = trainer()
        history = t.fit(x, y, callbacks=[TrainingCheckpoint(state, every_steps=1)], resume_from=state, **FIT)
    else:
        raise ValueError(case)
    torch.save(t.model.state_dict(), out / f"{case}-{distributed.rank()}.pt")
    return {"loss": history.history["loss"][-1]}


def main() -> None:
    cases, out = sys.argv[1].split(","), Path(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    distributed.init()
    result: dict = {"world": distributed.world_size()}
    for case in cases:
        try:
            result[case] = run(case, out)
        except Exception as e:  # reported per case, read by the test
            result[case] = {"error": f"{type(e).__name__}: {e}"}
    (out / f"result-{distributed.rank()}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
