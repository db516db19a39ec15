"""``kdistill cache build / info / verify`` on language-model token caches: built from a
finished text run (or a config with the teacher's checkpoint and tokenizer), recognised by
their manifest, verified file by file, and used by a run pointed at them."""

from __future__ import annotations

import json
import math
import re

import pytest

pytest.importorskip("transformers")

from experiment_configs import tiny_config, write_config  # noqa: E402
from test_text_experiment import text_config  # noqa: E402

from kdistill.cli import main  # noqa: E402
from kdistill.config import validate_config  # noqa: E402
from kdistill.experiment import run_experiment  # noqa: E402
from kdistill.teacher import TokenCache  # noqa: E402

DISTIL = {"epochs": 1, "optimizer": {"name": "adamw", "lr": 0.003}, "alpha": 0.5, "temperature": 1.0,
          "losses": [{"name": "forward_kl"}]}


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("token_cli")
    raw = text_config(base / "run", distil=DISTIL)
    run_experiment(validate_config(raw), verbose=0, log=lambda m: None)
    return base, base / "run", raw


def test_build_info_verify_and_a_run_from_the_built_cache(text_run, capsys, tmp_path):
    base, run_dir, raw = text_run
    out = tmp_path / "k16"
    assert main(["cache", "build", str(run_dir), "--out", str(out), "--k", "16", "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert "sequences (the distil stage's)" in printed and "top 16 of 300 tokens" in printed
    assert not out.exists()  # a dry run builds nothing
    assert main(["cache", "build", str(run_dir), "--out", str(out), "--k", "16", "--dtype", "float32"]) == 0
    printed = capsys.readouterr().out
    assert f"stages.distil.teacher_cache.path={out}" in printed and "teacher_cache.k=16" in printed
    cache = TokenCache.open(out)
    assert (cache.k, cache.vocab_size, cache.manifest["value_dtype"]) == (16, 300, "float32")

    assert main(["cache", "info", str(out)]) == 0
    info = capsys.readouterr().out
    assert "token cache" in info and "16 of a vocabulary of 300 tokens" in info
    assert f"{cache.num_positions:,} in {cache.num_sequences:,} sequences" in info
    assert f"{cache.bytes_per_position:g} B/position" in info and "float32" in info
    assert "LlamaForCausalLM" in info
    assert main(["cache", "info", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["format"] == "kdistill-token-cache"
    assert (summary["k"], summary["vocab_size"], summary["num_positions"]) == (16, 300, cache.num_positions)
    assert summary["teacher"]["class"] == "LlamaForCausalLM" and summary["value_dtype"] == "float32"
    assert main(["cache", "verify", str(out)]) == 0
    assert "token cache, every file matches its checksum" in capsys.readouterr().out

    # a run pointed at the cache distils from it without building
    cached = text_config(tmp_path / "from-cli", distil={**DISTIL, "teacher_cache": {
        "path": str(out), "k": 16, "dtype": "float32"}})
    cached["teacher"] = {**raw["teacher"], "checkpoint": str(run_dir / "stages" / "teacher" / "checkpoint.pt")}
    cached["stages"]["teacher"] = {"epochs": 0}  # the run's trained teacher, as it is
    cached["data"]["text"]["tokenizer"] = str(run_dir / "tokenizer")
    logs: list[str] = []
    metrics = run_experiment(validate_config(cached), verbose=0, log=logs.append)
    assert not [m for m in logs if "building the token cache" in m]
    assert [m for m in logs if f"distilling from the token cache {out}" in m]
    assert math.isfinite(metrics["models"]["distil"]["held_out_loss"])

    # one flipped byte: verify names the file and fails; info (no hashing) still reads it
    f = out / "tail.npy"
    data = bytearray(f.read_bytes())
    data[-3] ^= 0xFF
    f.write_bytes(bytes(data))
    assert main(["cache", "verify", str(out)]) == 1
    err = capsys.readouterr().err
    assert "checksum" in err and "tail.npy" in err
    assert main(["cache", "info", str(out)]) == 0


def test_a_config_with_the_teachers_checkpoint_builds_the_same_cache(text_run, capsys, tmp_path):
    base, run_dir, raw = text_run
    from_run = tmp_path / "from-run"
    assert main(["cache", "build", str(run_dir), "--out", str(from_run), "--k", "4"]) == 0
    cfg = dict(raw, output_dir=str(tmp_path / "unused"))
    cfg["teacher"] = {**raw["teacher"], "checkpoint": str(run_dir / "stages" / "teacher" / "checkpoint.pt")}
    cfg["data"] = {**raw["data"], "text": {**raw["data"]["text"], "tokenizer": str(run_dir / "tokenizer")}}
    config = write_config(tmp_path / "lm.yaml", cfg)
    from_config = tmp_path / "from-config"
    assert main(["cache", "build", str(config), "--out", str(from_config), "--k", "4"]) == 0
    a, b = TokenCache.open(from_run).manifest, TokenCache.open(from_config).manifest
    assert a["teacher"]["fingerprint"] == b["teacher"]["fingerprint"]
    assert a["dataset"]["fingerprint"] == b["dataset"]["fingerprint"]
    assert a["files"]["logprobs.npy"]["sha256"] == b["files"]["logprobs.npy"]["sha256"]


def test_token_cache_build_refusals(text_run, capsys, tmp_path):
    base, run_dir, raw = text_run
    assert main(["cache", "build", str(run_dir), "--out", str(tmp_path / "v"), "--views", "2"]) == 1
    assert "--views is for image caches" in capsys.readouterr().err
    assert main(["cache", "build", str(run_dir), "--out", str(tmp_path / "m"), "--mode", "full"]) == 1
    assert "--mode is for image caches" in capsys.readouterr().err
    no_teacher = write_config(tmp_path / "no_teacher.yaml", raw)
    assert main(["cache", "build", str(no_teacher), "--out", str(tmp_path / "x")]) == 1
    assert "neither teacher.checkpoint nor a pretrained teacher path" in capsys.readouterr().err
    no_tok = dict(raw, teacher={**raw["teacher"], "checkpoint": str(run_dir / "stages" / "teacher" / "checkpoint.pt")})
    config = write_config(tmp_path / "no_tokenizer.yaml", no_tok)
    assert main(["cache", "build", str(config), "--out", str(tmp_path / "y")]) == 1
    assert "sets no data.text.tokenizer" in capsys.readouterr().err
    for path in ("v", "m", "x", "y"):
        assert not (tmp_path / path).exists()


def _per_position(printed: str) -> int:
    return int(re.search(r"([\d,]+) B/position", printed).group(1).replace(",", ""))


def test_a_curve_cache_from_the_flags_and_from_the_config(text_run, capsys, tmp_path):
    base, run_dir, raw = text_run
    out = tmp_path / "curve"
    flags = ["--k", "8", "--curve", "3", "--exact-k", "2"]
    assert main(["cache", "build", str(run_dir), "--out", str(out), *flags, "--dry-run"]) == 0
    planned = capsys.readouterr().out
    assert "top 8 of 300 tokens, a 3-term curve past the top 2 (float16)" in planned
    assert main(["cache", "build", str(run_dir), "--out", str(out), *flags]) == 0
    printed = capsys.readouterr().out
    assert "teacher_cache.k=8" in printed and "teacher_cache.curve=3 stages.distil.teacher_cache.exact_k=2" in printed
    cache = TokenCache.open(out)
    m = cache.manifest
    assert (cache.k, m["curve"], m["exact_k"], m["value_bits"]) == (8, 3, 2, None)
    assert _per_position(planned) == cache.bytes_per_position  # the dry run's estimate is what is stored

    assert main(["cache", "info", str(out)]) == 0
    info = capsys.readouterr().out
    assert "float16, log-probabilities past the top 2 as a 3-term rank curve (curve=3, exact_k=2)" in info
    assert main(["cache", "info", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["curve"], summary["exact_k"], summary["value_bits"]) == (3, 2, None)

    # value codes: exact_k resolved as TokenCache.build does (min(4, k)), in the estimate and in info
    codes = tmp_path / "codes"
    assert main(["cache", "build", str(run_dir), "--out", str(codes), "--k", "8", "--value-bits", "4"]) == 0
    per = _per_position(capsys.readouterr().out.splitlines()[0])
    assert per == TokenCache.open(codes).bytes_per_position
    assert main(["cache", "info", str(codes)]) == 0
    assert "log-probabilities past the top 4 as 4-bit codes (value_bits=4, exact_k=4)" in capsys.readouterr().out

    # a config's teacher_cache.curve / exact_k are the defaults; --value-bits replaces its curve
    cfg = dict(raw, output_dir=str(tmp_path / "unused"))
    cfg["teacher"] = {**raw["teacher"], "checkpoint": str(run_dir / "stages" / "teacher" / "checkpoint.pt")}
    cfg["data"] = {**raw["data"], "text": {**raw["data"]["text"], "tokenizer": str(run_dir / "tokenizer")}}
    cfg["stages"] = {**raw["stages"], "distil": {**DISTIL, "teacher_cache": {"k": 8, "curve": 3, "exact_k": 2}}}
    config = write_config(tmp_path / "curve.yaml", cfg)
    assert main(["cache", "build", str(config), "--out", str(tmp_path / "c"), "--dry-run"]) == 0
    assert "top 8 of 300 tokens, a 3-term curve past the top 2 (float16)" in capsys.readouterr().out
    assert main(["cache", "build", str(config), "--out", str(tmp_path / "c"), "--value-bits", "4", "--dry-run"]) == 0
    assert "4-bit codes past the top 2 (float16 ranges)" in capsys.readouterr().out


@pytest.mark.parametrize("flags, message", [
    (["--curve", "3", "--value-bits", "4"], "value_bits and curve are two encodings"),
    (["--k", "8", "--curve", "3", "--exact-k", "9"], "exact_k must be an integer in [1, k=8]"),
    (["--exact-k", "2"], "exact_k applies to value codes or a curve only"),
    (["--curve", "9"], "curve must be None or the number of terms of the rank curve, 1 to 7"),
])
def test_curve_and_exact_k_flag_refusals(text_run, capsys, tmp_path, flags, message):
    base, run_dir, raw = text_run
    assert main(["cache", "build", str(run_dir), "--out", str(tmp_path / "z"), *flags]) == 1
    err = capsys.readouterr().err
    assert message in err and "--value-bits, --curve, --exact-k or the config's teacher_cache" in err
    assert not (tmp_path / "z").exists()


@pytest.mark.parametrize("flag", ["--curve", "--exact-k"])
def test_image_caches_refuse_the_curve_flags(capsys, tmp_path, flag):
    config = write_config(tmp_path / "image.yaml", tiny_config(tmp_path / "run"))
    assert main(["cache", "build", str(config), "--out", str(tmp_path / "img"), flag, "2"]) == 1
    assert f"{flag} is for language-model token caches" in capsys.readouterr().err
    assert not (tmp_path / "img").exists()
