"""The top-k token cache (:class:`kdistill.teacher.TokenCache`): size, fidelity, speed.

1. A tiny Llama teacher is trained for ``--teacher-steps`` steps of next-token prediction
   (kdistill's ``Trainer``) on the Python standard library's sources
   (``python_source_corpus(max_bytes=--corpus-bytes)``, a byte-level BPE of ``--vocab``
   tokens trained on them, packed into blocks of ``--block`` tokens).
2. For k in ``--ks``: a cache of the training blocks (float16 values), and on
   ``--eval-sequences`` of them:

   * bytes per stored position (ids + values + tail, from the manifest and the files);
   * for each tail mode (``renormalize``, ``bucket``, ``uniform``) and temperature
     (``--temperatures``): the mean over positions of ``KL(teacher || rebuilt)`` of the
     softened distributions (``softmax(z / T)`` of the teacher's full logits against
     ``softmax(rebuilt / T)``), and the reverse ``KL(rebuilt || teacher)`` (finite for
     ``renormalize``, whose forward KL is dominated by the floor put on the tail); the
     mean absolute error of the rebuilt tail mass at each T (the tail approximation);
3. Serving: the median time of ``TokenCache.__call__`` on one batch (lookup and the
   sparse rows), and of that plus building the dense ``(B, T, V)`` logits.
4. Throughput, for each student size in ``--students`` (``HIDDENxLAYERS``): a student
   trained on the same blocks, in turn (a) plain next-token training with ``Trainer``,
   (b) ``Distiller(student, teacher=TokenCache.open(...))`` with ``TokenKLLoss`` (alpha
   0.5, k = ``--throughput-k``, tail ``bucket``): the cache served sparse, as it is, and
   (c) the same with the cache's outputs made dense before the loss sees them (what a
   loss without a sparse form gets), each run ``--throughput-sequences`` sequences (one
   epoch, the same order), ``--repeats`` rounds of a, b, c; trained tokens per second of
   every run, the median of each arm and the ratios to plain training.

    OMP_NUM_THREADS=2 python benchmarks/token_cache.py [--out benchmarks/results/token_cache_cpu.json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _results import package_source, stamp  # noqa: E402

from kdistill import Distiller, Trainer  # noqa: E402
from kdistill.atomic import atomic_write_text  # noqa: E402
from kdistill.data.text import pack_texts, python_source_corpus, train_tokenizer  # noqa: E402
from kdistill.losses.tokens import TokenKLLoss  # noqa: E402
from kdistill.outputs import Outputs  # noqa: E402
from kdistill.runtime import machine_description  # noqa: E402
from kdistill.teacher import Teacher, TokenCache  # noqa: E402
from kdistill.teacher.token_cache import TAIL_MODES  # noqa: E402


def llama(vocab: int, hidden: int, layers: int, block: int, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=block,
                      tie_word_embeddings=False)
    return LlamaForCausalLM(cfg)


def fidelity(cache: TokenCache, teacher, ds, n_eval: int, temperatures: list[float]) -> dict:
    """KLs of the rebuilt distributions against the teacher's full ones, per tail mode and T."""
    batch = ds.collate(torch.arange(n_eval))
    mask = batch.token_mask
    with torch.no_grad():
        z = teacher(**batch.inputs).logits.double()[mask]  # (P, V)
    out = {}
    for tail in TAIL_MODES:
        served = cache.with_tail(tail)(batch).logits.double()[mask]
        ids, _, _, _ = cache.lookup(torch.arange(n_eval))
        row = {}
        for t in temperatures:
            p = torch.log_softmax(z / t, -1)
            q = torch.log_softmax(served / t, -1)
            fwd = (p.exp() * (p - q)).sum(-1)
            rev = (q.exp() * (q - p)).sum(-1)
            tail_true = 1 - p.exp().gather(-1, ids).sum(-1)
            tail_rebuilt = 1 - q.exp().gather(-1, ids).sum(-1)
            row[f"T={t:g}"] = {"kl_teacher_rebuilt": float(fwd.mean()), "kl_rebuilt_teacher": float(rev.mean()),
                               "tail_mass_true": float(tail_true.mean()),
                               "tail_mass_abs_error": float((tail_rebuilt - tail_true).abs().mean())}
        out[tail] = row
    return out


class DenseServed(Teacher):
    """A token cache whose outputs are handed on as dense ``(B, T, V)`` logits."""

    def __init__(self, cache: TokenCache):
        self.cache = cache

    def __call__(self, batch) -> Outputs:
        return Outputs(self.cache(batch).logits)


def run_arm(arm: str, student_init: dict, args, ds, cache_path: Path | None, size: tuple[int, int]) -> dict:
    student = llama(len(student_init["lm_head.weight"]), size[0], size[1], args.block, seed=1)
    student.load_state_dict(student_init)
    if arm == "plain":
        trainer = Trainer(student)
        trainer.compile(optimizer="adamw", learning_rate=1e-3)
    else:
        cache = TokenCache.open(cache_path, tail="bucket", verify=False)
        trainer = Distiller(student, teacher=cache if arm == "cached" else DenseServed(cache))
        trainer.compile(optimizer="adamw", learning_rate=1e-3, alpha=0.5, distillation_loss_fn=TokenKLLoss())
    t0 = time.perf_counter()
    trainer.fit(ds, epochs=1, batch_size=args.batch_size, shuffle=False, verbose=0)
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "tokens_per_s": ds.num_trained_tokens / wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus-bytes", type=int, default=300_000)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--block", type=int, default=128)
    ap.add_argument("--teacher-hidden", type=int, default=128)
    ap.add_argument("--teacher-layers", type=int, default=4)
    ap.add_argument("--teacher-steps", type=int, default=100)
    ap.add_argument("--students", nargs="+", default=["64x2", "128x4"],
                    help="student sizes for the throughput runs, HIDDENxLAYERS")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--ks", type=int, nargs="+", default=[8, 16, 32, 64, 128])
    ap.add_argument("--temperatures", type=float, nargs="+", default=[1.0, 2.0])
    ap.add_argument("--eval-sequences", type=int, default=48)
    ap.add_argument("--throughput-k", type=int, default=64)
    ap.add_argument("--throughput-sequences", type=int, default=160)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="benchmarks/results/token_cache_cpu.json")
    args = ap.parse_args()
    t_all = time.perf_counter()

    corpus = python_source_corpus(max_bytes=args.corpus_bytes)
    texts = [text for _, text in corpus]
    tokenizer = train_tokenizer(texts, vocab_size=args.vocab)
    ds = pack_texts(texts, tokenizer, args.block)
    vocab = len(tokenizer)
    print(f"{len(ds)} blocks, {ds.num_tokens} tokens, vocab {vocab}", flush=True)

    teacher = llama(vocab, args.teacher_hidden, args.teacher_layers, args.block, seed=0)
    steps_per_epoch = -(-len(ds) // args.batch_size)
    train_ds = ds.select(torch.arange(min(len(ds), args.teacher_steps * args.batch_size)))
    epochs = max(1, -(-args.teacher_steps // steps_per_epoch))
    t0 = time.perf_counter()
    tr = Trainer(teacher)
    tr.compile(optimizer="adamw", learning_rate=3e-3)
    hist = tr.fit(train_ds, epochs=epochs, batch_size=args.batch_size, verbose=0, seed=0)
    teacher.eval()
    teacher_seconds = time.perf_counter() - t0
    teacher_loss = hist.history.get("loss", [None])[-1] if hasattr(hist, "history") else None
    print(f"teacher trained in {teacher_seconds:.0f} s, loss {teacher_loss}", flush=True)

    work = Path(tempfile.mkdtemp(prefix="token_cache_bench_"))
    results = {"settings": {k: v for k, v in vars(args).items() if k != "out"}, "vocab_size": vocab,
               "num_sequences": len(ds), "num_tokens": ds.num_tokens, "teacher_train_seconds": teacher_seconds,
               "teacher_final_loss": teacher_loss, "sizes": {}, "fidelity": {}}
    try:
        for k in args.ks:
            t0 = time.perf_counter()
            cache = TokenCache.build(teacher, ds, work / f"k{k}", k=k, value_dtype="float16", batch_size=16)
            build_s = time.perf_counter() - t0
            files = sum(info["bytes"] for name, info in cache.manifest["files"].items()
                        if name in ("ids.npy", "logprobs.npy", "tail.npy"))
            results["sizes"][str(k)] = {
                "bytes_per_position": cache.bytes_per_position,
                "bytes_per_position_on_disk": files / cache.num_positions,
                "positions": cache.num_positions, "build_seconds": build_s,
            }
            results["fidelity"][str(k)] = fidelity(cache, teacher, ds, args.eval_sequences, args.temperatures)
            b1 = results["fidelity"][str(k)]["bucket"]["T=1"]
            print(f"k={k}: {cache.bytes_per_position} B/position, KL bucket T=1 {b1['kl_teacher_rebuilt']:.4f}, "
                  f"tail mass {b1['tail_mass_true']:.4f}", flush=True)

        sub = ds.select(torch.arange(min(len(ds), args.throughput_sequences)))
        cache_path = work / "throughput"
        TokenCache.build(teacher, sub, cache_path, k=args.throughput_k, value_dtype="float16", batch_size=16)
        results["throughput"] = {}
        served = TokenCache.open(cache_path, tail="bucket")
        batch = sub.collate(torch.arange(args.batch_size))
        serve, dense = [], []
        for _ in range(20):
            t0 = time.perf_counter()
            out = served(batch)
            serve.append(time.perf_counter() - t0)
            out.logits
            dense.append(time.perf_counter() - t0)
        results["serve_ms_per_batch"] = statistics.median(serve) * 1e3
        results["serve_dense_ms_per_batch"] = statistics.median(dense) * 1e3
        for spec in args.students:
            size = tuple(int(v) for v in spec.split("x"))
            init = llama(vocab, size[0], size[1], args.block, seed=1).state_dict()
            arms = {"plain": "plain", "cached_distillation": "cached", "cached_distillation_dense": "dense"}
            runs = {name: [] for name in arms}
            for arm in arms.values():  # warm-up, not counted
                run_arm(arm, init, args, sub.select(torch.arange(16)), cache_path, size)
            for _ in range(args.repeats):
                for name, arm in arms.items():
                    runs[name].append(run_arm(arm, init, args, sub, cache_path, size))
                print(spec, {a: round(r[-1]["tokens_per_s"]) for a, r in runs.items()}, flush=True)
            med = {a: statistics.median(r["tokens_per_s"] for r in rs) for a, rs in runs.items()}
            params = sum(v.numel() for v in init.values())
            results["throughput"][spec] = {
                "student_parameters": params, "runs": runs, "median_tokens_per_s": med,
                "ratio_cached_over_plain": med["cached_distillation"] / med["plain"],
                "ratio_cached_dense_over_plain": med["cached_distillation_dense"] / med["plain"]}
            print(f"{spec}: throughput ratio {results['throughput'][spec]['ratio_cached_over_plain']:.3f} "
                  f"(dense {results['throughput'][spec]['ratio_cached_dense_over_plain']:.3f})", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results["anchors"] = {"distillkit_bytes_per_token": {"k=128": 300, "k=50 (compressed)": 114}}
    results["package"] = package_source()
    stamp(results, wall_seconds=time.perf_counter() - t_all, machine=machine_description())
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
