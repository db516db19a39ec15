"""Programs the distributed tests start with torchrun (or plainly, as one process).

    python -m torch.distributed.run --standalone --nproc-per-node 2 workers.py CASE OUT_DIR

Each process writes ``OUT_DIR/result-<rank>.json``; rank 0 also saves the student's
weights under OUT_DIR. Cases: ``distil`` (live teacher, KD + a FitNets hint with an adapter),
``cache`` (a teacher cache rank 0 builds and every process maps), ``mismatch`` (rank 1's
teacher scores other classes: every process must fail, quickly, naming rank 1),
``disagree_temperature`` / ``disagree_epochs`` (rank 1 distils at another temperature, or
for another number of epochs: every process must fail at the start of fit, naming the
key), ``agreement`` (``check_agreement`` called directly with values that differ on rank
1), ``resume`` (an uninterrupted fit, then one stopped mid-epoch on every rank after a
TrainingCheckpoint save and resumed from it: both histories are recorded), ``whole`` /
``accumulate`` (``distil`` with gradient clipping, on global batches of 32, or on two
accumulated micro-batches of 16 each).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from torch import nn

from kdistill import Distiller, distributed
from kdistill.callbacks import Callback, TrainingCheckpoint
from kdistill.checkpoint import read_training_state
from kdistill.losses import HintLoss, KDLoss, WeightedSum
from kdistill.teacher import TeacherCache

N, D, C, BATCH = 256, 8, 10, 32


def data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(N, D, generator=g), torch.randint(0, C, (N,), generator=g)


def models(classes: int = C):
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(D, 32), nn.ReLU(), nn.Linear(32, classes))
    student = nn.Sequential(nn.Linear(D, 16), nn.ReLU(), nn.Linear(16, C))
    return teacher, student


class Recording(Distiller):
    """Records what each step saw: the samples, the wrapper the student ran in, and how
    many gradient all-reduces DDP made."""

    reductions = 0

    def _wrap_for_processes(self):
        super()._wrap_for_processes()
        if self._ddp is not None:
            from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

            def counting(state, bucket):
                self.reductions += 1
                return allreduce_hook(state, bucket)

            self._ddp.register_comm_hook(None, counting)

    def train_step(self, batch):
        self.seen.append(batch.index.tolist())
        self.wrappers.add(type(self.training_model).__name__)
        return super().train_step(batch)


def distil(out: Path, teacher, student, x, y, loss, epochs: int = 2, batch: int = BATCH, **step) -> dict:
    d = Recording(student=student, teacher=teacher, device="cpu")
    d.seen, d.wrappers = [], set()
    d.compile(torch.optim.Adam(student.parameters(), lr=0.01), metrics=["accuracy"], alpha=0.3,
              distillation_loss_fn=loss, **step)  # the loss owns its temperature
    history = d.fit(x, y, epochs=epochs, batch_size=batch, seed=0, verbose=0, validation_data=(x[:50], y[:50]))
    weights = {k: v.clone() for k, v in student.state_dict().items()}
    weights.update({f"loss.{k}": v.clone() for k, v in d.distillation_loss.state_dict().items()})
    if distributed.is_main():
        torch.save(weights, out / "student.pt")
    live = getattr(d.teacher, "module", None)
    return {"seen": d.seen, "wrappers": sorted(d.wrappers), "history": history.history, "reductions": d.reductions,
            "teacher_wrapped": live is not None and not isinstance(live, nn.Sequential),
            "teacher_trainable": live is not None and any(p.requires_grad for p in live.parameters())}


def failure(fn) -> dict:
    """What ``fn()`` raised, as the test reads it (nothing when it returned)."""
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - reported, the test says what was expected
        return {"error": str(e), "type": type(e).__name__}
    return {}


class Stopped(Exception):
    pass


class StopAt(Callback):
    """Raises after global step ``n``, on every process (a stand-in for a killed run)."""

    def __init__(self, n: int):
        self.n = n

    def on_train_batch_end(self, step, logs=None):
        if self.trainer.global_step == self.n:
            raise Stopped


def resume(out: Path, x, y) -> dict:
    """Histories of an uninterrupted fit and of one stopped mid-epoch (global step 11, epoch
    1 step 3 of 8, right after a save) and resumed from its training state."""
    def fit(**kw):
        teacher, student = models()
        d = Distiller(student=student, teacher=teacher, device="cpu")
        d.compile(torch.optim.Adam(student.parameters(), lr=0.01), metrics=["accuracy"], alpha=0.3,
                  distillation_loss_fn=KDLoss(temperature=4))
        return d.fit(x, y, epochs=3, batch_size=BATCH, seed=0, verbose=0, validation_data=(x[:50], y[:50]), **kw)

    reference = fit().history
    path = out / "last.pt"
    try:
        fit(callbacks=[TrainingCheckpoint(path, every_steps=3), StopAt(11)])
    except Stopped:
        pass
    distributed.barrier()  # rank 0 wrote the state before it stopped
    state = read_training_state(path)
    resumed = fit(callbacks=[TrainingCheckpoint(path, every_steps=3)], resume_from=state).history
    return {"reference": reference, "resumed": resumed, "saved_at": [state["epoch"], state["step_in_epoch"]]}


def main() -> None:
    case, out = sys.argv[1], Path(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    x, y = data()
    result: dict = {}
    if case == "distil":
        teacher, student = models()
        loss = WeightedSum({"kd": (KDLoss(temperature=4), 1.0),
                            "hint": (HintLoss(student_layer="0", teacher_layer="0"), 0.5)})
        result = distil(out, teacher, student, x, y, loss)
    elif case == "cache":
        teacher, student = models()
        path = out / "teacher_cache"
        # as in a single process: every process calls build; one builds, the others wait
        # on its lock and open the result
        TeacherCache.build(teacher, x, path, dtype="float32", device="cpu")
        cached = TeacherCache.open(path, teacher=teacher, x=x)
        result.update(distil(out, cached, student, x, y, KDLoss(temperature=4)))
    elif case == "mismatch":
        # (the process group does not exist yet: the Distiller joins it; torchrun set RANK)
        teacher, student = models(classes=7 if os.environ.get("RANK") == "1" else C)
        try:
            distil(out, teacher, student, x, y, KDLoss(temperature=4))
        except distributed.DistributedError as e:
            result = {"error": str(e), "type": type(e).__name__}
        except Exception as e:  # noqa: BLE001 - reported, the test says what was expected
            result = {"error": str(e), "type": type(e).__name__}
    elif case in ("disagree_temperature", "disagree_epochs"):
        teacher, student = models()
        other = os.environ.get("RANK") == "1"
        temperature = 2 if other and case == "disagree_temperature" else 4
        epochs = 3 if other and case == "disagree_epochs" else 2
        result = failure(lambda: distil(out, teacher, student, x, y, KDLoss(temperature=temperature), epochs=epochs))
    elif case == "agreement":
        distributed.init()
        r = distributed.rank()
        values = {"stages": {"distil": {"epochs": 2 + (r == 1), "alpha": 0.1}}, "data": {"train": "abc"}}
        result = failure(lambda: distributed.check_agreement("the experiment", values))
        same = failure(lambda: distributed.check_agreement("the experiment", {"stages": {"distil": {"epochs": 2}}}))
        result["same"] = same
    elif case == "resume":
        result = resume(out, x, y)
    elif case in ("whole", "accumulate"):
        teacher, student = models()
        loss = WeightedSum({"kd": (KDLoss(temperature=4), 1.0),
                            "hint": (HintLoss(student_layer="0", teacher_layer="0"), 0.5)})
        step = dict(batch=BATCH, max_grad_norm=0.5) if case == "whole" else \
            dict(batch=BATCH // 2, accumulate_steps=2, max_grad_norm=0.5)
        result = distil(out, teacher, student, x, y, loss, **step)
    # one file per process (their stdout lines would interleave in torchrun's output)
    record = {"rank": distributed.rank(), "world": distributed.world_size(), **result}
    (out / f"result-{distributed.rank()}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main()
