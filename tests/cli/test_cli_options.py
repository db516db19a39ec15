"""The command line itself: `--set` wherever the config file is written, and `--help` of
every subcommand (full descriptions, one default per option, a help text for each)."""

from __future__ import annotations

import argparse
import re

import pytest

from experiment_configs import tiny_config, write_config
from kdistill.cli import build_parser, main
from kdistill.cli.classic import FLAGS, shipped_config
from kdistill.config import load_config


@pytest.fixture
def config(tmp_path):
    return write_config(tmp_path / "tiny.yaml", tiny_config(tmp_path / "run"))


def parse(*argv: str) -> argparse.Namespace:
    """Parse as ``main`` does, up to the subcommand's ``run`` (not called)."""
    from kdistill.cli.config import split_overrides

    args = build_parser().parse_args(list(argv))
    split_overrides(args)
    return args


# --------------------------------------------------------------------------- --set
@pytest.mark.parametrize("argv, dest", [
    (["run", "--set", "seed=1", "CONFIG"], "config"),
    (["run", "--set", "seed=1", "threads=2", "CONFIG", "--quiet"], "config"),
    (["sweep", "--grid", "alpha=0.1,0.5", "--set", "seed=1", "CONFIG"], "config"),
    (["sweep", "--set", "seed=1", "--grid", "alpha=0.1,0.5", "CONFIG"], "config"),
    (["classic", "--set", "seed=1", "CONFIG"], "config"),
    (["cache", "build", "--out", "c", "--set", "seed=1", "CONFIG"], "source"),
    (["config", "show", "--set", "seed=1", "CONFIG"], "config"),
    (["config", "validate", "--set", "seed=1", "CONFIG"], "config"),
])
def test_a_config_written_after_set_is_the_config(config, argv, dest):
    args = parse(*[str(config) if a == "CONFIG" else a for a in argv])
    assert getattr(args, dest) == str(config)
    assert "seed=1" in args.overrides and str(config) not in args.overrides
    assert all("=" in item for item in args.overrides + list(getattr(args, "grid", None) or []))


def test_set_is_repeatable_and_takes_several_values(config, capsys):
    import yaml

    assert main(["config", "show", "--set", "seed=3", "threads=2", str(config), "--set", "stages.distil.epochs=7"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert (shown["seed"], shown["threads"], shown["stages"]["distil"]["epochs"]) == (3, 2, 7)


def test_run_reads_a_config_given_after_set(config, capsys):
    # the override reaches validation (it was taken for the config file's path before)
    assert main(["run", "--set", "stages.distil.temprature=3", str(config)]) == 1
    assert "stages.distil.temprature: unknown key (did you mean temperature" in capsys.readouterr().err


def test_classic_reads_a_config_given_after_set(config, capsys):
    assert main(["classic", "--set", "stages.distil.temprature=3", str(config)]) == 1
    assert "stages.distil.temprature: unknown key (did you mean temperature" in capsys.readouterr().err


def test_sweep_reads_a_config_given_after_set_or_grid(config, capsys, tmp_path):
    for argv in (["--grid", "alpha=0.1,0.5", "--set", "stages.distil.temprature=3", str(config)],
                 ["--set", "stages.distil.temprature=3", "--grid", "alpha=0.1,0.5", str(config)]):
        assert main(["sweep", "--out", str(tmp_path / "sweep"), *argv]) == 1
        assert "stages.distil.temprature: unknown key (did you mean temperature" in capsys.readouterr().err
    assert not (tmp_path / "sweep").exists()


def test_cache_build_reads_a_source_given_after_set(config, capsys, tmp_path):
    assert main(["cache", "build", "--out", str(tmp_path / "c"), "--set", "seed=1", str(config)]) == 1
    assert "sets no teacher.checkpoint" in capsys.readouterr().err


@pytest.mark.parametrize("words, hint", [
    (["stages.distil.epochs", "3"], "did you mean --set stages.distil.epochs=3?"),
    (["stages.distil.epochs:3"], "as --set stages.distil.epochs=3"),
    (["epochs"], "did you mean --set epochs=VALUE?"),
])
def test_an_override_without_equals_says_what_was_expected(config, capsys, words, hint):
    assert main(["config", "show", str(config), "--set", *words]) == 1
    err = capsys.readouterr().err
    assert f"--set {words[0]!r} is neither key=value nor a file: expected key=value" in err
    assert "stages.distil.epochs=3" in err and hint in err


def test_a_second_config_file_after_set_is_refused(config, capsys):
    assert main(["config", "show", str(config), "--set", "seed=1", str(config)]) == 1
    assert "give one config file" in capsys.readouterr().err


def test_a_command_without_its_config_says_so(capsys):
    assert main(["sweep", "--grid", "alpha=0.1,0.5"]) == 1
    assert "give the experiment YAML to sweep" in capsys.readouterr().err
    assert main(["config", "show", "--set", "seed=1"]) == 1
    assert "give an experiment YAML" in capsys.readouterr().err


# --------------------------------------------------------------------------- --help
def _parsers(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """``(command words, parser)`` of every subcommand, nested ones (``cache build``) included."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield (*path, name), sub
                yield from _parsers(sub, (*path, name))


SUBCOMMANDS = [words for words, _ in _parsers(build_parser())]


def _help(words, capsys) -> str:
    with pytest.raises(SystemExit) as exit_:
        main([*words, "--help"])
    assert exit_.value.code == 0
    return capsys.readouterr().out


def _option_entries(text: str) -> dict[str, str]:
    """``{first line of an option's entry: its whole text}`` of a help page's argument sections."""
    entries: dict[str, str] = {}
    section = False
    head = None
    for line in text.splitlines():
        if re.match(r"^(positional arguments|options):$", line):
            section, head = True, None
        elif section and re.match(r"^  \S", line):
            head = line.strip()
            entries[head] = line
        elif section and head and line.startswith("   "):
            entries[head] += " " + line.strip()
        elif not line.strip() or not line.startswith(" "):
            head = None
    return entries


def test_kdistill_help_lists_every_subcommand(capsys):
    text = _help([], capsys)
    for words in SUBCOMMANDS:
        if len(words) == 1:
            assert re.search(rf"^    {words[0]}\s", text, re.M), words


@pytest.mark.parametrize("words", SUBCOMMANDS, ids=" ".join)
def test_every_subcommand_help_says_each_default_once(words, capsys):
    text = _help(words, capsys)
    assert "(default: None)" not in text and "(default: False)" not in text and "(default: [])" not in text
    for head, entry in _option_entries(text).items():
        assert len(re.findall(r"\bdefault\b", entry, re.I)) <= 1, entry


@pytest.mark.parametrize("words", SUBCOMMANDS, ids=" ".join)
def test_every_option_has_a_help_text(words):
    parser = dict(_parsers(build_parser()))[words]
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)) or action.help == argparse.SUPPRESS:
            continue
        assert action.help and action.help.strip(), f"kdistill {' '.join(words)}: {action.option_strings or action.dest}"


def test_classic_help_prints_the_whole_description(capsys):
    text = _help(["classic"], capsys)
    import kdistill.cli.classic as classic

    last = " ".join(classic.__doc__.split())[-60:]  # the docstring's last words, wherever lines wrap
    assert last.replace("``", "`") in " ".join(text.split())
    assert "3. all labels" in text  # its numbered list kept as written


def test_classic_help_defaults_are_the_shipped_configs(capsys):
    entries = _option_entries(_help(["classic"], capsys))
    config = load_config(shipped_config())
    for flag, paths in FLAGS.items():
        node = config
        for part in (paths if isinstance(paths, str) else paths[0]).split("."):
            node = getattr(node, part)
        if node is None:  # e.g. threads: PyTorch's choice
            continue
        shown = f"{node:g}" if isinstance(node, float) else str(node)
        entry = next(e for head, e in entries.items() if head.startswith(f"--{flag.replace('_', '-')} "))
        assert re.search(r"\(default: ([^;)]+)", entry).group(1) == shown, (flag, shown, entry)


@pytest.mark.parametrize("words, option, default", [
    (["bench"], "--latency-batch", "1"),
    (["bench"], "--throughput-batch", "256"),
    (["bench"], "--repeats", "50"),
    (["export"], "--atol", "0.0001"),
    (["export"], "--samples", "1000"),
    (["export"], "--stage", "distil"),
    (["export"], "--format", "onnx"),
])
def test_bench_and_export_options_show_their_defaults(words, option, default, capsys):
    entries = _option_entries(_help(words, capsys))
    entry = next(e for head, e in entries.items() if head.startswith(option + " "))
    assert entry.endswith(f"(default: {default})"), entry
    assert len(entry.split(None, 2)) == 3  # a help text before the default
