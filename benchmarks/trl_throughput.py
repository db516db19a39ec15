"""Off-policy distillation throughput: kdistill's Distiller against TRL's GKDTrainer.

Both arms train the same tiny Llama-style student from the same initial weights against the
same frozen teacher, on the same prompt/completion sequences in the same order, with the
same loss (GKD's generalized Jensen-Shannon divergence, ``beta = 0.5``, temperature 1,
the prompt masked, a mean over the completion tokens), AdamW at a constant learning rate,
the same gradient clipping, fp32 on the CPU, no evaluation, no checkpoints, no progress
output:

* **kdistill**: ``Distiller(student, teacher).compile(..., alpha=0,
  distillation_loss_fn=GeneralizedJSDLoss(beta=0.5, temperature=1.0,
  temperature_squared=False))`` and ``fit`` on a :class:`~kdistill.data.text.TokenDataset`;
* **TRL**: ``trl.experimental.gkd.GKDTrainer`` with ``lmbda=0`` (off-policy: it never
  generates), ``seq_kd=False``, ``beta=0.5``, its default collator
  (``DataCollatorForChatML``) on pre-tokenized records (``input_ids`` and a
  ``completion_mask``, so nothing is re-tokenized), sequential sampling. TRL's ``SFTConfig``
  defaults that would make the arms differ are set explicitly: ``bf16=False`` (it defaults
  to True), ``gradient_checkpointing=False`` (defaults to True), a constant schedule
  (linear decay by default), logging off.

Data: a byte-level BPE (``--vocab``) trained offline on the Python standard library's
sources, the sources packed into blocks of ``--prompt + --completion`` tokens, each block's
first ``--prompt`` tokens the prompt (masked from the loss) and the rest the completion.
The teacher (``--teacher-layers`` x ``--teacher-width``) is first trained for
``--teacher-steps`` steps on next-token prediction so its distributions are not uniform.

1. Each arm runs in its own subprocess, in the order kdistill, TRL, kdistill, TRL, ...
   (``--repeats`` each). A subprocess loads the saved models and data, takes its memory
   baseline, trains ``--steps`` optimizer steps and reports:

   * trained tokens per second: the completion tokens that enter the loss in the steps
     after the first ``--warmup``, over the wall time from the end of step ``--warmup`` to
     the end of the last step (data loading and collation included); also from the median
     step, and per second of the process's CPU time;
   * the memory training adds: ``ru_maxrss`` after training minus ``ru_maxrss`` at the
     baseline, and the same from the resident size at the baseline with the high-water mark
     reset there (see :class:`Memory`);
   * the loss of every step (the two arms' losses are compared step by step).

2. In one process, whole steps of kdistill, TRL and a hand-written PyTorch loop interleaved
   (``--step-rounds``), then each part of a step (``--phase-rounds``): see
   :func:`run_phases`. On a machine shared with other jobs this is the comparison noise
   disturbs least: the arms alternate every few hundred milliseconds instead of every run.
3. Each arm's loss forward and backward alone in a fresh process: the memory it adds.

    OMP_NUM_THREADS=2 python benchmarks/trl_throughput.py [--repeats 3] [--steps 30] \
        [--out benchmarks/results/trl_throughput_cpu.json]

TRL (``pip install trl``) and ``datasets`` are needed; the script stops with a message
without them.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _results import stamp, package_source  # noqa: E402

import kdistill  # noqa: E402
from kdistill.atomic import atomic_write_text  # noqa: E402
from kdistill.runtime import machine_description  # noqa: E402

ARMS = ("kdistill", "trl")
PREPARE, PHASES, LOSS_MEMORY = "prepare", "phases", "loss_memory_"
RESULT_PREFIX = "RESULT "


def maxrss_mib() -> float:
    """This process's resident-set high-water mark, ``ru_maxrss``, MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _status_mib(field: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return None


class Memory:
    """The resident memory training adds: ``ru_maxrss`` after training minus ``ru_maxrss``
    at the baseline and, where Linux allows it, the same measured from the current resident
    set at the baseline with the high-water mark reset there (``/proc/self/clear_refs``):
    ``ru_maxrss`` keeps the highest value the process ever had (imports, model loading), so
    its difference reads 0 when training stays below an earlier peak."""

    def __init__(self) -> None:
        self.maxrss = maxrss_mib()
        self.rss = _status_mib("VmRSS")
        try:
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
            self.reset = True
        except OSError:
            self.reset = False

    def result(self) -> dict:
        after, hwm = maxrss_mib(), _status_mib("VmHWM")
        return {"maxrss_baseline_mib": self.maxrss, "maxrss_after_mib": after,
                "maxrss_delta_mib": after - self.maxrss,
                "rss_baseline_mib": self.rss, "hwm_after_mib": hwm,
                "peak_training_rss_mib": hwm - self.rss if self.reset and hwm is not None else None}


# ------------------------------------------------------------------------ shared set-up


def prepare(work: Path, args: argparse.Namespace) -> dict:
    """Tokenizer, data and the two models (the teacher briefly trained), saved under ``work``;
    returns what was built."""
    from kdistill import Trainer
    from kdistill.data.text import pack_texts, python_source_corpus, train_tokenizer
    from kdistill.models.causal_lm import causal_lm
    from kdistill.runtime import seed_everything

    seed_everything(0)
    # 1. text and tokenizer (offline byte-level BPE)
    texts = [text for _, text in python_source_corpus(max_bytes=args.corpus_bytes)]
    tokenizer = train_tokenizer(texts, vocab_size=args.vocab)
    tokenizer.save_pretrained(work / "tokenizer")
    block = args.prompt + args.completion
    packed = pack_texts(texts, tokenizer, block_size=block)
    n_train = args.steps * args.batch_size
    n_teacher = args.teacher_steps * args.teacher_batch_size
    if len(packed) < n_train + n_teacher:
        raise SystemExit(f"the corpus makes {len(packed)} blocks of {block} tokens; {n_train} (distillation) + "
                         f"{n_teacher} (teacher) are needed: raise --corpus-bytes")
    order = torch.randperm(len(packed), generator=torch.Generator().manual_seed(0))
    # 2. the distillation sequences: prompt masked, completion trained on
    tokens = packed.select(order[:n_train]).tokens.reshape(n_train, block)
    trained = torch.zeros(n_train, block, dtype=torch.bool)
    trained[:, args.prompt:] = True
    torch.save({"tokens": tokens, "trained": trained, "pad_id": packed.pad_id}, work / "data.pt")

    # 3. models from configurations (Llama-style, untied heads, sdpa attention)
    def build(width: int, layers: int):
        return causal_lm("llama", vocab_size=len(tokenizer), hidden_size=width, num_hidden_layers=layers,
                         intermediate_size=int(width * 8 / 3 + 63) // 64 * 64, num_attention_heads=4,
                         num_key_value_heads=4, max_position_embeddings=block, tie_word_embeddings=False,
                         pad_token_id=packed.pad_id, eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=tokenizer.bos_token_id, attn_implementation="sdpa")

    teacher = build(args.teacher_width, args.teacher_layers)
    student = build(args.student_width, args.student_layers)
    # 4. the teacher learns next-token prediction on other blocks (so its distributions say something)
    t0 = time.perf_counter()
    teacher_data = packed.select(order[n_train:n_train + n_teacher])
    Trainer(teacher, device="cpu").compile("adamw", learning_rate=3e-3).fit(
        teacher_data, epochs=1, batch_size=args.teacher_batch_size, shuffle=False, verbose=0)
    teacher_seconds = time.perf_counter() - t0
    teacher.save_pretrained(work / "teacher")
    student.save_pretrained(work / "student")
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    return {"vocab_size": len(tokenizer), "blocks_available": len(packed), "sequences": n_train,
            "teacher_parameters": count(teacher), "student_parameters": count(student),
            "teacher_config": {k: getattr(teacher.config, k) for k in
                               ("hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads")},
            "student_config": {k: getattr(student.config, k) for k in
                               ("hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads")},
            "teacher_pretraining": {"steps": args.teacher_steps, "batch_size": args.teacher_batch_size,
                                    "learning_rate": 3e-3, "seconds": teacher_seconds}}


def load_models(work: Path):
    from transformers import AutoModelForCausalLM

    kw = dict(local_files_only=True, attn_implementation="sdpa", dtype=torch.float32)
    return (AutoModelForCausalLM.from_pretrained(work / "teacher", **kw),
            AutoModelForCausalLM.from_pretrained(work / "student", **kw))


# ------------------------------------------------------------------------------ the arms


def token_dataset(work: Path):
    """The distillation sequences as kdistill reads them: a ``TokenDataset``, prompts masked."""
    from kdistill.data.text import TokenDataset

    data = torch.load(work / "data.pt")
    n, block = data["tokens"].shape
    return TokenDataset(data["tokens"].reshape(-1), torch.arange(0, n * block + 1, block),
                        data["trained"].reshape(-1), pad_id=data["pad_id"])


def trl_records(work: Path) -> dict[str, list]:
    """The same sequences as TRL's GKD collator takes them pre-tokenized: ``input_ids`` and a
    ``completion_mask`` (the prompt/completion boundary; nothing is re-tokenized). A
    ``prompt`` field must exist but is not read when those two are given."""
    data = torch.load(work / "data.pt")
    ids, trained = data["tokens"].long().tolist(), data["trained"].long().tolist()
    return {"prompt": [""] * len(ids), "input_ids": ids, "attention_mask": [[1] * len(r) for r in ids],
            "completion_mask": trained}


def distiller_for(student, teacher, args: argparse.Namespace, cls=None):
    """kdistill's arm: only the distillation term trains (``alpha=0``), as in GKD."""
    from kdistill import Distiller
    from kdistill.losses import GeneralizedJSDLoss

    distiller = (cls or Distiller)(student, teacher, device="cpu")
    distiller.compile(lambda p: torch.optim.AdamW(p, lr=args.lr, weight_decay=0.0), alpha=0.0,
                      distillation_loss_fn=GeneralizedJSDLoss(beta=0.5, temperature=1.0, temperature_squared=False),
                      max_grad_norm=args.max_grad_norm)
    return distiller


def run_kdistill(work: Path, args: argparse.Namespace) -> dict:
    from kdistill import Distiller
    from kdistill.callbacks import Callback

    teacher, student = load_models(work)
    dataset = token_dataset(work)
    baseline = Memory()
    losses: list[torch.Tensor] = []
    trained: list[int] = []
    ends: list[tuple[float, float]] = []

    class Recorded(Distiller):  # the step's loss and trained tokens, kept as they come (read after training)
        def train_step(self, batch):
            logs = super().train_step(batch)
            losses.append(logs["distillation_loss"])
            trained.append(batch.items())
            return logs

    class StepEnd(Callback):
        def on_train_batch_end(self, step, logs=None):
            ends.append((time.perf_counter(), time.process_time()))

    distiller = distiller_for(student, teacher, args, Recorded)
    start = time.perf_counter()
    distiller.fit(dataset, epochs=1, batch_size=args.batch_size, steps_per_epoch=args.steps, shuffle=False,
                  verbose=0, callbacks=[StepEnd()])
    return summarise(start, ends, trained, [float(v) for v in losses], baseline, args.warmup)


def trl_config(work: Path, args: argparse.Namespace):
    """TRL's arm: off-policy GKD (``lmbda=0``), and every ``SFTConfig`` default that would
    make the arms differ set explicitly (bf16, gradient checkpointing, the schedule, logging)."""
    from trl.experimental.gkd import GKDConfig

    return GKDConfig(
        output_dir=str(work / "trl_out"), max_steps=args.steps, per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=1, learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0,
        optim="adamw_torch", weight_decay=0.0, max_grad_norm=args.max_grad_norm,
        lmbda=0.0, beta=0.5, seq_kd=False, max_length=args.prompt + args.completion,
        bf16=False, fp16=False, gradient_checkpointing=False, use_cpu=True,
        train_sampling_strategy="sequential", dataloader_num_workers=0, dataloader_pin_memory=False,
        logging_strategy="no", save_strategy="no", eval_strategy="no", report_to="none", disable_tqdm=True,
        seed=0,
    )


def import_trl():
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    try:
        import datasets
        from trl.experimental.gkd import GKDTrainer
    except ImportError as e:
        raise SystemExit(f"the TRL arm needs trl and datasets (pip install trl): {e}") from e
    return datasets, GKDTrainer


def run_trl(work: Path, args: argparse.Namespace) -> dict:
    from transformers import TrainerCallback

    from kdistill.data.text import load_tokenizer

    datasets, GKDTrainer = import_trl()
    teacher, student = load_models(work)
    tokenizer = load_tokenizer(work / "tokenizer")
    dataset = datasets.Dataset.from_dict(trl_records(work))
    baseline = Memory()
    losses: list[torch.Tensor] = []
    trained_counts: list[torch.Tensor] = []
    ends: list[tuple[float, float]] = []

    class Recorded(GKDTrainer):  # the step's loss and trained tokens, kept as they come (read after training)
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            losses.append((out[0] if return_outputs else out).detach())
            trained_counts.append((inputs["labels"][:, 1:] != -100).sum())
            return out

    class StepEnd(TrainerCallback):
        def on_step_end(self, args_, state, control, **kwargs):
            ends.append((time.perf_counter(), time.process_time()))

    trainer = Recorded(model=student, teacher_model=teacher, args=trl_config(work, args), train_dataset=dataset,
                       processing_class=tokenizer, callbacks=[StepEnd()])
    start = time.perf_counter()
    trainer.train()
    return summarise(start, ends, [int(c) for c in trained_counts], [float(v) for v in losses], baseline,
                     args.warmup)


def run_phases(work: Path, args: argparse.Namespace) -> dict:
    """Where a step's time goes: each part of a step as kdistill runs it and as TRL's GKD runs
    it, on one fixed batch, in one process, the cases in rotation (each round starts with
    the next case, so machine noise hits all alike); medians and minima over the rounds.

    Parts: collation; the teacher's forward (kdistill: ``LiveTeacher``, inference mode and a
    copy of the logits; TRL: ``torch.no_grad()`` and the call ``compute_loss`` makes); the
    student's forward and backward (kdistill's checked forward with ``use_cache=False``;
    TRL's call) with a fixed upstream gradient; the loss forward and backward from fixed
    logits; kdistill's hard-label term, computed and back-propagated with weight 0 when
    ``alpha=0``; gradient clipping and the AdamW step (the same code in both). Whole steps:
    ``Distiller.train_step``, TRL's (``GKDTrainer.training_step``, clipping, the optimizer
    step, as its training loop runs them, without the data loader and callbacks) and a
    hand-written PyTorch step doing kdistill's work without a framework (the floor for any
    trainer).
    """
    import copy

    import datasets
    from trl.experimental.utils import DataCollatorForChatML

    from kdistill.data.text import load_tokenizer
    from kdistill.losses import generalized_jsd_loss
    from kdistill.outputs import Outputs

    _, GKDTrainer = import_trl()
    teacher, student = load_models(work)
    dataset, records = token_dataset(work), trl_records(work)
    rows = torch.arange(args.batch_size)
    examples = [{k: v[i] for k, v in records.items()} for i in rows.tolist()]
    tokenizer = load_tokenizer(work / "tokenizer")
    collator = DataCollatorForChatML(tokenizer=tokenizer, max_length=args.prompt + args.completion)  # GKD's default
    batch, inputs = dataset.collate(rows), collator(examples)
    # the two arms see the same tokens and train on the same positions
    assert torch.equal(batch.inputs["input_ids"], inputs["input_ids"])
    assert torch.equal(batch.targets[:, :-1] >= 0, inputs["labels"][:, 1:] != -100)

    distiller = distiller_for(copy.deepcopy(student), teacher, args)
    distiller.train_step(batch)  # its set-up (first batch), then ordinary steps
    # TRL's step as its Trainer runs one: training_step (forward, loss, backward), clipping, AdamW, zero_grad
    trl_trainer = GKDTrainer(model=copy.deepcopy(student), teacher_model=teacher, args=trl_config(work, args),
                             train_dataset=datasets.Dataset.from_dict(records), processing_class=tokenizer)
    trl_trainer.create_optimizer()
    model = distiller.model
    plain = copy.deepcopy(student).train()
    plain_opt = torch.optim.AdamW(plain.parameters(), lr=args.lr, weight_decay=0.0)
    ids, attn = inputs["input_ids"], inputs["attention_mask"]
    with torch.no_grad():
        z_s = model(**batch.inputs, use_cache=False).logits
        z_t = teacher(**batch.inputs, use_cache=False).logits
    upstream = torch.randn_like(z_s) * 1e-3
    labels = inputs["labels"][:, 1:]
    items = (labels != -100).sum()
    loss_k = distiller.distillation_loss
    opt_model = copy.deepcopy(student)
    for p in opt_model.parameters():
        p.grad = torch.randn_like(p) * 1e-2
    opt = torch.optim.AdamW(opt_model.parameters(), lr=args.lr, weight_decay=0.0)

    def student_k():
        distiller.forward(model, batch.inputs).backward(upstream)
        model.zero_grad(set_to_none=True)

    def student_t():
        model(input_ids=ids, attention_mask=attn).logits.backward(upstream)
        model.zero_grad(set_to_none=True)

    def teacher_t():
        teacher.eval()
        with torch.no_grad():
            return teacher(input_ids=ids, attention_mask=attn)

    def loss_kdistill():
        s = z_s.clone().requires_grad_()
        loss_k(Outputs(s), Outputs(z_t), batch).backward()

    def loss_trl():
        s = z_s.clone().requires_grad_()
        GKDTrainer.generalized_jsd_loss(s[:, :-1], z_t[:, :-1], labels=labels, beta=0.5,
                                        num_items_in_batch=items).backward()

    def hard_label_term():
        s = z_s.clone().requires_grad_()
        (0.0 * distiller.supervised_loss(s, batch)[0]).backward()

    def optimizer_step():
        torch.nn.utils.clip_grad_norm_(opt_model.parameters(), args.max_grad_norm)
        opt.step()

    def step_trl():
        trl_model = trl_trainer.model
        b = collator(examples)
        trl_trainer.training_step(trl_model, b, (b["labels"][:, 1:] != -100).sum())
        torch.nn.utils.clip_grad_norm_(trl_model.parameters(), args.max_grad_norm)
        trl_trainer.optimizer.step()
        trl_model.zero_grad()

    def step_plain():
        b = dataset.collate(rows)
        with torch.no_grad():
            t = teacher(**b.inputs, use_cache=False).logits
        loss = generalized_jsd_loss(plain(**b.inputs, use_cache=False).logits, t, 0.5, 1.0,
                                    temperature_squared=False, mask=b.targets >= 0)
        plain_opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(plain.parameters(), args.max_grad_norm)
        plain_opt.step()

    parts = {
        "collate/kdistill": lambda: dataset.collate(rows), "collate/trl": lambda: collator(examples),
        "teacher_forward/kdistill": lambda: distiller.teacher(batch), "teacher_forward/trl": teacher_t,
        "student_forward_backward/kdistill": student_k, "student_forward_backward/trl": student_t,
        "loss_forward_backward/kdistill": loss_kdistill, "loss_forward_backward/trl": loss_trl,
        "hard_label_term_at_alpha_0/kdistill": hard_label_term,
        "clip_and_adamw/both": optimizer_step,
    }
    steps = {
        "kdistill": lambda: distiller.train_step(dataset.collate(rows)),
        "trl": step_trl,
        "plain_pytorch": step_plain,
    }
    return {"steps_ms": rotate(steps, args.step_rounds), "parts_ms": rotate(parts, args.phase_rounds)}


def run_loss_memory(work: Path, args: argparse.Namespace, arm: str) -> dict:
    """The memory one loss forward and backward adds, alone in a fresh process, on float32
    logits of the benchmark's shape (``batch x (prompt + completion) x vocab``, random) with
    its prompt mask; the rest of a step (models, optimizer) is the same in both arms."""
    from kdistill.losses import GeneralizedJSDLoss
    from kdistill.outputs import IGNORE_INDEX, Batch, Outputs, next_token_targets

    g = torch.Generator().manual_seed(0)
    shape = (args.batch_size, args.prompt + args.completion)
    labels = torch.randint(0, args.vocab, shape, generator=g)
    labels[:, :args.prompt] = IGNORE_INDEX
    z_s, z_t = torch.randn(*shape, args.vocab, generator=g), torch.randn(*shape, args.vocab, generator=g)
    if arm == "trl":
        _, GKDTrainer = import_trl()
    student = z_s.clone().requires_grad_()
    baseline = Memory()
    if arm == "kdistill":
        batch = Batch({"input_ids": labels.clamp(min=0)}, next_token_targets(labels), torch.arange(shape[0]))
        loss = GeneralizedJSDLoss(beta=0.5, temperature=1.0, temperature_squared=False)(
            Outputs(student), Outputs(z_t), batch)
    else:
        shifted = labels[:, 1:]
        loss = GKDTrainer.generalized_jsd_loss(student[:, :-1], z_t[:, :-1], labels=shifted, beta=0.5,
                                               num_items_in_batch=(shifted != IGNORE_INDEX).sum())
    loss.backward()
    return {"loss": float(loss), **baseline.result()}


def rotate(cases: dict, rounds: int) -> dict:
    """Time each case ``rounds`` times after one warm-up call, in rotation (round ``i``
    starts with case ``i``): median, quartile and minimum, milliseconds."""
    names = list(cases)
    for fn in cases.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in names}
    for i in range(rounds):
        for name in names[i % len(names):] + names[:i % len(names)]:
            t0 = time.perf_counter()
            cases[name]()
            times[name].append(1e3 * (time.perf_counter() - t0))
    return {name: {"median": statistics.median(v), "p25": statistics.quantiles(v, n=4)[0] if len(v) > 1 else v[0],
                   "min": min(v), "n": len(v)} for name, v in times.items()}


def summarise(start: float, ends: list[tuple[float, float]], trained: list[int], losses: list[float],
              baseline: Memory, warmup: int) -> dict:
    """Rates over the steps after the first ``warmup`` (wall time, and this process's CPU
    time, which other processes on the machine disturb less), memory over the baseline,
    the losses."""
    memory = baseline.result()
    w = warmup
    wall = [e[0] for e in ends]
    cpu = [e[1] for e in ends]
    timed_tokens = sum(trained[w:])
    seconds = wall[-1] - wall[w - 1]
    per_step = [b - a for a, b in zip(wall[w - 1:-1], wall[w:])]
    return {
        "steps": len(ends), "trained_tokens_per_step": sorted(set(trained)),
        "timed_steps": len(ends) - w, "timed_tokens": timed_tokens, "timed_seconds": seconds,
        "tokens_per_second": timed_tokens / seconds,
        "median_step_seconds": statistics.median(per_step),
        "tokens_per_second_from_median_step": statistics.median(trained[w:]) / statistics.median(per_step),
        "timed_cpu_seconds": cpu[-1] - cpu[w - 1],
        "tokens_per_cpu_second": timed_tokens / (cpu[-1] - cpu[w - 1]),
        "first_steps_seconds": [wall[0] - start] + [b - a for a, b in zip(wall[:w - 1], wall[1:w])],
        "step_seconds": per_step,
        **memory,
        "final_loss": losses[-1], "mean_loss_last_10": statistics.mean(losses[-10:]), "losses": losses,
    }


# --------------------------------------------------------------------------------- main


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=3, help="runs of each arm, alternating")
    p.add_argument("--steps", type=int, default=30, help="optimizer steps per run")
    p.add_argument("--warmup", type=int, default=5, help="first steps left out of the rate")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--prompt", type=int, default=32, help="prompt tokens per sequence (masked)")
    p.add_argument("--completion", type=int, default=96, help="completion tokens per sequence (trained on)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="clipping in both arms (TRL's default)")
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--corpus-bytes", type=int, default=600_000)
    p.add_argument("--teacher-width", type=int, default=256)
    p.add_argument("--teacher-layers", type=int, default=4)
    p.add_argument("--student-width", type=int, default=128)
    p.add_argument("--student-layers", type=int, default=2)
    p.add_argument("--teacher-steps", type=int, default=8, help="next-token training steps of the teacher")
    p.add_argument("--teacher-batch-size", type=int, default=16)
    p.add_argument("--step-rounds", type=int, default=30,
                   help="rounds of the in-process, interleaved whole-step timing (0: skip it and the parts)")
    p.add_argument("--phase-rounds", type=int, default=10, help="rounds of the per-part timing")
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    p.add_argument("--arm", choices=(PREPARE, PHASES, *ARMS, *(LOSS_MEMORY + a for a in ARMS)),
                   help=argparse.SUPPRESS)  # a child process: one arm
    p.add_argument("--work", help=argparse.SUPPRESS)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "trl_throughput_cpu.json"))
    return p.parse_args()


def settings_of(args: argparse.Namespace) -> dict:
    keys = ("repeats", "steps", "warmup", "batch_size", "prompt", "completion", "lr", "max_grad_norm", "vocab",
            "corpus_bytes", "teacher_width", "teacher_layers", "student_width", "student_layers",
            "teacher_steps", "teacher_batch_size", "step_rounds", "phase_rounds", "threads")
    s = {k: getattr(args, k) for k in keys}
    s.update(loss="generalized JSD, beta 0.5, temperature 1, no T^2, mean over completion tokens",
             optimizer="torch.optim.AdamW, constant lr, weight_decay 0, betas (0.9, 0.999), eps 1e-8",
             precision="fp32", device="cpu", gradient_accumulation=1, trl_lmbda=0.0, trl_seq_kd=False,
             order="sequential (the same pre-shuffled sequences for both arms)")
    return s


def main() -> None:
    args = parse()
    torch.set_num_threads(args.threads)
    if args.arm is not None:  # a child: the set-up or one arm, one JSON line
        warnings.filterwarnings("ignore")
        run = {PREPARE: prepare, PHASES: run_phases, "kdistill": run_kdistill, "trl": run_trl,
               **{LOSS_MEMORY + a: functools.partial(run_loss_memory, arm=a) for a in ARMS}}[args.arm]
        print(RESULT_PREFIX + json.dumps(run(Path(args.work), args)), flush=True)
        return

    # versions without importing (this process stays small: see child())
    from importlib.metadata import PackageNotFoundError, version
    try:
        versions = {name: version(name) for name in ("torch", "transformers", "trl", "accelerate", "datasets")}
    except PackageNotFoundError as e:
        raise SystemExit(f"{e.name} is not installed (pip install trl): this benchmark compares against TRL") from None
    versions["kdistill"] = getattr(kdistill, "__version__", None)
    t_all = time.perf_counter()
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           "TOKENIZERS_PARALLELISM": "false", "TRL_EXPERIMENTAL_SILENCE": "1"}

    def child(arm: str, work: Path) -> dict:
        """Run ``arm`` in a fresh process (this one stays small: a forked child's ``ru_maxrss``
        starts at its parent's resident size) and return its JSON."""
        cmd = [sys.executable, __file__, *sys.argv[1:], "--arm", arm, "--work", str(work)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_PREFIX)]
        if proc.returncode != 0 or not lines:
            raise SystemExit(f"the {arm} process failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-5000:]}")
        return json.loads(lines[-1][len(RESULT_PREFIX):])

    with tempfile.TemporaryDirectory(prefix="trl_throughput_") as tmp:
        work = Path(tmp)
        # 1. data and models, once, shared by every run
        setup = child(PREPARE, work)
        print(f"set-up: {json.dumps(setup)}", flush=True)
        # 2. the arms alternate: kdistill, TRL, kdistill, TRL, ...
        runs: dict[str, list[dict]] = {a: [] for a in ARMS}
        for r in range(args.repeats):
            for arm in ARMS:
                result = child(arm, work)
                result["repeat"] = r
                runs[arm].append(result)
                print(f"repeat {r} {arm:8s}: {result['tokens_per_second']:7.1f} tokens/s "
                      f"({result['tokens_per_cpu_second']:7.1f} per CPU-second), peak +"
                      f"{result['peak_training_rss_mib']:.1f} MiB, final loss {result['final_loss']:.6f}",
                      flush=True)
        # 3. where a step's time goes, part by part, both arms in one process
        phases = child(PHASES, work) if args.step_rounds > 0 else None
        # 4. the loss's own share of the memory, each arm's loss alone in a fresh process
        loss_memory = {a: child(LOSS_MEMORY + a, work) for a in ARMS}

    # 5. medians, the ratios, the losses side by side
    keys = ("tokens_per_second", "tokens_per_second_from_median_step", "tokens_per_cpu_second",
            "median_step_seconds", "peak_training_rss_mib", "maxrss_delta_mib")
    med = {a: {k: statistics.median(r[k] for r in runs[a]) for k in keys} for a in ARMS}
    ratio = lambda k: med["kdistill"][k] / med["trl"][k]  # noqa: E731
    lk, lt = runs["kdistill"][0]["losses"], runs["trl"][0]["losses"]
    summary = {
        "tokens_per_second_median": {a: med[a]["tokens_per_second"] for a in ARMS},
        "ratio_kdistill_over_trl": ratio("tokens_per_second"),
        "ratio_per_repeat": [k["tokens_per_second"] / t["tokens_per_second"]
                             for k, t in zip(runs["kdistill"], runs["trl"])],
        "tokens_per_second_from_median_step": {a: med[a]["tokens_per_second_from_median_step"] for a in ARMS},
        "ratio_from_median_step": ratio("tokens_per_second_from_median_step"),
        "tokens_per_cpu_second_median": {a: med[a]["tokens_per_cpu_second"] for a in ARMS},
        "ratio_per_cpu_second": ratio("tokens_per_cpu_second"),
        "peak_training_rss_mib_median": {a: med[a]["peak_training_rss_mib"] for a in ARMS},
        "maxrss_delta_mib_median": {a: med[a]["maxrss_delta_mib"] for a in ARMS},
        "loss_alone_peak_rss_mib": {a: loss_memory[a]["peak_training_rss_mib"] for a in ARMS},
        "final_loss": {a: runs[a][0]["final_loss"] for a in ARMS},
        "mean_loss_last_10": {a: runs[a][0]["mean_loss_last_10"] for a in ARMS},
        "max_abs_loss_difference_per_step": max(abs(a - b) for a, b in zip(lk, lt)),
        "losses_repeat_identically": all(r["losses"] == runs[a][0]["losses"] for a in ARMS for r in runs[a]),
    }
    if phases is not None:  # the noise-robust comparison: whole steps interleaved in one process
        st, tokens = phases["steps_ms"], runs["kdistill"][0]["trained_tokens_per_step"][0]
        summary["interleaved_steps"] = {
            "tokens_per_second_from_median": {k: 1e3 * tokens / v["median"] for k, v in st.items()},
            "ratio_kdistill_over_trl_median": st["trl"]["median"] / st["kdistill"]["median"],
            "ratio_kdistill_over_trl_p25": st["trl"]["p25"] / st["kdistill"]["p25"],
            "ratio_kdistill_over_trl_min": st["trl"]["min"] / st["kdistill"]["min"],
            "ratio_kdistill_over_plain_pytorch_median": st["plain_pytorch"]["median"] / st["kdistill"]["median"],
        }
    results = {
        "benchmark": "trl_throughput",
        "settings": settings_of(args),
        "setup": setup,
        "summary": summary,
        "in_process": phases,
        "loss_memory": loss_memory,
        "runs": runs,
        "versions": versions,
        "package": package_source(),
    }
    stamp(results, wall_seconds=time.perf_counter() - t_all, machine=machine_description())
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(results, indent=1) + "\n")
    print(json.dumps({"summary": summary, "in_process": phases}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
