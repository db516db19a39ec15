"""Loss parity with TRL's GKD and with torchtune's forward KL.

1. kdistill's :func:`~kdistill.losses.generalized_jsd_loss` against TRL's
   ``GKDTrainer.generalized_jsd_loss`` (``trl.experimental.gkd.gkd_trainer``) on the same
   random logits, with ``labels`` that mask some positions (-100), for ``beta`` in
   {0, 0.5, 1} and temperature in {1, 2}: the loss and its gradient with respect to the
   student's logits, in float64 and in float32. The reductions match: TRL's ``"batchmean"`` with labels divides the
   sum over valid tokens by their number (kdistill's ``"mean"`` over the mask), and TRL does
   not multiply by ``T^2`` (``temperature_squared=False``). kdistill is run unchunked
   (``chunk_size=0``) and chunked (``chunk_size=5``).
2. kdistill's forward KL (:func:`~kdistill.losses.token_kl_loss`, ``T = 1``) against the
   cross-entropy form of torchtune's ``ForwardKLLoss``: per token ``-sum_v p_t log p_s``,
   then the mean over valid tokens. The two differ by the teacher's entropy, a constant, so
   the gradients with respect to the student's logits must agree (the values differ by the
   mean entropy, reported). torchtune is not needed: that formula is written out below.

TRL is an optional dependency (``pip install trl``); the script stops with a message
without it. Writes the largest differences to JSON, and stops with an error when one is above
the tolerance: 1e-6, relative to the loss's size where that is above 1 (float32 holds about 7
significant digits, so two correct float32 computations of a loss of 7 can differ by 5e-7).

    python benchmarks/trl_parity.py [--out benchmarks/results/trl_loss_parity.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _results import stamp, package_source  # noqa: E402

from kdistill.atomic import atomic_write_text  # noqa: E402
from kdistill.losses import generalized_jsd_loss, token_kl_loss  # noqa: E402
from kdistill.outputs import IGNORE_INDEX  # noqa: E402
from kdistill.runtime import machine_description  # noqa: E402

BETAS = (0.0, 0.5, 1.0)
TEMPERATURES = (1.0, 2.0)
CHUNKS = (0, 5)
TOLERANCE = 1e-6


def trl_gkd_loss():
    """TRL's ``GKDTrainer.generalized_jsd_loss`` (a staticmethod), or exit with how to get it."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TRL warns that trl.experimental is experimental
            import trl
            from trl.experimental.gkd.gkd_trainer import GKDTrainer
    except ImportError as e:
        raise SystemExit(f"this comparison needs TRL with trl.experimental.gkd ({e}): pip install trl") from None
    return GKDTrainer.generalized_jsd_loss, trl.__version__


def cross_entropy_forward_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                             labels: torch.Tensor) -> torch.Tensor:
    """torchtune's forward-KL form: per token ``-sum_v p_t(v) log p_s(v)``, mean over valid tokens."""
    dtype = torch.promote_types(student_logits.dtype, torch.float32)  # half precision in float32, as torchtune
    p_t = torch.softmax(teacher_logits.to(dtype), dim=-1)
    log_p_s = torch.log_softmax(student_logits.to(dtype), dim=-1)
    per_token = -(p_t * log_p_s).sum(dim=-1)  # (B, T)
    valid = labels != IGNORE_INDEX
    return per_token[valid].sum() / valid.sum().clamp_min(1)


def value_and_grad(fn, student: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    student = student.detach().requires_grad_()
    loss = fn(student)
    (grad,) = torch.autograd.grad(loss, student)
    return loss.detach(), grad


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=16)
    p.add_argument("--vocab", type=int, default=128)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "trl_loss_parity.json"))
    args = p.parse_args()
    started = time.perf_counter()
    trl_loss, trl_version = trl_gkd_loss()

    # 1. random logits (scale 3) and labels with about a third of the positions masked
    g = torch.Generator().manual_seed(0)
    shape = (args.batch, args.seq, args.vocab)
    student64 = 3.0 * torch.randn(shape, generator=g, dtype=torch.float64)
    teacher64 = 3.0 * torch.randn(shape, generator=g, dtype=torch.float64)
    labels = torch.randint(0, args.vocab, shape[:2], generator=g)
    labels[torch.rand(shape[:2], generator=g) < 1 / 3] = IGNORE_INDEX
    mask = labels != IGNORE_INDEX

    gkd, fkl = [], []
    for dtype in (torch.float64, torch.float32):
        student, teacher = student64.to(dtype), teacher64.to(dtype)
        name = str(dtype).replace("torch.", "")
        # 2. generalized JSD: TRL against kdistill, unchunked and chunked
        for beta in BETAS:
            for t in TEMPERATURES:
                ref_value, ref_grad = value_and_grad(
                    lambda s: trl_loss(s, teacher, labels=labels, beta=beta, temperature=t), student)
                for chunk in CHUNKS:
                    value, grad = value_and_grad(lambda s: generalized_jsd_loss(
                        s, teacher, beta, t, temperature_squared=False, mask=mask, chunk_size=chunk), student)
                    gkd.append({"dtype": name, "beta": beta, "temperature": t, "chunk_size": chunk,
                                "trl_value": ref_value.item(),
                                "value_abs_diff": abs(value.item() - ref_value.item()),
                                "grad_max_abs_diff": (grad - ref_grad).abs().max().item()})
                    print(gkd[-1], flush=True)

        # 3. forward KL: the cross-entropy form has the same gradient
        ce_value, ce_grad = value_and_grad(lambda s: cross_entropy_forward_kl(s, teacher, labels), student)
        p_t = torch.softmax(teacher, dim=-1)
        entropy = -(p_t * torch.log_softmax(teacher, dim=-1)).sum(-1)[mask].mean()
        for chunk in CHUNKS:
            value, grad = value_and_grad(
                lambda s: token_kl_loss(s, teacher, 1.0, mask=mask, chunk_size=chunk), student)
            fkl.append({"dtype": name, "chunk_size": chunk, "grad_max_abs_diff": (grad - ce_grad).abs().max().item(),
                        "value_minus_cross_entropy_form": value.item() - ce_value.item(),
                        "minus_mean_teacher_entropy": -entropy.item()})
            print(fkl[-1], flush=True)

    # 4. JSON
    def excess(r: dict) -> float:  # difference over the tolerance (<= 1: within it)
        return max(r["value_abs_diff"] / max(1.0, abs(r["trl_value"])), r["grad_max_abs_diff"]) / TOLERANCE

    worst_gkd = max(max(r["value_abs_diff"], r["grad_max_abs_diff"]) for r in gkd)
    gkd_ok = all(excess(r) <= 1.0 for r in gkd)
    worst_fkl = max(r["grad_max_abs_diff"] for r in fkl)
    by_dtype = {d: {"generalized_jsd_max_abs_diff": max(max(r["value_abs_diff"], r["grad_max_abs_diff"])
                                                         for r in gkd if r["dtype"] == d),
                    "forward_kl_grad_max_abs_diff": max(r["grad_max_abs_diff"] for r in fkl if r["dtype"] == d)}
                for d in ("float64", "float32")}
    results = {
        "benchmark": "trl_loss_parity",
        "settings": {"batch": args.batch, "seq": args.seq, "vocab": args.vocab, "dtypes": ["float64", "float32"],
                     "masked_positions": int((~mask).sum()), "positions": mask.numel(), "betas": list(BETAS),
                     "temperatures": list(TEMPERATURES), "chunk_sizes": list(CHUNKS)},
        "kdistill": package_source(),
        "trl": trl_version,
        "tolerance": TOLERANCE,
        "tolerance_rule": "value: abs diff <= tolerance * max(1, |value|); gradient: max abs diff <= tolerance",
        "max_abs_diff_by_dtype": by_dtype,
        "generalized_jsd_vs_trl": {"max_abs_diff": worst_gkd, "within_tolerance": gkd_ok, "cases": gkd},
        "forward_kl_vs_cross_entropy_form": {"grad_max_abs_diff": worst_fkl, "within_tolerance": worst_fkl <= TOLERANCE,
                                             "cases": fkl},
    }
    stamp(results, wall_seconds=time.perf_counter() - started, machine=machine_description())
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(results, indent=1) + "\n")
    print(f"generalized JSD vs TRL: max abs diff {worst_gkd:.3g}; forward KL gradient vs cross-entropy form: "
          f"{worst_fkl:.3g}")
    print(f"wrote {out}")
    if not gkd_ok or worst_fkl > TOLERANCE:
        raise SystemExit(f"a difference is above the tolerance ({TOLERANCE})")


if __name__ == "__main__":
    main()
