"""What a run's report says, worked out once for both formats (Markdown and HTML).

Every function here reads a ``metrics.json`` as the runner writes it
(:func:`kdistill.experiment.run_experiment`) and returns plain text: the headline
numbers, the rows of the comparison table, the experiment's settings, the advice when
distillation did not help, the machine. :mod:`kdistill.report.markdown` and
:mod:`kdistill.report.html` lay the same text out, each in its own format.
"""

from __future__ import annotations

from typing import Any, Mapping

#: captions of the figures a run's report draws (other keys are their own caption)
CAPTIONS = {
    "accuracy": "Test accuracy per epoch of each model (dashed: the teacher's final accuracy).",
    "curves": "Training per stage: loss terms (top) and accuracy (bottom) per epoch; "
              "solid = training batches, dashed = test set.",
    "confusion": "Confusion matrix of the distilled student on the test set: rows are the true "
                 "class, columns the prediction; colours are normalised per row, cells show counts.",
}

#: display label of a stage key (the runner calls the distilled student ``distil``)
STAGE_LABELS = {"distil": "distilled"}

#: the cell of a value a model has no measurement of
MISSING = "n/a"


def stage_label(stage: str) -> str:
    """``"distil" -> "distilled"``, ``"born_again_2" -> "born-again gen 2"``,
    ``"mutual_1" -> "mutual peer 1"``; other stage keys are their own label."""
    for prefix, label in (("born_again_", "born-again gen "), ("mutual_", "mutual peer ")):
        if stage.startswith(prefix) and stage[len(prefix):].isdigit():
            return label + stage[len(prefix):]
    return STAGE_LABELS.get(stage, stage)


def model_label(stage: str, metrics: Mapping[str, Any]) -> str:
    """A row's label: an ensemble run's members ``"teacher-<tag>" -> "teacher <tag>"`` and
    its combination ``"teacher" -> "ensemble (teacher)"``; else :func:`stage_label`."""
    if metrics.get("ensemble"):
        if stage == "teacher":
            return "ensemble (teacher)"
        if stage.startswith("teacher-") and stage[len("teacher-"):] in metrics["ensemble"]["members"]:
            return "teacher " + stage[len("teacher-"):]
    return stage_label(stage)


def caption(key: str) -> str:
    """The caption of the figure ``key`` (:data:`CAPTIONS`, else the key itself)."""
    return CAPTIONS.get(key, key)


def human_bytes(n: float) -> str:
    """``1536 -> '1.5 KiB'``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"  # pragma: no cover


def _num(value: Any, fmt: str) -> str:
    try:
        return format(float(value), fmt)
    except (TypeError, ValueError):
        return MISSING


def _ratio(numerator: Any, denominator: Any) -> str:
    try:
        return f"{numerator / denominator:.1f}x"
    except (TypeError, ZeroDivisionError):
        return MISSING


# ---------------------------------------------------------------------------------------
# the experiment's settings


def component_name(spec: Mapping[str, Any]) -> str:
    """The name of a model or loss in a run's config: its ``name`` or its ``_component_`` path."""
    return spec.get("name") or spec["_component_"]


def distil_settings(config: Mapping[str, Any]) -> dict[str, Any]:
    """The distillation stage's settings in a run's config.

    Args:
        config: ``metrics["config"]``.

    Returns:
        ``{"alpha", "temperature", "losses": [(name, weight), ...]}``.
    """
    distil = config["stages"]["distil"]
    return {
        "alpha": distil["alpha"],
        "temperature": distil["temperature"],
        "losses": [(component_name(item), item["weight"]) for item in distil["losses"]],
    }


def loss_names(config: Mapping[str, Any]) -> str:
    """``"kd"``, ``"kd+fitnet"``: the distillation losses of a run's config."""
    return "+".join(name for name, _ in distil_settings(config)["losses"])


def title(metrics: Mapping[str, Any]) -> str:
    """The report's title: ``"Knowledge distillation: <run name>"``."""
    return f"Knowledge distillation: {metrics['name']}"


def experiment(metrics: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The sentences on the data, the models and the distillation settings.

    Returns:
        ``(kind, text)`` pieces in reading order, ``kind`` ``"text"`` or ``"code"`` (a
        name: dataset, model).
    """
    config, ds = metrics["config"], metrics["dataset"]
    sizes = [f"{ds['train']:,} training samples"]
    if ds["labelled"] != ds["train"]:
        sizes.append(f"{ds['labelled']:,} labelled")
    if ds["unlabelled"]:
        sizes.append(f"{ds['unlabelled']:,} unlabelled (soft targets only)")
    sizes += [f"{ds['test']:,} test", f"{ds['num_classes']} classes",
              "input " + "x".join(str(d) for d in ds["input_shape"])]
    settings = distil_settings(config)
    losses = " + ".join(name if weight == 1 else f"{_num(weight, 'g')} x {name}"
                        for name, weight in settings["losses"])
    ens = metrics.get("ensemble")
    if ens:  # the members, each with its model
        teacher: list[tuple[str, str]] = [("text", f"Teachers (an ensemble, {ens['combine']} at "
                                                   f"T={_num(ens['temperature'], 'g')}): ")]
        for i, (tag, member) in enumerate(ens["members"].items()):
            teacher += [("text", ", " if i else ""), ("text", f"{tag} "), ("code", component_name(member["model"])),
                        ("text", f" (seed {member['seed']}, {member['epochs']} epochs)")]
    else:
        teacher = [("text", "Teacher "), ("code", component_name(config["teacher"]))]
    return [
        ("text", "Dataset "), ("code", str(ds["name"])), ("text", f" ({', '.join(sizes)}). "),
        *teacher,
        ("text", "; student "), ("code", component_name(config["student"])), ("text", ". "),
        ("text", f"Distillation: loss {losses}, alpha {_num(settings['alpha'], 'g')}, "
                 f"temperature {_num(settings['temperature'], 'g')}."),
    ]


# ---------------------------------------------------------------------------------------
# the numbers


def batches(models: Mapping[str, Mapping[str, Any]]) -> tuple[str, str]:
    """The batch sizes latency and throughput were measured at: ``("1", "256")``."""
    row = next(iter(models.values()), {})
    return str(row.get("latency_batch", "?")), str(row.get("throughput_batch", "?"))


def model_row(m: Mapping[str, Any], reference: Mapping[str, Any] | None) -> dict[str, str]:
    """The comparison-table cells of one model; a measurement it lacks reads ``"n/a"``.

    Args:
        m: the model's measurements (``metrics["models"][stage]``).
        reference: the model speed-ups are measured against (``None``: speed-up ``"-"``).

    Returns:
        ``{"accuracy", "parameters", "size", "latency", "throughput", "speedup", "train"}``.
    """
    if reference is None:
        speedup = "-"
    else:
        speedup = (f"{_ratio(reference.get('latency_ms'), m.get('latency_ms'))} / "
                   f"{_ratio(m.get('throughput'), reference.get('throughput'))}")
    accuracy = _num(None if m.get("test_accuracy") is None else 100 * m["test_accuracy"], ".2f")
    train = _num(m.get("train_seconds"), ".0f")
    if train != MISSING:
        train += " s"
    if m.get("reused"):
        train += " (reused)"
    return {
        "accuracy": accuracy if accuracy == MISSING else f"{accuracy}%",
        "parameters": _num(m.get("parameters"), ",.0f"),
        "size": MISSING if m.get("size_bytes") is None else human_bytes(m["size_bytes"]),
        "latency": f"{_num(m.get('latency_ms'), '.3f')} / {_num(m.get('latency_p90_ms'), '.3f')}",
        "throughput": _num(m.get("throughput"), ",.0f"),
        "speedup": speedup,
        "train": train,
    }


def table_rows(metrics: Mapping[str, Any]) -> list[dict[str, str]]:
    """One row per stage of the run, in the run's order, speed-ups against the teacher.

    Returns:
        :func:`model_row`'s cells plus ``"stage"`` (the key) and ``"model"`` (its label).
    """
    models = metrics["models"]
    return [{"stage": stage, "model": model_label(stage, metrics), **model_row(models[stage], models["teacher"])}
            for stage in metrics["stages"]]


def headlines(metrics: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    """The headline numbers: gain, accuracy recovered, agreement with the teacher.

    Returns:
        ``(value, label, tone)`` each; tone ``"good"``, ``"bad"`` or ``""``.
    """
    models = metrics["models"]
    no_scratch = "no scratch student in this run"
    out = []
    gain = metrics["distillation_gain_points"]
    if gain is not None:
        out.append((f"{gain:+.2f} points", "distilled vs the same student from scratch (test accuracy)",
                    "good" if gain > 0 else "bad" if gain < 0 else ""))
    else:
        out.append((MISSING, f"distillation gain: {no_scratch}", ""))
    recovered = metrics["accuracy_recovered"]
    if recovered is not None:
        out.append((f"{100 * recovered:.1f}%", "of the teacher-scratch accuracy gap recovered",
                    "good" if recovered > 0 else "bad" if recovered < 0 else ""))
    else:
        why = no_scratch if "scratch" not in models else "the teacher is no more accurate than the scratch student"
        out.append((MISSING, f"accuracy recovered: {why}", ""))
    for stage in ("scratch", "distil"):
        if metrics["agreement"].get(stage) is not None:
            out.append((f"{100 * metrics['agreement'][stage]:.1f}%",
                        f"top-1 agreement of the {stage_label(stage)} student with the teacher", ""))
    for tag, agreement in ((metrics.get("ensemble") or {}).get("agreement") or {}).items():
        for stage in ("scratch", "distil"):  # an ensemble run: with each member too
            if agreement.get(stage) is not None:
                out.append((f"{100 * agreement[stage]:.1f}%",
                            f"top-1 agreement of the {stage_label(stage)} student with teacher {tag}", ""))
    out += extra_stage_headlines(metrics)
    return out


def extra_stage_headlines(metrics: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    """Born-again generations against the teacher (generation 0), and mutual-learning peers
    of the student's architecture against the scratch student (the same network alone), in
    test-accuracy points."""
    models, stages = metrics["models"], metrics["stages"]
    config = metrics.get("config") or {}
    out = []
    teacher = models.get("teacher", {}).get("test_accuracy")
    for stage in stages:
        if stage.startswith("born_again_") and teacher is not None:
            gain = 100 * (models[stage]["test_accuracy"] - teacher)
            out.append((f"{gain:+.2f} points", f"{stage_label(stage)} vs the teacher (generation 0)",
                        "good" if gain > 0 else "bad" if gain < 0 else ""))
    peers = ((config.get("stages") or {}).get("mutual") or {}).get("peers")
    alone = models.get("scratch", {}).get("test_accuracy")
    for stage in stages:
        if not stage.startswith("mutual_") or alone is None:
            continue
        k = int(stage.rpartition("_")[2])
        if isinstance(peers, list) and peers[k - 1] != config.get("student"):
            continue  # another architecture than the scratch student's: no baseline in this run
        gain = 100 * (models[stage]["test_accuracy"] - alone)
        out.append((f"{gain:+.2f} points", f"{stage_label(stage)} vs the same student trained alone (scratch)",
                    "good" if gain > 0 else "bad" if gain < 0 else ""))
    return out


def advice(metrics: Mapping[str, Any]) -> str | None:
    """Why distillation did not help in this run, and what to try.

    Returns:
        The advice; ``None`` when distillation helped or there is no scratch student to
        compare with.
    """
    gain = metrics["distillation_gain_points"]
    if gain is None or gain > 0:
        return None
    models = metrics["models"]
    t, sc = 100 * models["teacher"]["test_accuracy"], 100 * models["scratch"]["test_accuracy"]
    if t - sc < 1.0:
        standing = "only slightly more accurate than" if t > sc else "no more accurate than"
        return (f"The teacher ({t:.2f}%) is {standing} the student trained from scratch ({sc:.2f}%), so it "
                "has little to teach: train it longer (stages.teacher.epochs), or give the students fewer "
                "labels (data.subset=N with data.unlabelled=true), where soft targets matter most.")
    return ("The student did not catch up with its softened targets in this budget: try more epochs "
            "(stages.distil.epochs) or a lower temperature (stages.distil.temperature).")


# ---------------------------------------------------------------------------------------
# the machine


def measured_on(machine: Mapping[str, Any]) -> str:
    """``"Measured on x86_64 (2 CPUs), 1 PyTorch thread(s), torch 2.3.0, ..."`` (no final stop).

    Args:
        machine: :func:`kdistill.runtime.machine_description`'s dict.
    """
    parts = [f"Measured on {machine['processor'] or 'an unknown processor'}"]
    if machine["cpu_count"]:
        parts[0] += f" ({machine['cpu_count']} CPUs)"
    for key, label in (("torch_threads", "{} PyTorch thread(s)"), ("torch", "torch {}"), ("python", "Python {}"),
                       ("cuda", "GPU {}"), ("platform", "{}")):
        if machine[key] not in (None, ""):
            parts.append(label.format(machine[key]))
    return ", ".join(parts)


def machine(metrics: Mapping[str, Any]) -> str:
    """The machine the run was measured on, and how latency was measured."""
    return (measured_on(metrics["machine"])
            + ". Latency: median and 90th percentile of repeated forward passes after warm-up.")
