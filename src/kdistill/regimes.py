"""Few labels and all labels: one teacher, two regimes, one report (``kdistill classic``).

Distillation pays most where labels are scarce: soft targets carry what the teacher knows
about every image, labelled or not (Hinton et al. 2015). The main job therefore runs an
experiment in two *regimes* that share one teacher:

``few_labels``
    Both students see ``labels`` class-balanced labelled samples; the distilled student
    also gets the rest of the training set as soft-target-only data (a *transfer set*).
    The student from scratch takes as many optimizer steps as the distilled one.
``all_labels``
    Both students see every label: the comparison most papers make. Here distillation
    pays only when the teacher is clearly more accurate than the student trained alone
    (measured in ``docs/capacity_gap.md``).

Each regime is an ordinary run directory (``OUT/few_labels``, ``OUT/all_labels``: config,
stages, metrics, report; resumable like any run). The teacher is trained once: the second
regime reuses it from the stage store (or, without a store, loads the first regime's
teacher checkpoint as it is), and with ``stages.distil.teacher_cache`` both regimes
distil from one cache of the teacher's outputs over the whole training set. Then
``OUT/regimes.json``, ``OUT/report.md``, ``OUT/report.html`` and ``OUT/figures/regimes.png``
put the two side by side. Running the same command again continues where it stopped.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

from . import distributed
from .atomic import atomic_write_text
from .config import ExperimentConfig, config_dict, validate_config
from .runtime import machine_description

REGIMES = ("few_labels", "all_labels")
TITLES = {"few_labels": "few labels + transfer set", "all_labels": "all labels"}


def regime_configs(config: ExperimentConfig, labels: int | None, *, compare_all_labels: bool = True
                   ) -> dict[str, ExperimentConfig]:
    """The config of each regime to run, derived from ``config``.

    Args:
        config: the experiment (its ``data.subset``/``data.unlabelled`` are replaced).
        labels: labelled samples of the few-label regime; ``None`` runs the all-label
            regime alone.
        compare_all_labels: with ``labels``, also run the all-label regime.

    Returns:
        ``{"few_labels": ..., "all_labels": ...}`` (those that run, in that order).

    Raises:
        ConfigError: ``labels`` is not a positive number.
    """
    def with_labels(subset: int | None, source: str) -> ExperimentConfig:
        raw = config_dict(config)  # a fresh copy each time
        raw["data"].update(subset=subset, unlabelled=subset is not None)
        return validate_config(raw, source=source)

    out: dict[str, ExperimentConfig] = {}
    if labels is not None:
        out["few_labels"] = with_labels(labels, "few-label regime")
    if labels is None or compare_all_labels:
        out["all_labels"] = with_labels(None, "all-label regime")
    return out


def run_regimes(
    config: ExperimentConfig,
    out_dir: str | Path,
    *,
    labels: int | None = 1000,
    compare_all_labels: bool = True,
    force: bool = False,
    verbose: int = 1,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run the regimes of :func:`regime_configs` into ``out_dir`` and write their report.

    Returns:
        What ``out_dir/regimes.json`` holds: per regime the run's headline numbers
        (accuracies, gain, gap recovered, agreement, per-stage seconds), the wall time
        of this invocation, the machine.
    """
    from .experiment import run_experiment

    started = time.time()
    distributed.init()  # under torchrun: join the group first, so only rank 0 speaks
    if not distributed.is_main():
        log = lambda message: None  # noqa: E731
    out_dir = Path(out_dir)
    configs = regime_configs(config, labels, compare_all_labels=compare_all_labels)
    results: dict[str, dict] = {}
    first_dir: Path | None = None
    for name, cfg in configs.items():
        if first_dir is not None and cfg.teacher_store is None and cfg.stages.teacher.epochs > 0:
            # no stage store to share the teacher through: use the first regime's as it is
            raw = config_dict(cfg)
            raw["teacher"]["checkpoint"] = str(first_dir / "stages" / "teacher" / "checkpoint.pt")
            raw["stages"]["teacher"]["epochs"] = 0
            cfg = validate_config(raw, source=f"{name} regime")
        log(f"== regime: {TITLES[name]} ==")
        results[name] = run_experiment(cfg, run_dir=out_dir / name, force=force, verbose=verbose, log=log)
        first_dir = first_dir or out_dir / name
    summary = summarize(results, wall_seconds=time.time() - started)
    if distributed.is_main():
        atomic_write_text(out_dir / "regimes.json", json.dumps(summary, indent=1))
        from .report.regimes import write_regimes_report

        write_regimes_report(out_dir, summary)
    return summary


def summarize(results: dict[str, dict], *, wall_seconds: float) -> dict[str, Any]:
    """The two runs' ``metrics.json`` -> the numbers the regimes report shows."""
    regimes = {}
    for name, m in results.items():
        models = m["models"]
        regimes[name] = {
            "title": TITLES.get(name, name),
            "labelled": m["dataset"]["labelled"],
            "unlabelled": m["dataset"]["unlabelled"],
            "accuracy": {k: v["test_accuracy"] for k, v in models.items()},
            "parameters": {k: v["parameters"] for k, v in models.items()},
            "gain_points": m.get("distillation_gain_points"),
            "accuracy_recovered": m.get("accuracy_recovered"),
            "agreement": m.get("agreement", {}),
            "seconds": (m.get("timing") or {}).get("stages", {}),
            "run_seconds": (m.get("timing") or {}).get("wall_seconds"),
            "train_seconds": {k: v.get("train_seconds") for k, v in models.items()},
            "reused": {k: v.get("reused") for k, v in models.items()},
        }
    any_run = next(iter(results.values()))
    return {
        "name": any_run.get("name"),
        "dataset": {k: any_run["dataset"][k] for k in ("name", "train", "test", "num_classes")},
        "teacher": _model_label(any_run, "teacher"),
        "student": _model_label(any_run, "student"),
        "distil": {k: any_run["config"]["stages"]["distil"][k] for k in ("alpha", "temperature", "epochs")},
        "regimes": regimes,
        "wall_seconds": wall_seconds,
        "machine": machine_description(),
        "date": time.strftime("%Y-%m-%d"),
    }


def _model_label(metrics: dict, role: str) -> str:
    spec = metrics["config"][role]
    name = spec.get("name") or spec.get("_component_") or "?"
    extra = {k: v for k, v in spec.items() if k not in ("name", "_component_", "checkpoint")}
    return name + (f"({', '.join(f'{k}={v}' for k, v in extra.items())})" if extra else "")
