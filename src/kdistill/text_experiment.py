"""The language-model recipe of ``kdistill run``: a config with ``data.text``.

The same run directory, stages, resume, stage store and report as an image run
(:mod:`kdistill.experiment`); what differs is the data (token blocks of a corpus and a
tokenizer), the models (Hugging Face causal LMs) and what is measured:

1. the text: the corpus split by file (or record) into training and held-out text, a
   byte-level BPE tokenizer trained on the training text (or one given), token blocks;
2. the **teacher** trained on every training block (or loaded);
3. the student **from scratch** on the students' blocks (``data.subset``: the first N);
4. the same student **distilled** from the teacher on the same blocks (from a top-k token
   cache of it with ``stages.distil.teacher_cache``; sharded across the torchrun processes
   with ``stages.distil.shard_teacher``);
5. measured on the held-out text: next-token loss and perplexity, top-1 agreement with the
   teacher, parameters, size, greedy generation speed (batch 1) and generated samples.

``RUN_DIR/tokenizer/`` holds the tokenizer the models were trained with (a continued
run loads it instead of training it again).
"""

from __future__ import annotations

import json
import math
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from . import __version__, distributed
from .bench import count_parameters, size_on_disk
from .checkpoint import load_weights
from .config import ExperimentConfig, config_dict
from .distiller import Distiller, Trainer
from .on_policy import OnPolicy
from .errors import ConfigError
from .report.text import text_headline_numbers
from .run.fingerprints import fingerprint, stage_settings, step_settings
from .run.measure import StageClock, finish_run
from .run.store import StageContext, run_stage
from .runtime import machine_description, seed_everything

#: What the built-in corpus is, for the report.
CORPUS_NOTES = {
    "python_source": "the Python standard library's own .py sources on this machine (PSF License Version 2)",
}


@dataclass
class TextData:
    """A language-model run's data: training and held-out token blocks and the tokenizer."""

    name: str
    source: str
    train: Any  # kdistill.data.text.TokenDataset
    held_out: Any
    tokenizer: Any
    fingerprint: str

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)


def _texts(cfg) -> tuple[str, str, list[str], list[str]]:
    """``(name, source, train texts, held-out texts)`` of ``data.text`` (corpus or files)."""
    from .data.text import _read_utf8, python_source_corpus, split_corpus

    if cfg.corpus == "python_source":
        corpus = python_source_corpus(max_bytes=cfg.max_bytes)
        name, source = "python_source", CORPUS_NOTES["python_source"]
    else:
        paths = [Path(p).expanduser() for p in cfg.files]
        corpus, size = [], 0
        for p in paths:
            text = _read_utf8(p)
            if cfg.max_bytes is not None and size + len(text) > cfg.max_bytes:
                break
            size += len(text)
            corpus.append((p.as_posix(), text))
        name, source = "text files", ", ".join(str(p) for p in paths[:3]) + (" ..." if len(paths) > 3 else "")
    train, held = split_corpus(corpus, cfg.held_out)
    if not train or not held:
        raise ConfigError(
            f"data.text: splitting {len(corpus)} file(s) with held_out {cfg.held_out} left "
            f"{len(train)} for training and {len(held)} held out; give more files (or a larger max_bytes)")
    return name, source, [t for _, t in train], [t for _, t in held]


def _tokenizer(cfg, train_texts: list[str], run_dir: Path, main: bool):
    """The run's tokenizer: ``data.text.tokenizer``, or ``RUN_DIR/tokenizer`` of a
    continued run, or a byte-level BPE trained on the training text and saved there."""
    from .data.text import load_tokenizer, train_tokenizer

    if cfg.tokenizer is not None:
        return load_tokenizer(cfg.tokenizer)
    saved = run_dir / "tokenizer"
    if (saved / "tokenizer.json").is_file():
        return load_tokenizer(saved)
    tok = train_tokenizer(train_texts, vocab_size=cfg.vocab_size)
    if main:  # written whole into a temporary folder, then renamed: never half a tokenizer
        tmp = Path(tempfile.mkdtemp(prefix=".tokenizer-", dir=run_dir))
        tok.save_pretrained(str(tmp))
        shutil.rmtree(saved, ignore_errors=True)
        tmp.rename(saved)
    return tok


def load_text_data(config: ExperimentConfig, run_dir: Path) -> TextData:
    """The text of a language-model run, tokenised into blocks (see the module docstring)."""
    import hashlib

    from .data.text import pack_texts, read_jsonl

    cfg = config.data.text
    run_dir.mkdir(parents=True, exist_ok=True)
    main = distributed.is_main()
    if cfg.jsonl is not None:
        tok = load_tokenizer_or_fail(cfg)
        records = read_jsonl(cfg.jsonl, tok, max_length=cfg.block_size)
        train, held = records.split(cfg.held_out, seed=config.seed)
        name, source = Path(cfg.jsonl).name, str(cfg.jsonl)
    else:
        name, source, train_texts, held_texts = _texts(cfg)
        tok = _tokenizer(cfg, train_texts, run_dir, main)
        train = pack_texts(train_texts, tok, cfg.block_size)
        held = pack_texts(held_texts, tok, cfg.block_size)
    h = hashlib.sha256(name.encode())
    for ds in (train, held):
        h.update(ds.tokens.numpy().tobytes())
        h.update(ds.offsets.numpy().tobytes())
        if ds.trained is not None:
            h.update(ds.trained.numpy().tobytes())
    h.update(json.dumps(tok.get_vocab(), sort_keys=True).encode())
    return TextData(name, source, train, held, tok, h.hexdigest()[:16])


def load_tokenizer_or_fail(cfg):
    from .data.text import load_tokenizer

    if cfg.tokenizer is None:
        raise ConfigError("data.text.jsonl needs data.text.tokenizer (the directory of the models' tokenizer): "
                          "prompt/completion records are tokenised with the tokenizer the models were trained with")
    return load_tokenizer(cfg.tokenizer)


def student_blocks(train: Any, subset: int | None, seed: int) -> Any:
    """The training sequences the students see: all, or ``subset`` of them drawn at random
    (seeded by the run's seed), kept in corpus order. Random, not the first ``subset``:
    the corpus is in file order, and its first files are not a sample of the rest."""
    if subset is None or subset >= len(train):
        return train
    picked = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[:subset]
    return train.select(picked.sort().values)


def build_lm(spec, vocab_size: int) -> nn.Module:
    """A causal LM from a model spec: ``name: causal_lm`` (or any builder taking
    ``vocab_size``), or a ``_component_`` returning a model or a ``transformers``
    configuration (built with random weights and the tokenizer's vocabulary)."""
    from .models.causal_lm import causal_lm, model_from_config

    if spec.name is not None:
        if spec.name != "causal_lm":
            raise ConfigError(f"a language-model run builds its models with name: causal_lm (or a _component_), "
                              f"got name: {spec.name}")
        kwargs = dict(spec.kwargs)
        if "path" not in kwargs:
            kwargs.setdefault("vocab_size", vocab_size)
        return causal_lm(**kwargs)
    fn = spec.resolve()
    out = fn(**spec.kwargs)
    if not isinstance(out, nn.Module):
        if hasattr(out, "to_dict") and hasattr(out, "model_type"):  # a transformers PretrainedConfig
            return model_from_config(out, vocab_size=vocab_size)
        raise ConfigError(f"_component_ {spec.component} returned a {type(out).__name__}, not a model or a "
                          "transformers configuration")
    return out


def _check_vocabularies(config: ExperimentConfig, models: dict[str, nn.Module], vocab: int) -> None:
    """Before any training: every model scores the tokenizer's tokens; teacher and student
    heads agree (or ``vocab_size`` says how much of them to compare)."""
    sizes = {k: m.get_output_embeddings().weight.shape[0] for k, m in models.items()
             if hasattr(m, "get_output_embeddings") and m.get_output_embeddings() is not None}
    for k, n in sizes.items():
        if n < vocab:
            raise ConfigError(f"the {k} scores {n} tokens but the tokenizer has {vocab}: build it with "
                              f"vocab_size >= {vocab} (the runner passes the tokenizer's size to name: causal_lm)")
    t, s = sizes.get("teacher"), sizes.get("student")
    if t is not None and s is not None and t != s and config.stages.distil.vocab_size is None:
        raise ConfigError(
            f"the student's vocabulary has {s} entries and the teacher's {t}: if both use this tokenizer "
            f"({vocab} tokens) and a head is padded, set stages.distil.vocab_size: {vocab}; otherwise build both "
            "with the same tokenizer")


# --------------------------------------------------------------------------- the distil stage's teacher
def token_cache_key(config: ExperimentConfig, t_fp: str, data_fp: str) -> str:
    """What names a run's token cache (its folder under ``teacher_caches/``): the teacher
    stage, the data, the students' blocks and what is stored (not the tail mode, which is
    chosen when the cache is opened, nor the build's batch size)."""
    tc = config.stages.distil.teacher_cache
    return fingerprint("token_cache", t_fp, data_fp, config.data.subset, config.seed,
                       {"k": tc.k, "dtype": tc.dtype, **token_cache_extra_settings(tc)})


def token_cache_extra_settings(tc) -> dict[str, Any]:
    """:meth:`TokenCache.build`'s settings beyond ``k`` and ``dtype``, where the config
    sets them (``value_bits``, ``curve``, ``exact_k``); left out at their defaults, so the
    key of a cache without them stays as it was."""
    return {name: getattr(tc, name) for name in ("value_bits", "curve", "exact_k") if getattr(tc, name) is not None}


def token_values_label(tc) -> str:
    """How a token cache of these settings stores its log-probabilities, in words."""
    past = "" if tc.exact_k is None else f" past the top {tc.exact_k}"
    if tc.value_bits:
        return f"{tc.value_bits}-bit codes{past}"
    if tc.curve:
        return f"a {tc.curve}-term curve{past} ({tc.dtype})"
    return tc.dtype


def open_token_cache(ctx: StageContext, teacher: nn.Module, students_data: Any, t_fp: str) -> Any:
    """Build (once) or open the top-k token cache ``stages.distil.teacher_cache`` asks for:
    the teacher over the students' training blocks (the dataset the distil stage fits, so
    ``batch.index`` finds their rows). With several processes one builds it, the others
    wait on its lock and open the same files."""
    from .experiment import default_cache_path
    from .teacher import CacheMismatchError, TokenCache

    cfg = ctx.config
    tc = cfg.stages.distil.teacher_cache
    key = token_cache_key(cfg, t_fp, ctx.data_fp)
    path = default_cache_path(cfg, ctx.store, ctx.run_dir, key)
    if not (path / "manifest.json").is_file():
        ctx.log(f"[distil] building the token cache {path}: the teacher over {len(students_data):,} sequences, "
                f"top {tc.k} tokens per trained-on position, "
                + token_values_label(tc))
    started = time.perf_counter()
    try:
        cache = TokenCache.build(teacher, students_data, path, k=tc.k, value_dtype=tc.dtype,
                                 batch_size=tc.batch_size, tail=tc.tail, device=ctx.device,
                                 **token_cache_extra_settings(tc))
    except CacheMismatchError as e:
        raise ConfigError(f"stages.distil.teacher_cache: {e}. Remove that directory, or point "
                          "stages.distil.teacher_cache.path at another one") from None
    stored = token_values_label(tc)
    ctx.log(f"[distil] distilling from the token cache {path} (k={cache.k}, tail {cache.tail}, {stored}, "
            f"{cache.num_positions:,} positions, {cache.bytes_per_position:g} B/position; ready in "
            f"{time.perf_counter() - started:.1f} s)")
    return cache


def check_shard_teacher(config: ExperimentConfig) -> None:
    """``stages.distil.shard_teacher`` needs a multi-process (torchrun) run: refused in a
    single process, before anything is written."""
    if config.data.text is not None and config.stages.distil.shard_teacher and distributed.world_size() < 2:
        raise ConfigError(
            "stages.distil.shard_teacher: true shards the teacher across the processes of a torchrun launch, and "
            "this run is a single process: start it with torchrun --nproc-per-node N -m kdistill run CONFIG "
            "(N >= 2, one shard per process), or set stages.distil.shard_teacher: false to distil from the whole "
            "teacher in this process")


def unshard_teacher(sharded: Any, build: Callable[[], nn.Module]) -> nn.Module | None:
    """The whole teacher back from its shards, for measuring (every process takes part in
    gathering each tensor; rank 0 alone keeps them, in a network it builds)."""
    main = distributed.is_main()
    full = {}
    for name, value in sharded.module.state_dict().items():
        value = value.full_tensor() if hasattr(value, "full_tensor") else value  # a collective
        if main:
            full[name] = value.detach().cpu()
    if not main:
        return None
    teacher = build()
    teacher.load_state_dict(full)
    return teacher.eval()


# --------------------------------------------------------------------------- measuring
def _held_out_scores(model: nn.Module, data: TextData, device: torch.device, batch_size: int,
                     teacher_preds: list[torch.Tensor] | None) -> tuple[dict[str, float], list[torch.Tensor]]:
    """Held-out next-token loss, perplexity, top-1 accuracy and (given the teacher's
    predictions) top-1 agreement with the teacher, over the trained-on positions."""
    trainer = Trainer(model, device=device)
    result = trainer.evaluate(data.held_out, batch_size=batch_size)
    preds, agree, correct, total = [], 0, 0, 0
    model.eval()
    with torch.inference_mode():
        for i, batch in enumerate(data.held_out.loader(batch_size)):
            batch = batch.to(device)
            mask = batch.token_mask
            top = trainer.forward(model, batch.inputs).argmax(-1)[mask].cpu()
            preds.append(top)
            correct += int((top == batch.targets[mask].cpu()).sum())
            total += top.numel()
            if teacher_preds is not None:
                agree += int((top == teacher_preds[i]).sum())
    scores = {"held_out_loss": result["loss"], "perplexity": math.exp(result["loss"]),
              "token_accuracy": correct / max(total, 1)}
    if teacher_preds is not None:
        scores["agreement_with_teacher"] = agree / max(total, 1)
    return scores, preds


def _generate(model: nn.Module, prompt: torch.Tensor, new_tokens: int, pad_id: int) -> torch.Tensor:
    return model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                          min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad_id)


def _generation(model: nn.Module, data: TextData, cfg, repeats: int) -> tuple[float, list[dict[str, str]]]:
    """Greedy generation on the CPU, batch 1: tokens per second (median over ``repeats``
    timed generations of ``new_tokens`` tokens each, with the model's KV cache) and
    samples whose prompts are the starts of held-out sequences."""
    tok, n_new = data.tokenizer, cfg.report.new_tokens
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    model = model.to("cpu").eval()
    starts = [data.held_out[i]["input_ids"][: cfg.report.prompt_tokens] for i in range(len(data.held_out))]
    starts = [s for s in starts if len(s) == cfg.report.prompt_tokens] or [torch.tensor([pad])]
    samples = []
    with torch.inference_mode():
        step = max(1, len(starts) // max(cfg.report.samples, 1))
        for s in starts[::step][: cfg.report.samples]:
            out = _generate(model, s[None], n_new, pad)[0]
            samples.append({"prompt": tok.decode(s), "completion": tok.decode(out[len(s):])})
        prompt = starts[0][None]
        _generate(model, prompt, n_new, pad)  # warm-up
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            _generate(model, prompt, n_new, pad)
            times.append(time.perf_counter() - t0)
    return n_new / statistics.median(times), samples


def measure_text(ctx: StageContext, data: TextData, models: dict[str, nn.Module], results: dict[str, dict]) -> dict:
    """Every number of a language-model run's ``metrics.json``."""
    cfg = ctx.config
    out: dict[str, dict] = {}
    samples: dict[str, list] = {}
    teacher_preds = None
    for name, model in models.items():  # the teacher first: the others are compared with its predictions
        scores, preds = _held_out_scores(model, data, ctx.device, cfg.data.eval_batch_size,
                                         None if name == "teacher" else teacher_preds)
        if name == "teacher":
            teacher_preds = preds
        speed, samples[name] = _generation(model, data, cfg, repeats=min(cfg.report.repeats, 5))
        out[name] = {**scores, "parameters": count_parameters(model), "size_bytes": size_on_disk(model),
                     "generate_tokens_per_second": speed, "train_seconds": results[name]["seconds"],
                     "reused": results[name]["reused"]}
    gain, recovered = text_headline_numbers(out)
    d = cfg.data
    return {
        "task": "text",
        "kdistill_version": __version__,
        "name": cfg.name,
        "config": config_dict(cfg),
        "dataset": {"name": data.name, "source": data.source, "train_sequences": len(data.train),
                    "labelled": d.subset if d.subset is not None and d.subset < len(data.train) else len(data.train),
                    "held_out_sequences": len(data.held_out), "train_tokens": data.train.num_tokens,
                    "held_out_tokens": data.held_out.num_tokens, "block_size": d.text.block_size,
                    "vocab_size": data.vocab_size},
        "stages": list(models),
        "models": out,
        "perplexity_gain": gain,
        "loss_gap_recovered": recovered,
        "samples": samples,
        "histories": {k: r["history"] for k, r in results.items() if r.get("history")},
        "fingerprints": {k: r["fingerprint"] for k, r in results.items()},
        "machine": machine_description(),
    }


# --------------------------------------------------------------------------- the run
def run_text_stages(config: ExperimentConfig, run_dir: Path, device: torch.device, store: Path | None, *,
                    verbose: int, log: Callable[[str], None], started: float) -> dict:
    """Steps 1-5 of the module docstring, into the locked ``run_dir``; returns the metrics."""
    from .experiment import build_losses, build_optimizer, build_schedule, steps_per_epoch

    main = distributed.is_main()
    # 1. the text and the tokenizer
    data = load_text_data(config, run_dir)
    ctx = StageContext(config, run_dir, store, device, data, data.fingerprint, verbose, log)
    distributed.check_agreement("the data", {"data_fingerprint": ctx.data_fp})
    d, stages = config.data, config.stages
    students_data = student_blocks(data.train, d.subset, config.seed)
    log(f"data: {data.name} ({data.source}); {len(data.train)} training sequences of up to {d.text.block_size} "
        f"tokens ({data.train.num_tokens} tokens), students {len(students_data)}; {len(data.held_out)} held out; "
        f"vocabulary {data.vocab_size}; device {device}")
    common = dict(validation_data=data.held_out, verbose=verbose, seed=config.seed)

    def build(spec) -> nn.Module:
        seed_everything(config.seed)  # scratch and distilled students start from the same weights
        return build_lm(spec, data.vocab_size)

    stage_clock = StageClock()
    teacher = build(config.teacher)
    _check_vocabularies(config, {"teacher": teacher, "student": build(config.student)}, data.vocab_size)
    results: dict[str, dict] = {}
    ts = stages.teacher

    # 2. the teacher: trained, or used as loaded (name: causal_lm with a path, or teacher.checkpoint)
    source = None
    if config.teacher.checkpoint is not None:
        source = load_weights(Path(config.teacher.checkpoint), teacher)
        log(f"[teacher] loaded from {config.teacher.checkpoint} ({source['format']})")
    with stage_clock("teacher"):
        t_batch = ts.batch_size or d.batch_size
        t_fp = fingerprint("teacher", ctx.data_fp, config.teacher.dump(), stage_settings(ts), t_batch, config.seed,
                           *([source["sha256"]] if source else []))

        def teacher_trainer() -> Trainer:
            sched, interval = build_schedule(ts.schedule, ts.epochs, steps_per_epoch(len(data.train), t_batch,
                                                                                       ts.accumulate_steps))
            t = Trainer(teacher, device=device)
            return t.compile(build_optimizer(ts.optimizer, teacher.parameters()), metrics=["accuracy"],
                             scheduler=sched, scheduler_interval=interval, **step_settings(ts))

        if ts.epochs == 0:
            results["teacher"] = {"fingerprint": t_fp, "seconds": 0.0, "history": None,
                                  "reused": config.teacher.checkpoint or str(config.teacher.kwargs.get("path"))}
        else:
            results["teacher"] = run_stage(ctx, "teacher", t_fp, teacher, teacher_trainer,
                                           dict(x=data.train, epochs=ts.epochs, batch_size=t_batch, **common),
                                           share=True)

    # 3. the student from scratch
    student_id = (ctx.data_fp, config.student.dump(), d.subset, config.seed)
    scratch = None
    if stages.scratch.enabled:
        ss = stages.scratch
        s_batch = ss.batch_size or d.batch_size
        s_fp = fingerprint("scratch", student_id, stage_settings(ss), s_batch, None)
        scratch = build(config.student)

        def scratch_trainer() -> Trainer:
            sched, interval = build_schedule(ss.schedule, ss.epochs, steps_per_epoch(len(students_data), s_batch,
                                                                                       ss.accumulate_steps))
            t = Trainer(scratch, device=device)
            return t.compile(build_optimizer(ss.optimizer, scratch.parameters()), metrics=["accuracy"],
                             scheduler=sched, scheduler_interval=interval, **step_settings(ss))

        with stage_clock("scratch"):
            results["scratch"] = run_stage(ctx, "scratch", s_fp, scratch, scratch_trainer,
                                           dict(x=students_data, epochs=ss.epochs, batch_size=s_batch, **common),
                                           share=True)

    # 4. the same student distilled from the teacher (live, from its token cache, or sharded)
    ds = stages.distil
    distilled = build(config.student)
    batch = ds.batch_size or d.batch_size
    fp = fingerprint("distil", student_id, stage_settings(ds), batch, False, t_fp)  # holds the cache settings
    sharded = None

    def distil_trainer() -> Trainer:
        nonlocal sharded
        loss = build_losses(ds)
        sched, interval = build_schedule(ds.schedule, ds.epochs, steps_per_epoch(len(students_data), batch,
                                                                                   ds.accumulate_steps))
        source: Any = teacher
        if ds.teacher_cache is not None:  # the temperature stays the losses' (they soften the served logits)
            source = open_token_cache(ctx, teacher, students_data, t_fp)
        elif ds.shard_teacher:
            from .teacher import ShardedTeacher

            sharded = source = ShardedTeacher(teacher)
            log(f"[distil] the teacher sharded across {distributed.world_size()} processes "
                f"({len(sharded.blocks)} units; {sharded.local_parameter_bytes() / 2**20:,.2f} MiB of its "
                f"{sharded.full_parameter_bytes / 2**20:,.2f} MiB of parameters in each)")
        dist = Distiller(student=distilled, teacher=source, device=device)
        params = list(distilled.parameters()) + [p for p in loss.parameters() if p.requires_grad]
        return dist.compile(build_optimizer(ds.optimizer, params), metrics=["accuracy"], distillation_loss_fn=loss,
                            alpha=ds.alpha, scheduler=sched, scheduler_interval=interval,
                            label_loss_weight=ds.label_loss_weight, vocab_size=ds.vocab_size,
                            on_policy=None if ds.on_policy is None else OnPolicy(**config_dict(ds.on_policy)),
                            **step_settings(ds))

    with stage_clock("distil"):
        results["distil"] = run_stage(ctx, "distil", fp, distilled, distil_trainer,
                                      dict(x=students_data, epochs=ds.epochs, batch_size=batch, **common), share=False)
    if sharded is not None:  # measured whole, on rank 0
        teacher = unshard_teacher(sharded, lambda: build(config.teacher))

    # 5. measure, report, mark finished (rank 0)
    metrics = None
    if main:
        log("measuring held-out perplexity, agreement, size and generation speed")
        models = {"teacher": teacher, **({"scratch": scratch} if scratch is not None else {}), "distil": distilled}
        with stage_clock("measure"):
            metrics = measure_text(ctx, data, models, results)
        finish_run(run_dir, config, metrics, stage_clock, started, log)
    return distributed.broadcast_object(metrics)


# --------------------------------------------------------------------------- reading runs
def run_tokenizer(run_dir: Path, config: ExperimentConfig):
    """The tokenizer a language-model run trained its models with."""
    from .data.text import load_tokenizer

    given = config.data.text.tokenizer
    return load_tokenizer(given if given is not None else Path(run_dir) / "tokenizer")


def build_stage_lm(run_dir: Path, config: ExperimentConfig, stage: str) -> nn.Module:
    """A language-model run's ``stage`` model, built (random weights) for its tokenizer."""
    spec = config.teacher if stage == "teacher" else config.student
    return build_lm(spec, len(run_tokenizer(run_dir, config)))


def export_hf(model: nn.Module, tokenizer: Any, data: Any, out: Path, *, samples: int = 64,
              batch_size: int = 16) -> dict:
    """Save a language model as a Hugging Face model directory (``save_pretrained``, the
    tokenizer beside it), load it back and compare its logits with the model's on held-out
    sequences: ``{"max_abs_diff", "argmax_agreement", "sequences"}``."""
    out = Path(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    model.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)  # whole, or not at all
    from .models.causal_lm import load_causal_lm

    loaded = load_causal_lm(out).eval()
    model.eval()
    diff, agree, total = 0.0, 0, 0
    held = data.select(range(min(samples, len(data))))
    with torch.inference_mode():
        for batch in held.loader(batch_size):
            a = Trainer(model, device="cpu").forward(model, batch.inputs)
            b = Trainer(loaded, device="cpu").forward(loaded, batch.inputs)
            mask = batch.token_mask
            diff = max(diff, float((a - b).abs()[mask].max()))
            agree += int((a.argmax(-1) == b.argmax(-1))[mask].sum())
            total += int(mask.sum())
    return {"max_abs_diff": diff, "argmax_agreement": agree / max(total, 1), "sequences": len(held)}
