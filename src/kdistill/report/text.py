"""The report of a language-model run (``metrics["task"] == "text"``): ``report.md`` and ``report.html``.

A language-model run (:mod:`kdistill.text_experiment`) is measured on held-out text, not
on a labelled test set: next-token loss and perplexity (``exp(loss)``), next-token top-1
accuracy and agreement with the teacher, greedy generation speed and generated samples.
This module says what its report says, once for both formats, and lays it out the way
the image report does (:mod:`~kdistill.report.content`, :mod:`~kdistill.report.markdown`,
:mod:`~kdistill.report.html`), with their helpers: the same page frame, table, headline
cards and figures. :func:`kdistill.report.html.write_report` hands a text run's metrics
to :func:`write_text_report`.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any, Mapping

from ..atomic import atomic_write_text
from . import content
from .content import MISSING, _num, component_name, distil_settings, stage_label
from .figures import _epochs, _floats, plot_stage_curves, pyplot, save_png
from .markdown import _link, _md

#: captions of the figures of a language-model run's report
CAPTIONS = {
    "loss": "Held-out next-token loss per epoch of each model (perplexity = exp(loss); dashed: the "
            "teacher's final held-out loss).",
    "curves": "Training per stage: loss terms (top) and next-token top-1 accuracy (bottom) per epoch; "
              "solid = training batches, dashed = held-out text.",
}

#: how the report describes a causal LM's configuration keys (``{}``: the value, ``{s}``: a plural's s)
ARCHITECTURE_LABELS = {
    "hidden_size": "hidden size {}",
    "num_hidden_layers": "{} layer{s}",
    "num_attention_heads": "{} attention head{s}",
    "num_key_value_heads": "{} key/value head{s}",
    "intermediate_size": "MLP size {}",
    "max_position_embeddings": "{} positions",
}

_SPEC_KEYS = ("name", "_component_", "component", "checkpoint", "architecture", "path")


def caption(key: str) -> str:
    """The caption of the figure ``key`` of a text run (:data:`CAPTIONS`, else the key itself)."""
    return CAPTIONS.get(key, key)


def text_headline_numbers(models: Mapping[str, Mapping[str, Any]]) -> tuple[float | None, float | None]:
    """``(perplexity gain, loss gap recovered)`` from the models' held-out measurements.

    Perplexity gain = scratch perplexity - distilled perplexity (positive: distillation
    helped). Loss gap recovered = (L_scratch - L_distilled) / (L_scratch - L_teacher) on the
    held-out next-token loss; undefined (``None``) when the teacher's loss is not lower
    than the scratch student's (there is no gap to recover). Both are ``None`` without a
    scratch student.

    Args:
        models: ``{stage: {"held_out_loss", "perplexity", ...}}`` with ``teacher`` and
            ``distil`` (and ``scratch`` when the run trained one), as in ``metrics.json``.
    """
    if "scratch" not in models or "distil" not in models:
        return None, None
    ls, ld, lt = (models[k]["held_out_loss"] for k in ("scratch", "distil", "teacher"))
    gain = models["scratch"]["perplexity"] - models["distil"]["perplexity"]
    return gain, ((ls - ld) / (ls - lt) if ls > lt else None)


# ---------------------------------------------------------------------------------------
# what the report says


def _ppl(value: Any) -> str:
    return _num(value, ",.2f")


def _percent(value: Any) -> str:
    text = _num(None if value is None else 100 * value, ".2f")
    return text if text == MISSING else f"{text}%"


def model_description(spec: Mapping[str, Any]) -> str:
    """``"llama, hidden size 32, 2 layers, ..."``: a model spec's settings in words.

    Args:
        spec: the ``teacher`` or ``student`` of a run's config (``name``/``_component_``,
            ``architecture`` and the configuration's keyword arguments, ``path`` or
            ``checkpoint``).
    """
    parts = [str(spec["architecture"])] if spec.get("architecture") else []
    parts += [label.format(spec[key], s="" if spec[key] == 1 else "s")
              for key, label in ARCHITECTURE_LABELS.items() if spec.get(key) is not None]
    parts += [f"{key} {value}" for key, value in spec.items()
              if key not in _SPEC_KEYS and key not in ARCHITECTURE_LABELS and value is not None]
    if spec.get("path"):
        parts.append(f"loaded from {spec['path']}")
    if spec.get("checkpoint"):
        parts.append(f"weights from {spec['checkpoint']}")
    return ", ".join(parts)


def setup(metrics: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The sentences on the corpus, the models and the distillation settings.

    Returns:
        ``(kind, text)`` pieces in reading order, ``kind`` ``"text"`` or ``"code"`` (a
        name: corpus, model), as :func:`kdistill.report.content.experiment` returns them.
    """
    config, ds = metrics["config"], metrics["dataset"]
    train = (f"{_num(ds.get('train_tokens'), ',.0f')} training tokens in "
             f"{_num(ds.get('train_sequences'), ',.0f')} sequences")
    if ds.get("labelled") is not None and ds["labelled"] != ds.get("train_sequences"):
        train += f" (the students train on the first {ds['labelled']:,})"
    sizes = [train,
             f"{_num(ds.get('held_out_tokens'), ',.0f')} held-out tokens in "
             f"{_num(ds.get('held_out_sequences'), ',.0f')} sequences",
             f"blocks of {ds.get('block_size', MISSING)} tokens",
             f"a vocabulary of {_num(ds.get('vocab_size'), ',.0f')} tokens"]
    out = [("text", "Corpus "), ("code", str(ds["name"]))]
    if ds.get("source"):
        out.append(("text", f": {ds['source']}"))
    out.append(("text", f". {sizes[0][0].upper()}{', '.join(sizes)[1:]}. "))
    for i, role in enumerate(("teacher", "student")):
        spec = config[role]
        described = model_description(spec)
        out += [("text", "Teacher " if i == 0 else "; student "), ("code", component_name(spec))]
        if described:
            out.append(("text", f" ({described})"))
    settings = distil_settings(config)
    losses = " + ".join(name if weight == 1 else f"{_num(weight, 'g')} x {name}"
                        for name, weight in settings["losses"])
    distil = config["stages"]["distil"]
    extra = ""
    if distil.get("temperature_squared") is False:
        extra += ", no T² scaling"
    if distil.get("label_loss_weight") is not None:
        extra += f", label loss weight {_num(distil['label_loss_weight'], 'g')}"
    out.append(("text", f". Distillation: loss {losses}, alpha {_num(settings['alpha'], 'g')}, "
                        f"temperature {_num(settings['temperature'], 'g')}{extra}."))
    return out


def headlines(metrics: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    """The headline numbers: the three perplexities, the perplexity gain, the loss gap recovered.

    Returns:
        ``(value, label, tone)`` each; tone ``"good"``, ``"bad"`` or ``""``.
    """
    models = metrics["models"]
    out = [(_ppl(models["distil"].get("perplexity")), "held-out perplexity of the distilled student (lower is better)",
            "")]
    if "scratch" in models:
        out.append((_ppl(models["scratch"].get("perplexity")), "held-out perplexity of the same student from scratch",
                    ""))
    out.append((_ppl(models["teacher"].get("perplexity")), "held-out perplexity of the teacher", ""))
    no_scratch = "no scratch student in this run"
    gain = metrics.get("perplexity_gain")
    if gain is not None:
        out.append((_num(gain, "+,.2f"), "perplexity gain of distillation (scratch minus distilled)",
                    "good" if gain > 0 else "bad" if gain < 0 else ""))
    else:
        out.append((MISSING, f"perplexity gain: {no_scratch}", ""))
    recovered = metrics.get("loss_gap_recovered")
    if recovered is not None:
        out.append((f"{100 * recovered:.1f}%", "of the teacher-scratch gap in held-out loss recovered",
                    "good" if recovered > 0 else "bad" if recovered < 0 else ""))
    else:
        why = (no_scratch if "scratch" not in models
               else "the teacher's held-out loss is no lower than the scratch student's")
        out.append((MISSING, f"loss gap recovered: {why}", ""))
    return out


def verdict(metrics: Mapping[str, Any]) -> str | None:
    """The plain statement that distillation did not help (its perplexity gain is not
    positive), with what to try.

    Returns:
        The sentences; ``None`` when distillation helped or there is no scratch student.
    """
    gain = metrics.get("perplexity_gain")
    if gain is None or gain > 0:
        return None
    models = metrics["models"]
    d, sc, t = (models[k]["perplexity"] for k in ("distil", "scratch", "teacher"))
    said = (f"Distillation did not help in this run: the distilled student's held-out perplexity ({_ppl(d)}) is "
            f"{'no lower than' if gain == 0 else 'higher than'} that of the same student trained from scratch "
            f"({_ppl(sc)}), a gain of {_num(gain, '+,.2f')}. ")
    if not t < 0.95 * sc:
        standing = "no better than" if t >= sc else "only slightly better than"
        return said + (f"The teacher ({_ppl(t)}) is {standing} the scratch student, so it has little to teach: "
                       "train it longer (stages.teacher.epochs) or make it larger.")
    return said + ("The student did not learn from the teacher's distribution in this budget: try more epochs "
                   "(stages.distil.epochs), another alpha (stages.distil.alpha) or temperature "
                   "(stages.distil.temperature).")


def model_row(m: Mapping[str, Any]) -> dict[str, str]:
    """The table cells of one model; a measurement it lacks reads ``"n/a"``.

    Returns:
        ``{"loss", "perplexity", "accuracy", "agreement", "parameters", "size",
        "generation", "train"}`` (parameters, size and training time as
        :func:`kdistill.report.content.model_row` writes them).
    """
    shared = content.model_row(m, None)
    return {
        "loss": _num(m.get("held_out_loss"), ".4f"),
        "perplexity": _ppl(m.get("perplexity")),
        "accuracy": _percent(m.get("token_accuracy")),
        "agreement": _percent(m.get("agreement_with_teacher")),
        "parameters": shared["parameters"],
        "size": shared["size"],
        "generation": _num(m.get("generate_tokens_per_second"), ",.0f"),
        "train": shared["train"],
    }


def table_rows(metrics: Mapping[str, Any]) -> list[dict[str, str]]:
    """One row per stage of the run, in the run's order (the teacher's agreement: ``"-"``).

    Returns:
        :func:`model_row`'s cells plus ``"stage"`` (the key) and ``"model"`` (its label).
    """
    rows = []
    for stage in metrics["stages"]:
        row = {"stage": stage, "model": stage_label(stage), **model_row(metrics["models"][stage])}
        if stage == "teacher":
            row["agreement"] = "-"
        rows.append(row)
    return rows


def samples(metrics: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The generated samples, one entry per prompt with every model's completion of it.

    Returns:
        ``[{"prompt": str, "completions": [(model label, completion), ...]}, ...]`` in the
        order of the prompts, models in the run's order.
    """
    groups: dict[str, list[tuple[str, str]]] = {}
    by_stage = metrics.get("samples") or {}
    for stage in [*metrics["stages"], *(s for s in by_stage if s not in metrics["stages"])]:
        for sample in by_stage.get(stage) or []:
            groups.setdefault(str(sample.get("prompt", "")), []).append(
                (stage_label(stage), str(sample.get("completion", ""))))
    return [{"prompt": prompt, "completions": completions} for prompt, completions in groups.items()]


def generation_note(metrics: Mapping[str, Any]) -> str:
    """How generation speed and the samples were measured."""
    report = metrics["config"].get("report") or {}
    new, repeats = report.get("new_tokens"), report.get("repeats")
    how = f" of {new} new tokens" if new is not None else ""
    timed = f" (median of {min(repeats, 5)} timed runs{how})" if repeats is not None else how
    return (f"Generation speed: greedy decoding with the key/value cache, batch 1, on the CPU{timed}. "
            "Samples: greedy completions of prompts taken from the starts of held-out sequences.")


def timing(metrics: Mapping[str, Any]) -> str | None:
    """``"Wall time 16.6 s: teacher 3.8 s, scratch 1.0 s, ..."``; ``None`` if not recorded."""
    record = metrics.get("timing") or {}
    if record.get("wall_seconds") is None:
        return None
    stages = ", ".join(f"{stage_label(k)} {_num(v, '.1f')} s" for k, v in (record.get("stages") or {}).items())
    return f"Wall time {_num(record['wall_seconds'], '.1f')} s" + (f": {stages}" if stages else "") + "."


def machine(metrics: Mapping[str, Any]) -> str:
    """The machine the run was measured on."""
    return content.measured_on(metrics["machine"]) + "."


# ---------------------------------------------------------------------------------------
# the figure of held-out loss


def plot_held_out_loss(
    histories: Mapping[str, Mapping[str, Any]],
    path: str | os.PathLike,
    *,
    title: str = "Held-out loss per epoch",
    references: Mapping[str, float] | None = None,
) -> Path:
    """Held-out next-token loss per epoch of every stage, one line each, written as PNG.

    Args:
        histories: ``{stage: {"epoch": [0, 1, ...], "history": {"val_loss": [...], ...}}}``;
            a stage without ``val_loss`` is left out.
        path: the ``.png`` file to write.
        title: the figure's title.
        references: ``{label: loss}`` drawn as dashed horizontal lines (the teacher's final loss).

    Returns:
        The path written.
    """
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    epochs_seen: set[int] = set()
    for i, (stage, record) in enumerate(histories.items()):
        values = _floats(((record or {}).get("history") or {}).get("val_loss") or [])
        if not values:
            continue
        epochs = _epochs(record, len(values))
        epochs_seen.update(epochs)
        ax.plot(epochs, values, marker="o", markersize=4 if len(values) > 1 else 6, color=f"C{i % 10}",
                label=stage_label(stage))
    for label, value in (references or {}).items():
        if value is not None and math.isfinite(value):
            ax.axhline(value, linestyle="--", linewidth=1, color="gray", label=label)
    if len(epochs_seen) <= 12:
        ax.set_xticks(sorted(epochs_seen))
    if len(epochs_seen) == 1:
        (e,) = epochs_seen
        ax.set_xlim(e - 0.5, e + 0.5)
    ax.set_xlabel("epoch")
    ax.set_ylabel("held-out loss (nats per token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return save_png(fig, path)


# ---------------------------------------------------------------------------------------
# the two formats


def _fence(text: str) -> str:
    """``text`` in a fenced code block whose fence no backtick run in it can close."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}text\n{text}\n{fence}"


def text_model_table(metrics: Mapping[str, Any]) -> str:
    """The per-model table of a language-model run, in Markdown (the report's and the
    one ``kdistill run`` prints at the end)."""
    lines = ["| model | held-out loss | perplexity | next-token top-1 | top-1 agreement with teacher "
             "| parameters | size on disk | generation b=1 (tokens/s, CPU) | training time |",
             "|" + "---|" * 9]
    lines += [f"| {r['model']} | {r['loss']} | {r['perplexity']} | {r['accuracy']} | {r['agreement']} "
              f"| {r['parameters']} | {r['size']} | {r['generation']} | {_md(r['train'])} |"
              for r in table_rows(metrics)]
    return "\n".join(lines)


def render_text_markdown(
    metrics: Mapping[str, Any],
    figures: Mapping[str, str | os.PathLike],
    *,
    base: str | os.PathLike | None = None,
) -> str:
    """A language-model run's report as Markdown: the content of its HTML page, figures as links.

    Args:
        metrics: the run's ``metrics.json`` (``"task": "text"``).
        figures: ``{figure key: image file}``.
        base: the folder the Markdown file is written to (links are relative to it).

    Returns:
        The page; text from ``metrics`` cannot inject HTML (prose is escaped, prompts and
        completions are in fenced code blocks).
    """
    def code(t: str) -> str:
        return f"`{t.replace('`', '')}`"

    setup_text = "".join(code(t) if kind == "code" else _md(t) for kind, t in setup(metrics))
    lines = [f"# {_md(content.title(metrics))}", "", setup_text, ""]
    lines += [f"- **{_md(value)}** {_md(label)}" for value, label, _ in headlines(metrics)]
    note = verdict(metrics)
    if note:
        lines += ["", f"**No gain here:** {_md(note)}"]
    lines += [f"\n**Warning:** {_md(w)}." for w in metrics.get("warnings") or []]
    lines += ["", text_model_table(metrics)]
    for key, path in figures.items():
        text = _md(caption(key)).replace("[", "(").replace("]", ")")
        lines += ["", f"![{text}]({_link(Path(path), Path(base) if base else None)})", "", f"*{text}*"]
    groups = samples(metrics)
    if groups:
        lines += ["", "## Generated samples"]
        for i, group in enumerate(groups, 1):
            lines += ["", f"Prompt {i}:", "", _fence(group["prompt"])]
            for label, completion in group["completions"]:
                lines += ["", f"*{_md(label)}*:", "", _fence(completion)]
    lines += ["", _md(machine(metrics)), "", _md(generation_note(metrics))]
    when = timing(metrics)
    if when:
        lines += ["", _md(when)]
    return "\n".join(lines) + "\n"


def render_text_html(metrics: Mapping[str, Any], figures: Mapping[str, str | os.PathLike]) -> str:
    """A self-contained HTML page of a language-model run (same frame as an image run's).

    Args:
        metrics: the run's ``metrics.json`` (``"task": "text"``).
        figures: ``{figure key: image file}``; keys ``loss`` and ``curves`` get their
            captions from :data:`CAPTIONS`, others are their own.

    Returns:
        The page, every piece of text from ``metrics`` escaped (completions too).

    Raises:
        FileNotFoundError: if a figure's file does not exist.
    """
    from .html import data_uri, render_template

    embedded = []
    for key, path in figures.items():
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"figure {key!r} not found at {path}; draw it first (write_report does)")
        embedded.append({"key": key, "src": data_uri(path), "caption": caption(key)})
    return render_template(
        "text_run.html",
        title=content.title(metrics),
        setup=setup(metrics),
        headlines=headlines(metrics),
        verdict=verdict(metrics),
        warnings=metrics.get("warnings") or [],
        rows=table_rows(metrics),
        figures=embedded,
        samples=samples(metrics),
        machine=machine(metrics),
        generation=generation_note(metrics),
        timing=timing(metrics),
        version=metrics["kdistill_version"],
    )


def write_text_report(run_dir: str | os.PathLike, metrics: Mapping[str, Any]) -> dict[str, Path]:
    """Draw a language-model run's figures and write its ``report.md`` and ``report.html``.

    Steps: 1. figures into ``run_dir/figures/`` from the stages' training histories
    (``loss.png``: held-out loss per epoch; ``curves.png``: loss terms and token accuracy
    per stage); a teacher used as loaded has no history; 2. the two reports, written atomically.

    Args:
        run_dir: the run directory.
        metrics: its ``metrics.json`` content (``"task": "text"``).

    Returns:
        ``{"loss", "curves" (those drawn), "markdown", "html": path}``.
    """
    run_dir = Path(run_dir)
    fig_dir = run_dir / "figures"
    figures: dict[str, Path] = {}

    # 1. figures
    histories = metrics.get("histories") or {}
    ordered = {s: histories[s] for s in metrics["stages"] if s in histories}
    if any((r.get("history") or {}).get("val_loss") for r in ordered.values()):
        teacher_loss = metrics["models"]["teacher"].get("held_out_loss")
        figures["loss"] = plot_held_out_loss(
            ordered, fig_dir / "loss.png", title=f"Held-out loss per epoch ({metrics['dataset']['name']})",
            references={"teacher (final)": teacher_loss} if teacher_loss is not None else None)
    if ordered:
        figures["curves"] = plot_stage_curves(ordered, fig_dir / "curves.png")

    # 2. the reports
    markdown = atomic_write_text(run_dir / "report.md", render_text_markdown(metrics, figures, base=run_dir))
    page = atomic_write_text(run_dir / "report.html", render_text_html(metrics, figures))
    return {**figures, "markdown": markdown, "html": page}

