"""Programs the sharded-teacher tests start with torchrun (or as one plain process):

    python -m torch.distributed.run --standalone --nproc-per-node 2 sharded_workers.py CASES OUT_DIR

CASES is a comma-separated list, run one after the other in the same processes:

* ``logits``: a tiny Llama teacher sharded with ``ShardedTeacher`` against an unsharded
  copy of the same weights, each process on its own batch: logits and a tapped block's
  output, the parameter bytes held at rest, gradients;
* ``fit_sharded`` / ``fit_live``: one distillation fit (token KL, the data of
  ``token_workers.py``) with the teacher sharded / replicated (``LiveTeacher``); rank 0
  saves the student's weights to ``OUT_DIR/<case>.pt``; the teacher's gradients and
  optimizer state are recorded;
* ``no_group`` (one plain process, no torchrun): the error of building a ShardedTeacher.

Every process writes ``OUT_DIR/result-<rank>.json``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from kdistill import Distiller, distributed
from kdistill.losses import TokenKLLoss
from kdistill.outputs import Batch
from kdistill.teacher import LiveTeacher, ShardedTeacher
from token_workers import ALPHA, LR, TEMPERATURE, VOCAB, TokenRows, model, rows

TEACHER_SEED = 7


def teacher_state(sharded: ShardedTeacher, optimizer: torch.optim.Optimizer | None = None) -> dict:
    params = list(sharded.parameters())
    ids = {id(p) for p in params}
    held = [p for g in optimizer.param_groups for p in g["params"]] if optimizer is not None else []
    return {
        "grads": sum(p.grad is not None for p in params),
        "trainable": sum(p.requires_grad for p in params),
        "training": sharded.module.training,
        "in_optimizer": sum(id(p) in ids for p in held),
        "optimizer_state": sum(id(p) in ids for p in (optimizer.state if optimizer is not None else {})),
    }


def logits_case(out: Path) -> dict:
    device = distributed.device()  # the CPU here; cuda:LOCAL_RANK on a GPU machine (NCCL)
    reference = model(seed=TEACHER_SEED).eval().to(device)
    sharded = ShardedTeacher(model(seed=TEACHER_SEED))
    full = sum(p.numel() * p.element_size() for p in reference.parameters())
    at_rest = sharded.local_parameter_bytes()
    # each process its own batch (as in data-parallel training)
    g = torch.Generator().manual_seed(100 + distributed.rank())
    ids = torch.randint(1, VOCAB, (3, 8), generator=g).to(device)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    layer = "model.layers.1"
    sharded.set_taps([layer])
    got = sharded(Batch(inputs))
    seen = {}
    hook = reference.get_submodule(layer).register_forward_hook(
        lambda m, a, o: seen.setdefault("f", (o[0] if isinstance(o, tuple) else o).detach()))
    with torch.inference_mode():
        want = reference(**inputs).logits
    hook.remove()
    sharded.set_taps([])
    second = sharded(Batch(inputs)).logits  # a second call (gathers again) gives the same
    kept = ShardedTeacher(model(seed=TEACHER_SEED), reshard_after_forward=False)
    kept_logits = kept(Batch(inputs)).logits
    # tied input and output embeddings (one weight): they stay in the root's unit
    tied_net = model(seed=TEACHER_SEED)
    tied_net.config.tie_word_embeddings = True
    tied_net.lm_head.weight = tied_net.model.embed_tokens.weight
    tied_net.to(device)
    with torch.inference_mode():
        tied_want = tied_net(**inputs).logits.clone()
    tied = ShardedTeacher(tied_net)
    return {
        "tied_diff": float((tied(Batch(inputs)).logits - tied_want).abs().max()),
        "tied_blocks": tied.blocks,
        "kept_diff": float((kept_logits - want).abs().max()),
        "kept_bytes_after_forward": kept.local_parameter_bytes(),
        "logits_diff": float((got.logits - want).abs().max()),
        "feature_diff": float((got.features[layer] - seen["f"]).abs().max()),
        "second_diff": float((second - want).abs().max()),
        "requires_grad": got.logits.requires_grad,
        "inference": got.logits.is_inference(),
        "full_bytes": full,
        "local_bytes_at_rest": at_rest,
        "local_bytes_after_forward": sharded.local_parameter_bytes(),
        "blocks": sharded.blocks,
        "dtensors": sum(hasattr(p, "to_local") for p in sharded.parameters()),
        "parameters": len(list(sharded.parameters())),
        "state": teacher_state(sharded),
        "repr": repr(sharded),
    }


def fit_case(case: str, out: Path) -> dict:
    student = model()
    teacher_net = model(seed=TEACHER_SEED)
    teacher = ShardedTeacher(teacher_net) if case == "fit_sharded" else LiveTeacher(teacher_net)
    distiller = Distiller(student=student, teacher=teacher, device=distributed.device())
    optimizer = torch.optim.Adam(student.parameters(), lr=LR / 50)
    distiller.compile(optimizer, alpha=ALPHA, distillation_loss_fn=TokenKLLoss(temperature=TEMPERATURE))
    history = distiller.fit(TokenRows(rows()), epochs=2, batch_size=4, shuffle=True, seed=0, verbose=0)
    if distributed.is_main():
        torch.save({k: v.detach().cpu().clone() for k, v in student.named_parameters()}, out / f"{case}.pt")
    record = {"history": history.history, "steps": distiller.global_step}
    if isinstance(teacher, ShardedTeacher):
        record["state"] = teacher_state(teacher, optimizer)
    return record


def no_group_case(out: Path) -> dict:
    try:
        ShardedTeacher(model(seed=TEACHER_SEED))
    except Exception as e:  # noqa: BLE001 - the test reads the message
        return {"raised": f"{type(e).__name__}: {e}"}
    return {"raised": None}


def main() -> None:
    cases, out = sys.argv[1].split(","), Path(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    record: dict = {}
    for case in cases:
        try:
            if case == "logits":
                record[case] = logits_case(out)
            elif case == "no_group":
                record[case] = no_group_case(out)
            else:
                record[case] = fit_case(case, out)
        except Exception as e:  # noqa: BLE001 - reported, the test says what was expected
            record[case] = {"error": f"{type(e).__name__}: {e}"}
        record.update(rank=distributed.rank(), world=distributed.world_size())
        (out / f"result-{distributed.rank()}.json").write_text(json.dumps(record))
        if "error" in record[case]:
            break


if __name__ == "__main__":
    main()
