"""The top-k token cache's storage: bytes per position against KL error, on the text main
job's teacher.

1. The teacher of ``src/kdistill/configs/text/kd/python_llama.yaml`` (Llama, 192 wide, 4
   layers, vocabulary 2048, 2 epochs on the standard library's sources) is read from a run
   directory of that config (``--run-dir``: its ``stages/teacher/checkpoint.pt`` and
   ``tokenizer/``); when the directory holds no trained teacher, ``kdistill run CONFIG
   --out RUN_DIR`` makes one first (the stage store may make that a copy). The data are
   the config's own (``load_text_data``): the first ``--sequences`` held-out blocks.
2. The teacher's full next-token distributions at every trained-on position of them
   (float64 ``log_softmax``).
3. For every k in ``--ks`` and every value encoding of the cache (float32, float16,
   bfloat16 values; for each ``value_bits`` in ``--value-bits`` and ``exact_k`` in
   ``--exact-ks``: the top ``exact_k`` in float16, the rest as codes; for each ``curve``
   in ``--curves`` and ``exact_k`` in ``--curve-exact-ks``: the top ``exact_k`` in float16,
   the rest as a rank curve of float16 coefficients): the rows exactly as
   a cache stores them (``encode_token_rows``, the build's own encoder) and read back
   (``decode_token_rows``, the lookup's own decoder); bytes per position
   (``token_row_bytes``: packed ids, values, codes and their grid's low end or curve
   coefficients, tail); and
   ``KL(teacher || rebuilt)`` at T = 1 and T = 2, the rebuild being
   ``rebuild_logits(..., mode="bucket")`` (the default tail mode), mean over positions.
4. A reference: DistillKit's documented value compression (the top ``exact_k``
   log-probabilities in bfloat16, the rest fitted by least squares as a function of rank
   with float32 coefficients of the terms ``[1, t, t^2, t^3, t^4, sqrt t]`` (its
   recommended setting, k = 128, exact_k = 16, about 300 bytes per token at its
   vocabularies) or ``[1, t, sqrt t]`` (its budget setting, k = 50, exact_k = 1, about
   114 bytes), ids packed to ``ceil(log2 V)`` bits, no tail stored), re-implemented here
   from that description and scored the same way, with the bucket tail: either the tail
   stored as ours is (float16, 2 bytes more: ``tail stored``), or inferred as ``1 - sum``
   of its decoded probabilities (no bytes: ``tail inferred``).
5. At the byte budgets of DistillKit's two anchors (300 and 114 bytes, and the sizes its
   two settings take at this vocabulary), the smallest KL each family reaches within the
   budget.
6. Two built caches (``TokenCache.build`` on the same blocks: k = 64 with 4-bit codes,
   exact_k 4; k = 128 with a 6-term curve, exact_k 8) check that the manifest's
   ``bytes_per_position`` is what their files hold and that ``lookup`` returns the rows
   scored above.

    OMP_NUM_THREADS=1 python benchmarks/token_cache_storage.py \\
        [--run-dir runs/text/kd/python_llama] [--out benchmarks/results/token_cache_storage_cpu.json]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _results import package_source, stamp  # noqa: E402

from kdistill.atomic import atomic_write_text  # noqa: E402
from kdistill.checkpoint import load_weights  # noqa: E402
from kdistill.config import load_config  # noqa: E402
from kdistill.runtime import machine_description  # noqa: E402
from kdistill.teacher import TokenCache  # noqa: E402
from kdistill.teacher.cache.bitpack import bits_for, packed_bytes  # noqa: E402
from kdistill.teacher.cache.format import (decode_token_rows, encode_token_rows, token_layout,  # noqa: E402
                                           token_row_bytes)
from kdistill.teacher.token_cache import encode_topk, rebuild_logits  # noqa: E402
from kdistill.text_experiment import build_stage_lm, load_text_data  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "src/kdistill/configs/text/kd/python_llama.yaml"

#: DistillKit's published sizes (README of arcee-ai/DistillKit): about 300 bytes per token
#: for k = 128 (exact_k 16, six polynomial terms) and about 114 for k = 50 (exact_k 1, three).
ANCHORS = {"distillkit_k128": 300, "distillkit_k50": 114}
DK_SETTINGS = {"distillkit_k128": {"exact_k": 16, "terms": ["1", "t", "t^2", "t^3", "t^4", "sqrt"]},
               "distillkit_k50": {"exact_k": 1, "terms": ["1", "t", "sqrt"]}}


def teacher_and_data(config_path: Path, run_dir: Path):
    config = load_config(config_path)
    ckpt = run_dir / "stages" / "teacher" / "checkpoint.pt"
    if not ckpt.is_file():
        print(f"no trained teacher in {run_dir}: running kdistill run {config_path} --out {run_dir}", flush=True)
        subprocess.run([sys.executable, "-m", "kdistill", "run", str(config_path), "--out", str(run_dir), "--quiet"],
                       check=True)
    data = load_text_data(config, run_dir)
    teacher = build_stage_lm(run_dir, config, "teacher")
    load_weights(ckpt, teacher)
    done = json.loads((ckpt.parent / "done.json").read_text()) if (ckpt.parent / "done.json").is_file() else {}
    info = {"config": str(config_path.relative_to(ROOT)) if config_path.is_relative_to(ROOT) else str(config_path),
            "run_dir": str(run_dir), "checkpoint_sha256": hashlib.sha256(ckpt.read_bytes()).hexdigest(),
            "stage_fingerprint": done.get("fingerprint"), "data_fingerprint": data.fingerprint,
            "parameters": sum(p.numel() for p in teacher.parameters()),
            "train_history": done.get("history")}
    return teacher.eval(), data, info


def full_logprobs(teacher, ds, batch_size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """``(P, V)`` float64 log-probabilities at every trained-on position of ``ds``, in
    order, and the ``(P,)`` next tokens there."""
    out, targets = [], []
    with torch.inference_mode():
        for start in range(0, len(ds), batch_size):
            batch = ds.collate(torch.arange(start, min(len(ds), start + batch_size)))
            z = teacher(**batch.inputs).logits
            out.append(torch.log_softmax(z[batch.token_mask].double(), dim=-1))
            targets.append(batch.targets[batch.token_mask])
    return torch.cat(out), torch.cat(targets)


def kl(p_log: torch.Tensor, rebuilt: torch.Tensor, temperature: float) -> float:
    """Mean over rows of ``KL(softmax(p_log / T) || softmax(rebuilt / T))``."""
    p = torch.log_softmax(p_log / temperature, dim=-1)
    q = torch.log_softmax(rebuilt.double() / temperature, dim=-1)
    return float((p.exp() * (p - q)).sum(-1).mean())


# --------------------------------------------------------------------------- the reference
def _terms(names: list[str], n: int) -> torch.Tensor:
    t = torch.arange(n, dtype=torch.float64)
    cols = {"1": torch.ones_like(t), "t": t, "t^2": t ** 2, "t^3": t ** 3, "t^4": t ** 4, "sqrt": t.sqrt()}
    return torch.stack([cols[name] for name in names], dim=-1)  # (n, terms)


def distillkit_style(values: torch.Tensor, exact_k: int, terms: list[str]) -> torch.Tensor:
    """DistillKit's documented value scheme, decoded: descending ``(P, k)`` log-probs ->
    the top ``exact_k`` rounded to bfloat16, the rest a least-squares fit in the rank
    (coefficients rounded to float32)."""
    exact = values[:, :exact_k].to(torch.bfloat16).double()
    rest = values[:, exact_k:].double()
    if rest.shape[1] == 0:
        return exact
    x = _terms(terms, rest.shape[1])
    coeffs = (torch.linalg.pinv(x) @ rest.T).T.float().double()  # (P, terms), stored as float32
    return torch.cat([exact, coeffs @ x.T], dim=1)


def distillkit_bytes(k: int, vocab: int, exact_k: int, terms: int) -> int:
    """Its stored bytes per token: packed ids, bfloat16 exact values, float32 terms (none
    when every value is exact)."""
    return packed_bytes(k, bits_for(vocab)) + 2 * exact_k + (4 * terms if exact_k < k else 0)


def inferred_tail(values: torch.Tensor) -> torch.Tensor:
    """log(1 - sum exp(values)) where positive, -inf (no tail) elsewhere."""
    s = torch.logsumexp(values.double(), dim=-1)
    return torch.where(s < 0, torch.log(-torch.expm1(s.clamp(max=-1e-12))), torch.full_like(s, -math.inf))


# --------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, default=CONFIG)
    ap.add_argument("--run-dir", type=Path, default=ROOT / "runs/text/kd/python_llama")
    ap.add_argument("--sequences", type=int, default=32, help="held-out blocks scored (128 tokens each)")
    ap.add_argument("--ks", type=int, nargs="+", default=[8, 16, 32, 50, 64, 96, 128, 160, 192, 256])
    ap.add_argument("--value-bits", type=int, nargs="+", default=[8, 6, 5, 4, 3, 2])
    ap.add_argument("--exact-ks", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--curves", type=int, nargs="+", default=[3, 4, 5, 6])
    ap.add_argument("--curve-exact-ks", type=int, nargs="+", default=[2, 4, 8, 16])
    ap.add_argument("--temperatures", type=float, nargs="+", default=[1.0, 2.0])
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/token_cache_storage_cpu.json")
    args = ap.parse_args()
    t_all = time.perf_counter()
    torch.manual_seed(0)

    teacher, data, info = teacher_and_data(args.config, args.run_dir.resolve())
    ds = data.held_out.select(torch.arange(min(args.sequences, len(data.held_out))))
    p_log, targets = full_logprobs(teacher, ds)
    vocab = int(p_log.shape[-1])
    info.update({"held_out_sequences": len(ds), "positions": int(p_log.shape[0]), "vocab_size": vocab,
                 "id_bits": bits_for(vocab),
                 "slice_loss": float(-p_log.gather(1, targets.unsqueeze(1)).mean()),
                 "entropy": float(-(p_log.exp() * p_log).sum(-1).mean())})
    print(f"teacher: {info['parameters']} parameters; {info['positions']} held-out positions, loss "
          f"{info['slice_loss']:.3f}, entropy {info['entropy']:.3f} nats", flush=True)
    full16 = p_log.float().half().double()  # the full logits stored as float16: the dense reference
    info["full_float16"] = {"bytes_per_position": 2 * vocab,
                            **{f"kl_T{t:g}": kl(p_log, full16, t) for t in args.temperatures}}

    encodings = [("float32", None, None, None), ("float16", None, None, None), ("bfloat16", None, None, None)]
    encodings += [("float16", b, e, None) for b in args.value_bits for e in args.exact_ks]
    encodings += [("float16", None, e, c) for c in args.curves for e in args.curve_exact_ks]
    rows, reference = [], []
    every = np.arange(p_log.shape[0])
    for k in args.ks:
        ids, values, tail = encode_topk(p_log, k)
        mass = float(values.exp().sum(-1).mean())
        for value_dtype, value_bits, exact_k, curve in encodings:
            if exact_k is not None and exact_k >= k:
                continue
            stored = encode_token_rows(ids, values, tail, vocab, value_dtype, value_bits, exact_k, curve)
            got_ids, got_lp, got_tail = decode_token_rows(stored, every, k, vocab, value_dtype, value_bits, exact_k,
                                                          curve)
            assert torch.equal(got_ids, ids)
            rebuilt = rebuild_logits(got_ids, got_lp, got_tail, vocab, mode="bucket")
            family = "float" if exact_k is None else "codes" if value_bits is not None else "curve"
            name = {"float": value_dtype, "codes": f"{value_bits}-bit codes, exact_k {exact_k}",
                    "curve": f"curve {curve}, exact_k {exact_k}"}[family]
            row = {"k": k, "family": family, "encoding": name, "value_dtype": value_dtype, "value_bits": value_bits,
                   "curve": curve, "exact_k": exact_k,
                   "bytes_per_position": token_row_bytes(token_layout(k, vocab, value_dtype, value_bits, exact_k,
                                                                      curve)),
                   "topk_mass": mass,
                   "max_abs_value_error": float((got_lp.double() - values).abs().max()),
                   **{f"kl_T{t:g}": kl(p_log, rebuilt, t) for t in args.temperatures}}
            rows.append(row)
            print(f"k={k:4d} {name:>26}: {row['bytes_per_position']:4d} B/position, KL T=1 {row['kl_T1']:.5f}"
                  + (f", T=2 {row['kl_T2']:.5f}" if "kl_T2" in row else ""), flush=True)
        for label, setting in DK_SETTINGS.items():
            exact_k = min(setting["exact_k"], k)
            dec = distillkit_style(values, exact_k, setting["terms"])
            for how, t_log, extra in (("tail stored", tail.half().float(), 2),
                                      ("tail inferred", inferred_tail(dec).float(), 0)):
                rebuilt = rebuild_logits(ids, dec.float(), t_log, vocab, mode="bucket")
                row = {"k": k, "encoding": f"{label} terms, {how}", "setting": label, "tail": how,
                       "exact_k": exact_k, "terms": setting["terms"],
                       "bytes_per_position": distillkit_bytes(k, vocab, exact_k, len(setting["terms"])) + extra,
                       "max_abs_value_error": float((dec - values).abs().max()),
                       **{f"kl_T{t:g}": kl(p_log, rebuilt, t) for t in args.temperatures}}
                reference.append(row)
                print(f"k={k:4d} {row['encoding']:>38}: {row['bytes_per_position']:4d} B/position, "
                      f"KL T=1 {row['kl_T1']:.5f}", flush=True)

    # the smallest KL within each byte budget, ours against the reference
    budgets = {"distillkit_k128_published": ANCHORS["distillkit_k128"],
               "distillkit_k50_published": ANCHORS["distillkit_k50"],
               "distillkit_k128_at_this_vocab": distillkit_bytes(128, vocab, 16, 6) + 2,
               "distillkit_k50_at_this_vocab": distillkit_bytes(50, vocab, 1, 3) + 2}
    at_budget = {}
    for name, budget in budgets.items():
        entry = {"bytes": budget}
        for family, pool in (("kdistill", rows),
                             *((f"kdistill_{fam}", [r for r in rows if r["family"] == fam])
                               for fam in ("float", "codes", "curve")),
                             ("distillkit_style", [r for r in reference if r["tail"] == "tail stored"])):
            fits = [r for r in pool if r["bytes_per_position"] <= budget]
            if fits:
                best = min(fits, key=lambda r: r["kl_T1"])
                entry[family] = {key: best[key] for key in ("k", "encoding", "bytes_per_position", "kl_T1")
                                 if key in best} | ({"kl_T2": best["kl_T2"]} if "kl_T2" in best else {})
        dk = {"distillkit_k128_at_this_vocab": ("distillkit_k128", 128),
              "distillkit_k50_at_this_vocab": ("distillkit_k50", 50)}.get(name)
        if dk is not None:  # its own setting, not the best of its family
            for own in (r for r in reference if r["setting"] == dk[0] and r["k"] == dk[1]):
                entry[f"distillkit_setting, {own['tail']}"] = {
                    "k": own["k"], "bytes_per_position": own["bytes_per_position"], "kl_T1": own["kl_T1"],
                    **({"kl_T2": own["kl_T2"]} if "kl_T2" in own else {})}
        at_budget[name] = entry
        print(name, json.dumps(entry), flush=True)
    frontiers = {}
    for name, pool in (("kdistill", rows), ("kdistill_float", [r for r in rows if r["family"] == "float"]),
                       ("kdistill_codes", [r for r in rows if r["family"] == "codes"]),
                       ("kdistill_curve", [r for r in rows if r["family"] == "curve"]),
                       ("distillkit_style", [r for r in reference if r["tail"] == "tail stored"])):
        frontier, best_kl = [], math.inf
        for r in sorted(pool, key=lambda r: (r["bytes_per_position"], r["kl_T1"])):
            if r["kl_T1"] < best_kl:
                frontier.append({"k": r["k"], "encoding": r["encoding"], "bytes_per_position": r["bytes_per_position"],
                                 "kl_T1": r["kl_T1"], **({"kl_T2": r["kl_T2"]} if "kl_T2" in r else {})})
                best_kl = r["kl_T1"]
        frontiers[name] = frontier

    # caches built through TokenCache.build: their bytes and their lookup
    built = []
    with tempfile.TemporaryDirectory() as tmp:
        for k, enc in ((64, {"value_bits": 4, "exact_k": 4}), (128, {"curve": 6, "exact_k": 8})):
            path = Path(tmp) / f"k{k}"
            cache = TokenCache.build(teacher, ds, path, k=k, batch_size=16, **enc)
            enc_args = (enc.get("value_bits"), enc["exact_k"], enc.get("curve"))
            on_disk = 0
            for fname in token_layout(k, vocab, "float16", *enc_args):
                with open(path / fname, "rb") as f:
                    major, _ = np.lib.format.read_magic(f)
                    (np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0)(f)
                    on_disk += (path / fname).stat().st_size - f.tell()
            ids, lp, tail, _ = cache.lookup(torch.arange(len(ds)))
            want_ids, want_values, want_tail = encode_topk(p_log, k)
            stored = encode_token_rows(want_ids, want_values, want_tail, vocab, "float16", *enc_args)
            ref = decode_token_rows(stored, every, k, vocab, "float16", *enc_args)
            check = {"k": k, **enc, "manifest_bytes_per_position": cache.bytes_per_position,
                     "file_bytes_per_position": on_disk / cache.num_positions,
                     "lookup_ids_equal": bool(torch.equal(ids, ref[0])),
                     "lookup_max_abs_logprob_difference": float((lp - ref[1]).abs().max()),
                     "lookup_max_abs_tail_difference": float((tail - ref[2]).abs().max())}
            built.append(check)
            print("built cache:", check, flush=True)

    results = {"benchmark": "token_cache_storage", "teacher": info, "tail_mode": "bucket",
               "settings": {"ks": args.ks, "value_bits": args.value_bits, "exact_ks": args.exact_ks,
                            "curves": args.curves, "curve_exact_ks": args.curve_exact_ks,
                            "temperatures": args.temperatures, "sequences": args.sequences},
               "rows": rows, "distillkit_style": reference, "anchors_bytes": ANCHORS, "at_budget": at_budget,
               "frontiers_T1": frontiers, "built_caches": built, "package": package_source(),
               "torch": torch.__version__, "numpy": np.__version__}
    stamp(results, wall_seconds=time.perf_counter() - t_all, machine=machine_description())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps(results, indent=1) + "\n")
    print(f"wrote {args.out} ({results['wall_seconds']:.0f} s)")


if __name__ == "__main__":
    main()
