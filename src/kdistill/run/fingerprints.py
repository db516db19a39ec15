"""What makes two stages, or two runs, the same: short hashes of their settings and data.

A stage's fingerprint decides whether a finished stage (in this run directory or the stage
store) is reused; the run's decides whether a run directory holds this experiment.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np

from ..config import ExperimentConfig, config_dict
from ..data.datasets import DatasetSplits


def fingerprint(*parts: Any) -> str:
    """A short hash of JSON-serialisable parts (keys sorted)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def data_fingerprint(data: DatasetSplits) -> str:
    """Hash of the arrays themselves: two runs share a stage only on the same data."""
    h = hashlib.sha256(data.name.encode())
    for arr in (data.x_train, data.y_train, data.x_test, data.y_test):
        a = np.ascontiguousarray(arr)
        h.update(str((a.shape, a.dtype.str)).encode())
        h.update(a.data)
    return h.hexdigest()[:16]


def config_fingerprint(config: ExperimentConfig) -> str:
    """What makes two runs the same experiment (not where they run or how often they save)."""
    d = config_dict(config)
    for key in ("output_dir", "device", "threads", "teacher_store", "checkpoint", "name"):
        d.pop(key, None)
    d["stages"] = {name: None if stage is None else stage_settings(getattr(config.stages, name))
                   for name, stage in d["stages"].items()
                   if not (name in LATER_STAGES and stage is None)}
    # settings added later, left out at their defaults: an older run directory keeps its fingerprint
    if d["data"].get("text") is None:
        d["data"].pop("text", None)
    if d.get("ensemble") is None:  # a single-teacher run
        d.pop("ensemble", None)
    for key, default in REPORT_DEFAULTS.items():
        if d["report"].get(key) == default:
            d["report"].pop(key)
    return fingerprint(d)


#: Stages added later, left out of a run's fingerprint when the config has none: an older
#: run directory keeps its fingerprint.
LATER_STAGES = ("born_again", "mutual")
#: Report settings of language-model runs, left out of an image run's fingerprint at these defaults.
REPORT_DEFAULTS = {"samples": 3, "prompt_tokens": 24, "new_tokens": 48}


#: Training-step settings of a stage and their defaults (see :func:`stage_settings`).
STEP_DEFAULTS = {"precision": "fp32", "accumulate_steps": 1, "max_grad_norm": None}
#: Stage settings that fingerprints leave out while at these defaults (the step settings,
#: and the weight average of :class:`kdistill.callbacks.EMA`).
OPTIONAL_DEFAULTS = {**STEP_DEFAULTS, "ema_decay": None, "vocab_size": None, "on_policy": None}
#: ``teacher_cache`` settings added later, left out while at these defaults (an image run's
#: cache has none of them): a cached stage of an older run keeps its fingerprint.
CACHE_OPTIONAL_DEFAULTS = {"tail": None, "value_bits": None, "curve": None, "exact_k": None}
#: Stage settings that change where the work runs, not what it computes: never in a
#: fingerprint (a sharded teacher gives the outputs of the whole one).
EXECUTION_ONLY = ("shard_teacher",)


def stage_settings(stage) -> dict[str, Any]:
    """A stage's settings as fingerprints hold them: :func:`config_dict`, less the
    training-step settings (``precision``, ``accumulate_steps``, ``max_grad_norm``) and
    ``ema_decay`` left at their defaults, so a stage trained without them keeps its fingerprint (and a
    stored teacher stays reusable); setting one makes it another stage. The ``teacher_cache``
    settings are kept (``tail``, ``value_bits``, ``curve`` and ``exact_k`` only when set),
    ``shard_teacher`` never is."""
    d = config_dict(stage)
    for key, default in OPTIONAL_DEFAULTS.items():
        if d.get(key, default) == default:
            d.pop(key, None)
    for key in EXECUTION_ONLY:
        d.pop(key, None)
    cache = d.get("teacher_cache")
    if isinstance(cache, dict):  # its settings are the stage's: a cached and a live stage differ
        for key, default in CACHE_OPTIONAL_DEFAULTS.items():
            if cache.get(key, default) == default:
                cache.pop(key, None)
    return d


def step_settings(stage) -> dict[str, Any]:
    """``compile``'s training-step keywords from a stage's settings."""
    return {key: getattr(stage, key) for key in STEP_DEFAULTS}
