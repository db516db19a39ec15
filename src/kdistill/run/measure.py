"""Measuring a finished run: accuracies, agreement with the teacher, size and speed, the
warnings a failed training leaves, and the report written from them."""

from __future__ import annotations

import contextlib
import json
import math
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .. import __version__
from ..atomic import atomic_write_text
from ..bench import benchmark_model
from ..config import config_dict
from ..distiller import Trainer
from ..report.content import stage_label
from ..report.numbers import headline_numbers
from ..runtime import machine_description
from .directory import write_run_json
from .store import StageContext


class StageClock:
    """Wall-clock seconds this invocation spent on each stage (cache builds included)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - started


def training_warnings(metrics: dict) -> list[str]:
    """What in a finished run looks like failed training, one sentence each: a model at
    chance accuracy (a language model: a held-out perplexity at or above its vocabulary's
    size, no better than a uniform guess, or not finite), or a stage whose training loss
    ended far above its first epoch's (a diverged optimisation, e.g. a learning rate orders
    of magnitude too high). A distilled student worse than the scratch one is not a failed
    training: the report says so, this does not. The run still finishes; the log and the
    report say it."""
    out = []
    dataset = metrics.get("dataset") or {}
    n = dataset.get("num_classes") or 0
    vocab = dataset.get("vocab_size") or 0
    for name, m in (metrics.get("models") or {}).items():
        acc = m.get("test_accuracy")
        if n > 1 and acc is not None and acc <= 1.5 / n:
            out.append(f"{stage_label(name)} is at chance accuracy ({100 * acc:.2f}% with {n} classes): its "
                       f"training failed; check stages.{name}.optimizer (a learning rate far too high diverges) "
                       "and the data")
        ppl = m.get("perplexity") if metrics.get("task") == "text" else None
        if ppl is not None and (not math.isfinite(ppl) or (vocab > 1 and ppl >= vocab)):
            standing = (f"no better than a uniform guess over the {vocab:,} tokens of the vocabulary"
                        if vocab > 1 and not math.isnan(ppl) else "not a finite number")
            out.append(f"{stage_label(name)}'s held-out perplexity is {ppl:,.1f}, {standing}: its training failed; "
                       f"check stages.{name}.optimizer (a learning rate far too high diverges), its epochs and "
                       "the data")
    for name, record in (metrics.get("histories") or {}).items():
        loss = [v for v in ((record or {}).get("history") or {}).get("loss") or [] if v is not None]
        if len(loss) >= 2 and loss[-1] > 10 * max(loss[0], 1e-8):
            out.append(f"the {stage_label(name)} stage's training loss ended at {loss[-1]:.4g}, more than 10x its "
                       f"first epoch's ({loss[0]:.4g}): the optimisation diverged; lower stages.{name}.optimizer.lr")
    return out


def predict_classes(model: nn.Module, x: torch.Tensor, device: torch.device, batch_size: int) -> torch.Tensor:
    return Trainer(model, device=device).predict(x, batch_size=batch_size).argmax(-1)


def measure(ctx: StageContext, models: dict[str, nn.Module], results: dict[str, dict], x_test, y_test, x_lab, x_unl) -> dict:
    cfg, data = ctx.config, ctx.data
    preds = {name: predict_classes(m, x_test, ctx.device, cfg.data.eval_batch_size) for name, m in models.items()}
    out: dict[str, dict] = {}
    for name, model in models.items():
        # latency and throughput are the CPU's, whatever trained the model, in the ordinary
        # memory format (a live teacher may have run channels-last)
        model.to("cpu", memory_format=torch.contiguous_format)
        out[name] = {
            "test_accuracy": float((preds[name] == y_test).float().mean()),
            **benchmark_model(model, data.input_shape, latency_batch=cfg.report.latency_batch,
                              throughput_batch=cfg.report.throughput_batch, repeats=cfg.report.repeats),
            "train_seconds": results[name]["seconds"],
            "reused": results[name]["reused"],
        }
    gain, recovered = headline_numbers(out)
    n = data.num_classes
    confusion = torch.bincount(y_test * n + preds["distil"], minlength=n * n).reshape(n, n)
    return {
        "kdistill_version": __version__,
        "name": cfg.name,
        "config": config_dict(cfg),
        "dataset": {"name": data.name, "train": len(data.x_train), "labelled": len(x_lab),
                    "unlabelled": 0 if x_unl is None else len(x_unl), "test": len(x_test),
                    "num_classes": n, "class_names": list(data.classes) or None, "input_shape": list(data.input_shape)},
        "stages": list(models),
        "models": out,
        "distillation_gain_points": gain,
        "accuracy_recovered": recovered,
        "agreement": {k: float((preds[k] == preds["teacher"]).float().mean()) for k in models if k != "teacher"},
        "confusion_matrix": confusion.tolist(),
        "histories": {k: r["history"] for k, r in results.items() if r.get("history")},
        "fingerprints": {k: r["fingerprint"] for k, r in results.items()},
        "machine": machine_description(),
    }


def finish_run(run_dir: Path, config, metrics: dict, stage_clock: StageClock, started: float,
               log: Callable[[str], None]) -> None:
    """The end of every run (rank 0): timing and warnings into ``metrics``, then
    ``metrics.json``, the report, and ``run.json`` marked finished, in that order (a run
    killed before the last write is continued, and finds its stages done)."""
    metrics["timing"] = {"wall_seconds": time.time() - started, "stages": stage_clock.seconds}
    metrics["warnings"] = training_warnings(metrics)
    for warning in metrics["warnings"]:
        log(f"warning: {warning}")
    atomic_write_text(run_dir / "metrics.json", json.dumps(metrics, indent=1))
    write_run_report(run_dir, metrics)
    write_run_json(run_dir, config, "finished", started)


def write_run_report(run_dir: Path, metrics: dict) -> dict[str, Path]:
    """``report.md`` and ``report.html`` (with figures) of a run from its metrics."""
    from ..report.html import write_report

    return write_report(run_dir, metrics)


def refresh_metrics(run_dir: Path, metrics: dict) -> dict:
    """Recompute the derived numbers of ``metrics.json`` (written by an older kdistill)
    from the measured accuracies (a language-model run: held-out losses and perplexities);
    rewrites the file when they changed."""
    if metrics.get("task") == "text":
        from ..report.text import text_headline_numbers

        keys, numbers = ("perplexity_gain", "loss_gap_recovered"), text_headline_numbers(metrics.get("models", {}))
    else:
        keys, numbers = ("distillation_gain_points", "accuracy_recovered"), headline_numbers(metrics.get("models", {}))
    if tuple(metrics.get(k) for k in keys) != numbers:
        metrics = {**metrics, **dict(zip(keys, numbers))}
        atomic_write_text(run_dir / "metrics.json", json.dumps(metrics, indent=1))
    return metrics
