"""Programs the on-policy tests start with torchrun: on-policy distillation (GKD) and
sequence-level KD of tiny random Llama models (built from configs, nothing downloaded)
on prompt/completion sequences, 2 epochs of 3 optimizer steps of a global batch of 4.

    python -m torch.distributed.run --standalone --nproc-per-node 2 on_policy_workers.py CASES OUT_DIR

CASES is a comma-separated list, run one after the other in the same processes:
``lmbda`` (student samples with lmbda 0.5, a live teacher), ``resume`` (``lmbda``
checkpointed every step, stopped after global step 4 and resumed), ``sharded`` (seq_kd
with a :class:`~kdistill.teacher.ShardedTeacher`). The models end their samples at EOS
often, so the processes' completions end at different lengths. Every process saves its student's
weights to ``OUT_DIR/<case>-<rank>.pt`` and writes ``OUT_DIR/result-<rank>.json``: per
micro-batch the source, the seed it sampled with and the completion lengths, per training
step the trained-on tokens and the share of the step they count for, or the error raised.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import transformers
from torch.utils.data import Dataset

from kdistill import Distiller, OnPolicy, distributed
from kdistill.callbacks import TrainingCheckpoint
from kdistill.losses import GeneralizedJSDLoss
from kdistill.on_policy import prompt_lengths
from kdistill.outputs import IGNORE_INDEX, next_token_targets
from kdistill.teacher import ShardedTeacher

from crashing import Crash, CrashAt

VOCAB, T, N_NEW, EOS = 64, 12, 6, 2
SEED, CRASH_AFTER = 11, 4
FIT = dict(epochs=2, batch_size=4, verbose=0, seed=0)
#: added to the models' EOS logit: EOS is sampled with probability about 1/3 at each
#: position, so completions end at lengths that vary between sequences and processes
EOS_BIAS = 3.5


def config() -> transformers.LlamaConfig:
    return transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)


class EosLlama(transformers.LlamaForCausalLM):
    """A Llama whose EOS logit is raised by :data:`EOS_BIAS` (its samples end at EOS
    often, at lengths that vary); counts its forward calls."""

    calls = 0

    def forward(self, *args, **kwargs):
        self.calls += 1
        out = super().forward(*args, **kwargs)
        bias = torch.zeros(VOCAB, dtype=out.logits.dtype, device=out.logits.device)
        bias[EOS] = EOS_BIAS
        out.logits = out.logits + bias
        return out


def llama(seed: int) -> EosLlama:
    torch.manual_seed(seed)
    return EosLlama(config())


class PromptCompletion(Dataset):
    """Right-padded prompt/completion rows (as in ``tests/test_on_policy.py``): a masked
    prompt of 2 to 5 tokens, then a completion ending in EOS, then padding."""

    def __init__(self, n: int = 12, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(3, VOCAB, (n, T), generator=g)
        self.prompts = torch.randint(2, 6, (n,), generator=g)
        lengths = self.prompts + torch.randint(2, 5, (n,), generator=g)
        self.mask = (torch.arange(T)[None] < lengths[:, None]).long()
        self.ids[torch.arange(n), lengths - 1] = EOS
        self.ids = self.ids.masked_fill(self.mask == 0, 0)
        labels = self.ids.masked_fill(self.mask == 0, IGNORE_INDEX)
        labels[torch.arange(T)[None] < self.prompts[:, None]] = IGNORE_INDEX
        self.targets = next_token_targets(labels)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"inputs": {"input_ids": self.ids[i], "attention_mask": self.mask[i]}, "targets": self.targets[i]}


class RecordingOnPolicy(OnPolicy):
    """Records, per micro-batch, its source, the seed this process sampled with and the
    generated completions' lengths."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.record: list[dict] = []

    def transform(self, batch, student, teacher=None):
        out = super().transform(batch, student, teacher)
        lengths = (out.inputs["attention_mask"].sum(1) - prompt_lengths(out)).tolist()
        self.record.append({"source": self.last_source, "seed": self.last_seed,
                            "completions": lengths if self.last_source != "dataset" else None})
        return out


class RecordingDistiller(Distiller):
    """Records, per training step, the trained-on tokens and the share of the optimizer
    step they count for (scaled across the processes)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.steps: list[dict] = []

    def train_step(self, batch):
        self.steps.append({"tokens": batch.items(), "share": self._micro.samples})
        return super().train_step(batch)


def distiller(teacher, on_policy: OnPolicy) -> RecordingDistiller:
    d = RecordingDistiller(student=llama(1), teacher=teacher, device="cpu")
    d.compile("adamw", learning_rate=1e-2, alpha=0.0, distillation_loss_fn=GeneralizedJSDLoss(beta=0.5),
              on_policy=on_policy)
    return d


def run(case: str, out: Path) -> dict:
    data = PromptCompletion()
    if case == "lmbda":
        d = distiller(llama(0), RecordingOnPolicy(0.5, N_NEW, seed=SEED, pad_token_id=EOS, eos_token_id=EOS))
        d.fit(data, **FIT)
    elif case == "resume":
        path = out / "resume-last.pt"
        crashed = distiller(llama(0), RecordingOnPolicy(0.5, N_NEW, seed=SEED, pad_token_id=EOS, eos_token_id=EOS))
        try:
            crashed.fit(data, callbacks=[TrainingCheckpoint(path, every_steps=1), CrashAt(CRASH_AFTER)], **FIT)
            raise AssertionError("the run did not stop")
        except Crash:
            pass
        distributed.barrier()  # rank 0 has written the training state
        d = distiller(llama(0), RecordingOnPolicy(0.5, N_NEW, seed=SEED, pad_token_id=EOS, eos_token_id=EOS))
        d.fit(data, resume_from=path, **FIT)
    elif case == "sharded":
        teacher = ShardedTeacher(llama(0))
        d = distiller(teacher, RecordingOnPolicy(0.0, N_NEW, seq_kd=True, seed=SEED, pad_token_id=EOS,
                                                 eos_token_id=EOS))
        d.fit(data, **FIT)
    else:
        raise ValueError(f"unknown case {case!r}")
    torch.save({k: v.detach().clone() for k, v in d.student.named_parameters()},
               out / f"{case}-{distributed.rank()}.pt")
    result = {"micro_batches": d.on_policy.record, "steps": d.steps, "counts": d.on_policy.counts,
              "global_step": d.global_step}
    if case == "sharded":
        result["teacher_calls"] = teacher.module.calls
    return result


def main() -> None:
    cases, out = sys.argv[1].split(","), Path(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    record: dict = {}
    for case in cases:
        try:
            record[case] = run(case, out)
        except Exception as e:  # noqa: BLE001 - reported, the test says what was expected
            record[case] = {"error": f"{type(e).__name__}: {e}"}
        record.update(rank=distributed.rank(), world=distributed.world_size())
        (out / f"result-{distributed.rank()}.json").write_text(json.dumps(record))
        if "error" in record[case]:
            break  # the process group may be unusable after a failed collective


if __name__ == "__main__":
    main()
