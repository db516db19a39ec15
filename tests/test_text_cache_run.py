"""``stages.distil.teacher_cache`` and ``stages.distil.shard_teacher`` in language-model runs
(``data.text``): the token cache is built once over the students' blocks, reused by the
next run and by a resumed one, and distilled from; the config refuses what does not apply
to text; fingerprints keep existing configs' values. Tiny corpus and models (seconds)."""

from __future__ import annotations

import inspect
import json
import math
import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from experiment_configs import tiny_config  # noqa: E402
from test_text_experiment import text_config  # noqa: E402

from kdistill.config import load_config, validate_config  # noqa: E402
from kdistill.errors import ConfigError  # noqa: E402
from kdistill.experiment import load_stage_model, run_experiment  # noqa: E402
from kdistill.run.fingerprints import config_fingerprint, fingerprint, stage_settings  # noqa: E402
from kdistill.teacher import TokenCache  # noqa: E402
from kdistill.text_experiment import token_cache_key  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DISTIL = {"epochs": 1, "optimizer": {"name": "adamw", "lr": 0.003}, "alpha": 0.5, "temperature": 1.0,
          "losses": [{"name": "forward_kl"}]}


def cached_config(out: Path, store: Path, **cache) -> dict:
    raw = text_config(out, distil={**DISTIL, "teacher_cache": cache})
    raw["teacher_store"] = str(store)
    return raw


def run(raw: dict, logs: list[str] | None = None) -> dict:
    return run_experiment(validate_config(raw), verbose=0, log=logs.append if logs is not None else lambda m: None)


def cache_dirs(store: Path) -> list[Path]:
    """The caches in ``teacher_caches/`` beside the store (not their lock files)."""
    return [p for p in (store.parent / "teacher_caches").iterdir() if not p.name.startswith(".")]


def cache_lines(logs: list[str], what: str) -> list[str]:
    return [line for line in logs if what in line]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A live run and a run from an exact cache (k = the whole vocabulary, float32), sharing
    one stage store (so one teacher) and the cache folder beside it."""
    base = tmp_path_factory.mktemp("text_cache")
    store = base / "store"
    live_raw = text_config(base / "live", distil=DISTIL)
    live_raw["teacher_store"] = str(store)
    live = run(live_raw)
    raw = cached_config(base / "cached", store, k=300, dtype="float32")
    logs: list[str] = []
    cached = run(raw, logs)
    return base, store, live, raw, cached, logs


def test_the_cache_is_built_once_and_the_student_distils_from_it(runs):
    base, store, live, raw, cached, logs = runs
    built = cache_lines(logs, "[distil] building the token cache")
    assert len(built) == 1 and "top 300 tokens per trained-on position, float32" in built[0]
    used = cache_lines(logs, "[distil] distilling from the token cache")
    assert len(used) == 1 and "k=300, tail bucket" in used[0]
    caches = cache_dirs(store)  # beside the stage store, keyed
    assert len(caches) == 1 and caches[0].name.startswith("causal_lm-")
    cache = TokenCache.open(caches[0])
    assert (cache.k, cache.vocab_size, cache.manifest["value_dtype"]) == (300, 300, "float32")
    # built over the students' blocks (all of them here: no data.subset), not the held-out text
    assert cache.num_sequences == cached["dataset"]["train_sequences"]
    hist = cached["histories"]["distil"]["history"]
    assert all(math.isfinite(v) for v in hist["distillation_loss"])
    # every token kept at float32: the softmax of the served logits is the teacher's, so the
    # student ends where the live run's does; and not where the scratch student does
    d_cached, d_live = cached["models"]["distil"], live["models"]["distil"]
    assert math.isclose(d_cached["held_out_loss"], d_live["held_out_loss"], rel_tol=1e-4)
    assert cached["models"]["teacher"]["held_out_loss"] == live["models"]["teacher"]["held_out_loss"]
    assert d_cached["held_out_loss"] != cached["models"]["scratch"]["held_out_loss"]
    a = load_stage_model(base / "cached", "distil").state_dict()
    s = load_stage_model(base / "cached", "scratch").state_dict()
    assert any(not torch.equal(a[k], s[k]) for k in a)
    # a cached and a live distil stage are different stages
    assert cached["fingerprints"]["distil"] != live["fingerprints"]["distil"]
    assert cached["fingerprints"]["teacher"] == live["fingerprints"]["teacher"]
    saved = load_config(base / "cached" / "config.yaml").stages.distil.teacher_cache  # defaults resolved
    assert (saved.mode, saved.k, saved.tail, saved.batch_size) == ("topk", 300, "bucket", 16)


def test_a_second_run_opens_the_cache_instead_of_building_it(runs):
    base, store, _, raw, cached, _ = runs
    cache_dir, = cache_dirs(store)
    stamp = (cache_dir / "manifest.json").stat().st_mtime_ns
    logs: list[str] = []
    again = run({**raw, "output_dir": str(base / "second")}, logs)
    assert not cache_lines(logs, "building the token cache")
    assert len(cache_lines(logs, f"distilling from the token cache {cache_dir}")) == 1
    assert (cache_dir / "manifest.json").stat().st_mtime_ns == stamp
    assert again["models"]["distil"]["held_out_loss"] == cached["models"]["distil"]["held_out_loss"]


def test_a_resumed_cached_run_ends_as_the_uninterrupted_one(runs, tmp_path):
    base, store, _, raw, cached, _ = runs
    copy = tmp_path / "copy"
    shutil.copytree(base / "cached", copy)
    sdir = copy / "stages" / "distil"
    (sdir / "done.json").unlink()
    (copy / "metrics.json").unlink()
    assert torch.load(sdir / "last.pt", weights_only=True)["global_step"] > 0  # a mid-epoch state
    run_json = json.loads((copy / "run.json").read_text())
    (copy / "run.json").write_text(json.dumps({**run_json, "status": "running"}))
    logs: list[str] = []
    again = run({**raw, "output_dir": str(copy)}, logs)
    assert any("[distil] resuming" in line for line in logs)
    assert not cache_lines(logs, "building the token cache")
    assert len(cache_lines(logs, "distilling from the token cache")) == 1
    assert again["models"]["distil"]["held_out_loss"] == cached["models"]["distil"]["held_out_loss"]


def test_other_cache_settings_are_another_cache_and_another_stage(runs):
    base, store, _, _, cached, _ = runs
    settings = {"k": 8, "tail": "renormalize", "path": str(base / "k8")}
    bits = "value_bits" in inspect.signature(TokenCache.build).parameters
    if bits:
        settings["value_bits"] = 4
    logs: list[str] = []
    other = run(cached_config(base / "k8-run", store, **settings), logs)
    assert len(cache_lines(logs, f"building the token cache {base / 'k8'}")) == 1
    cache = TokenCache.open(base / "k8")
    assert cache.k == 8 and cache.manifest.get("value_bits") == settings.get("value_bits")
    assert "tail renormalize" in cache_lines(logs, "distilling from the token cache")[0]
    assert other["fingerprints"]["distil"] != cached["fingerprints"]["distil"]
    assert math.isfinite(other["models"]["distil"]["held_out_loss"])
    assert other["models"]["distil"]["held_out_loss"] != cached["models"]["distil"]["held_out_loss"]


def test_a_curve_cache_is_built_with_its_exact_k_and_is_another_stage(runs):
    base, store, _, _, cached, _ = runs
    settings = {"k": 8, "curve": 3, "exact_k": 2, "path": str(base / "curve")}
    logs: list[str] = []
    other = run(cached_config(base / "curve-run", store, **settings), logs)
    built = cache_lines(logs, f"building the token cache {base / 'curve'}")
    assert len(built) == 1 and "a 3-term curve past the top 2 (float16)" in built[0]
    cache = TokenCache.open(base / "curve")
    m = cache.manifest
    assert (cache.k, m["curve"], m["exact_k"], m["value_bits"]) == (8, 3, 2, None)
    assert m["files"]["logprobs.npy"]["shape"][1:] == [2] and m["files"]["curve.npy"]["shape"][1:] == [3]
    assert "a 3-term curve past the top 2" in cache_lines(logs, "distilling from the token cache")[0]
    assert other["fingerprints"]["distil"] != cached["fingerprints"]["distil"]
    assert math.isfinite(other["models"]["distil"]["held_out_loss"])
    saved = load_config(base / "curve-run" / "config.yaml").stages.distil.teacher_cache
    assert (saved.curve, saved.exact_k, saved.value_bits) == (3, 2, None)


# --------------------------------------------------------------------------- config
def _text(distil: dict) -> dict:
    return text_config("x", distil={**DISTIL, **distil})


def test_text_cache_defaults_are_resolved():
    tc = validate_config(_text({"teacher_cache": True})).stages.distil.teacher_cache
    assert (tc.mode, tc.k, tc.dtype, tc.tail, tc.batch_size, tc.views) == ("topk", 64, "float16", "bucket", 16, 0)
    tc = validate_config(_text({"teacher_cache": {"mode": "topk", "k": 5, "batch_size": 3, "dtype": "bfloat16",
                                                  "tail": "uniform"}})).stages.distil.teacher_cache
    assert (tc.k, tc.batch_size, tc.dtype, tc.tail) == (5, 3, "bfloat16", "uniform")
    # an image run keeps its own defaults
    img = tiny_config("x")
    img["stages"]["distil"]["teacher_cache"] = True
    tc = validate_config(img).stages.distil.teacher_cache
    assert (tc.mode, tc.k, tc.tail, tc.batch_size) == ("full", None, None, 256)


@pytest.mark.parametrize("distil, match", [
    ({"teacher_cache": {"mode": "full"}}, r"teacher_cache.mode: full is not available for language models.*mode: topk"),
    ({"teacher_cache": {"views": 2}}, r"teacher_cache.views is for image runs.*remove it"),
    ({"teacher_cache": True, "on_policy": {"lmbda": 0.5}},
     r"stages.distil.teacher_cache cannot serve stages.distil.on_policy.*Remove stages.distil.teacher_cache"),
    ({"shard_teacher": True, "teacher_cache": True}, r"shard_teacher with stages.distil.teacher_cache.*remove one"),
    ({"teacher_cache": {"curve": 6, "value_bits": 4}}, r"teacher_cache: value_bits and curve are two encodings"),
    ({"teacher_cache": {"exact_k": 8}}, r"teacher_cache.exact_k applies to value_bits or curve"),
    ({"teacher_cache": {"k": 8, "curve": 6, "exact_k": 9}}, r"teacher_cache.exact_k: 9 is more than k \(8\)"),
    ({"teacher_cache": {"curve": 6, "exact_k": 80}}, r"teacher_cache.exact_k: 80 is more than k \(64\)"),
    ({"teacher_cache": {"curve": 8}}, r"teacher_cache.curve: .*less than or equal to 7"),
    ({"teacher_cache": {"curve": 0}}, r"teacher_cache.curve: .*greater than or equal to 1"),
    ({"teacher_cache": {"curve": 6, "exact_k": 0}}, r"teacher_cache.exact_k: .*greater than or equal to 1"),
])
def test_text_refusals(distil, match):
    with pytest.raises(ConfigError, match=match):
        validate_config(_text(distil))


@pytest.mark.parametrize("distil, match", [
    ({"teacher_cache": {"tail": "bucket"}}, r"teacher_cache.tail is for language-model token caches"),
    ({"teacher_cache": {"dtype": "bfloat16"}}, r"bfloat16 is for language-model token caches"),
    ({"teacher_cache": {"value_bits": 4}}, r"value_bits is for language-model token caches"),
    ({"teacher_cache": {"mode": "topk", "k": 3, "curve": 6}}, r"teacher_cache.curve is for language-model token caches"),
    ({"teacher_cache": {"mode": "topk", "k": 3, "exact_k": 2}},
     r"teacher_cache.exact_k is for language-model token caches"),
    ({"shard_teacher": True}, r"shard_teacher is for the distil stage of a language-model run"),
])
def test_image_runs_refuse_the_language_model_keys(distil, match):
    raw = tiny_config("x")
    raw["stages"]["distil"].update(distil)
    with pytest.raises(ConfigError, match=match):
        validate_config(raw)


def test_fingerprints_of_existing_configs_do_not_change():
    shipped = load_config(ROOT / "src/kdistill/configs/text/kd/python_llama.yaml")
    assert config_fingerprint(shipped) == "ef6dbbca8627f683"  # as before the cache and sharding keys
    assert fingerprint(stage_settings(shipped.stages.distil)) == "ed4e1c9be8585cbc"
    img = tiny_config("x")
    img["stages"]["distil"]["teacher_cache"] = {"mode": "topk", "k": 3}
    cache = stage_settings(validate_config(img).stages.distil)["teacher_cache"]
    assert not {"tail", "value_bits", "curve", "exact_k"} & set(cache) and cache["k"] == 3
    # sharding changes where the teacher lives, not what it computes: the same stage
    plain, sharded = validate_config(_text({})), validate_config(_text({"shard_teacher": True}))
    assert stage_settings(sharded.stages.distil) == stage_settings(plain.stages.distil)
    assert config_fingerprint(sharded) == config_fingerprint(plain)
    # on-policy distillation (seq_kd: the sharded teacher generates in lockstep) is accepted with it
    assert validate_config(_text({"shard_teacher": True, "on_policy": {"seq_kd": True}})).stages.distil.shard_teacher
    # any cache setting that changes the served distribution is another stage
    a = stage_settings(validate_config(_text({"teacher_cache": {"tail": "bucket"}})).stages.distil)
    b = stage_settings(validate_config(_text({"teacher_cache": {"tail": "uniform"}})).stages.distil)
    assert fingerprint(a) != fingerprint(b) != fingerprint(stage_settings(plain.stages.distil))


def test_curve_and_exact_k_enter_the_cache_key_and_the_stage_only_when_set():
    plain = validate_config(_text({"teacher_cache": {"k": 32}}))
    tc = plain.stages.distil.teacher_cache
    assert (tc.curve, tc.exact_k) == (None, None)  # not resolved: TokenCache.build's default applies
    assert "curve" not in stage_settings(plain.stages.distil)["teacher_cache"]
    # the key of a cache without them is what it was before they existed
    assert token_cache_key(plain, "t", "d") == fingerprint("token_cache", "t", "d", plain.data.subset, plain.seed,
                                                           {"k": 32, "dtype": "float16"})
    keys, stages = {token_cache_key(plain, "t", "d")}, {fingerprint(stage_settings(plain.stages.distil))}
    for extra in ({"curve": 6}, {"curve": 6, "exact_k": 8}, {"curve": 5, "exact_k": 8}, {"value_bits": 4},
                  {"value_bits": 4, "exact_k": 8}):
        config = validate_config(_text({"teacher_cache": {"k": 32, **extra}}))
        assert {k: v for k, v in stage_settings(config.stages.distil)["teacher_cache"].items() if k in extra} == extra
        keys.add(token_cache_key(config, "t", "d"))
        stages.add(fingerprint(stage_settings(config.stages.distil)))
    assert len(keys) == len(stages) == 6


def test_shard_teacher_in_one_process_is_refused_before_anything_is_written(tmp_path):
    raw = text_config(tmp_path / "one", distil={**DISTIL, "shard_teacher": True})
    with pytest.raises(ConfigError, match=r"single process: start it with torchrun --nproc-per-node N -m kdistill "
                                          r"run CONFIG.*shard_teacher: false"):
        run(raw)
    assert not (tmp_path / "one").exists()
