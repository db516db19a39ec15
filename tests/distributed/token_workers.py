"""Programs the token-normalisation tests start with torchrun: a tiny causal LM trained
for one SGD step on sequences whose trained-on tokens are spread unevenly between the
processes.

    python -m torch.distributed.run --standalone --nproc-per-node 2 token_workers.py CASES OUT_DIR

CASES is a comma-separated list, run one after the other in the same processes:
``step`` (one global batch of all 8 sequences), ``accumulate`` (two accumulated
micro-batches of 4), ``distil`` (``step`` distilled from a tiny teacher with the token KL
loss, over the trained-on tokens), ``empty`` / ``distil_empty`` (``step`` / ``distil`` on
data where rank 1's sequences hold no trained-on token). Rank 0 saves the model's weights of each case to
``OUT_DIR/<case>.pt``; every process writes ``OUT_DIR/result-<rank>.json`` (its history,
its trained-on tokens, or the error it raised).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from torch.utils.data import Dataset

from kdistill import Distiller, Trainer, distributed
from kdistill.losses import TokenKLLoss
from kdistill.outputs import IGNORE_INDEX, next_token_targets

VOCAB, T, LR = 64, 8, 0.5
ALPHA, TEMPERATURE = 0.4, 2.0
#: real tokens per sequence: in a 2-process run rank 0 takes the even rows (7 + 7 + 6 + 5 =
#: 25 trained-on tokens) and rank 1 the odd ones (0 + 0 + 2 + 1 = 3); accumulating two
#: micro-batches of 4 rows, rank 1's first one holds no trained-on token
LENGTHS = [8, 1, 8, 1, 7, 3, 6, 2]
#: rank 1's rows without any trained-on token (one real token each: nothing to predict)
EMPTY_ON_RANK_1 = [8, 1, 8, 1, 7, 1, 6, 1]


def model(seed: int = 0):
    import transformers

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(config)


def rows(lengths: list[int] = LENGTHS) -> dict[str, torch.Tensor]:
    """Right-padded sequences with Hugging Face ``labels`` (-100 on the padding)."""
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, VOCAB, (len(lengths), T), generator=g)
    mask = (torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]).long()
    ids = ids.masked_fill(mask == 0, 0)
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, IGNORE_INDEX)}


class TokenRows(Dataset):
    def __init__(self, data: dict[str, torch.Tensor]):
        self.data, self.targets = data, next_token_targets(data["labels"])

    def __len__(self) -> int:
        return self.data["input_ids"].shape[0]

    def __getitem__(self, i: int) -> dict:
        return {"inputs": {"input_ids": self.data["input_ids"][i], "attention_mask": self.data["attention_mask"][i]},
                "targets": self.targets[i]}


class Counting:
    """Records the trained-on tokens of every batch a step trains on."""

    def __init__(self):
        self.tokens: list[int] = []

    def train_step(self, batch):
        self.tokens.append(batch.items())
        return super().train_step(batch)


class CountingTrainer(Counting, Trainer):
    def __init__(self, *a, **kw):
        Trainer.__init__(self, *a, **kw)
        Counting.__init__(self)


class CountingDistiller(Counting, Distiller):
    def __init__(self, *a, **kw):
        Distiller.__init__(self, *a, **kw)
        Counting.__init__(self)


def run(case: str, out: Path) -> dict:
    student = model()
    if case in ("distil", "distil_empty"):
        trainer = CountingDistiller(student=student, teacher=model(seed=7), device="cpu")
        trainer.compile(torch.optim.SGD(student.parameters(), lr=LR), alpha=ALPHA,
                        distillation_loss_fn=TokenKLLoss(temperature=TEMPERATURE))
    else:
        trainer = CountingTrainer(student, device="cpu")
        trainer.compile(torch.optim.SGD(student.parameters(), lr=LR),
                        accumulate_steps=2 if case == "accumulate" else 1)
    data = TokenRows(rows(EMPTY_ON_RANK_1 if case.endswith("empty") else LENGTHS))
    history = trainer.fit(data, epochs=1, batch_size=4 if case == "accumulate" else 8, shuffle=False, verbose=0)
    if distributed.is_main():
        torch.save({k: v.detach().clone() for k, v in student.named_parameters()}, out / f"{case}.pt")
    return {"history": history.history, "tokens": trainer.tokens, "steps": trainer.global_step}


def main() -> None:
    cases, out = sys.argv[1].split(","), Path(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    record: dict = {}
    for case in cases:
        try:
            record[case] = run(case, out)
        except Exception as e:  # noqa: BLE001 - reported, the test says what was expected
            record[case] = {"error": f"{type(e).__name__}: {e}"}
        # after every case: what a later case does (abort in a failed collective) loses nothing
        record.update(rank=distributed.rank(), world=distributed.world_size())
        (out / f"result-{distributed.rank()}.json").write_text(json.dumps(record))
        if "error" in record[case]:
            break  # the process group may be unusable after a failed collective


if __name__ == "__main__":
    main()
