"""``kdistill config show|schema|validate``: look at an experiment config before running it.

``kdistill config show CONFIG [--set key.path=value ...]`` prints the config as the run
would use it: overrides applied, every default filled in (the ``config.yaml`` a run
directory saves). ``kdistill config validate CONFIG [--set ...]`` checks it as ``kdistill
run`` does before anything trains (unknown keys with the closest ones, types, ranges,
``_component_`` paths that must import, keyword arguments their callables take, the
losses built) and prints ``ok: <name>``, or the problems with exit status 2.
``kdistill config schema [-o FILE]`` writes the JSON schema of an experiment config, for
editors that complete and check YAML: put ``# yaml-language-server: $schema=FILE`` on
the first line of a config (``FILE`` relative to the config, or absolute).

``--set`` (here, and in run, classic, sweep and cache build) takes several
``key.path=value`` overrides and may be repeated. An override always contains ``=``; a
word without one after ``--set`` is the command's config file, so ``kdistill run --set
data.subset=1000 CONFIG.yaml`` works.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

from ..errors import ConfigError

SET_HELP = ("override a config value by its dotted path (values parsed as YAML), e.g. --set stages.distil.epochs=3 "
            "data.subset=1000; repeatable")

#: the options that take ``key=value`` items -> their flag, for messages
KEY_VALUE_FLAGS = {"overrides": "--set", "grid": "--grid"}
#: the override messages show
EXAMPLE = "stages.distil.epochs=3"


# --------------------------------------------------------------------------- --set
def add_set_option(p: argparse.ArgumentParser, *, config: str = "config", help: str = SET_HELP,
                   key_value: tuple[str, ...] = ("overrides",)) -> None:
    """Add ``--set KEY=VALUE ...`` (repeatable, several values each) to a subcommand.

    Args:
        config: the destination of the subcommand's config file (its positional, or an
            option); a word without ``=`` given after ``--set`` goes there.
        key_value: the destinations of the options whose items are ``key=value``
            (``--set``, and e.g. sweep's ``--grid``): :func:`split_overrides` takes a
            config file written after any of them back from it.
    """
    p.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE", help=help)
    p.set_defaults(config_dest=config, key_value_dests=key_value)


def _is_config_word(item: str) -> bool:
    """Whether a ``--set`` word is the config file (or run directory) rather than an
    override: it has no ``=``, or it is an existing path with ``=`` in a folder name (a
    sweep point, ``out/alpha=0.1``)."""
    if "=" not in item:
        return True
    return "/" in item.partition("=")[0] and Path(item).exists()


def _names_a_file(item: str) -> bool:
    return Path(item).exists() or item.lower().endswith((".yaml", ".yml"))


def _not_key_value(item: str, following: str | None) -> str:
    """The message for a ``--set`` word that is neither ``key=value`` nor a file (``following``:
    the word after it, the value of ``--set key value``)."""
    if re.fullmatch(r"[A-Za-z_][\w.]*", item):
        value = following if following is not None and "=" not in following else "VALUE"
        hint = f"; did you mean --set {item}={value}?"
    elif ":" in item:
        key, _, value = item.partition(":")
        hint = f"; write YAML's 'key: value' as --set {key.strip()}={value.strip() or 'VALUE'}"
    else:
        hint = ""
    return (f"--set {item!r} is neither key=value nor a file: expected key=value with the key a dotted path into "
            f"the config, e.g. --set {EXAMPLE} (YAML's stages: {{distil: {{epochs: 3}}}} is stages.distil.epochs=3)"
            f"{hint}")


def split_overrides(args: argparse.Namespace) -> None:
    """Give the config file back to its argument when it was written after ``--set``.

    ``--set`` takes several values, so argparse hands it every word up to the next option,
    the config file included (``kdistill run --set k=v CONFIG.yaml``). An override must
    contain ``=``; a word without one is the config file, when the command has none yet.

    Raises:
        ConfigError: a word that is neither ``key=value`` nor a file, or a second config file.
    """
    dest = getattr(args, "config_dest", None)
    if dest is None:
        return
    for name in getattr(args, "key_value_dests", ("overrides",)):
        items = list(getattr(args, name, None) or [])
        kept = []
        for i, item in enumerate(items):
            if not _is_config_word(item):
                kept.append(item)
            elif not _names_a_file(item):
                if name != "overrides":  # e.g. --grid: its own parser says what it expected
                    kept.append(item)
                    continue
                raise ConfigError(_not_key_value(item, items[i + 1] if i + 1 < len(items) else None))
            elif getattr(args, dest) is not None:
                raise ConfigError(
                    f"{KEY_VALUE_FLAGS.get(name, name)} {item!r} names a file, not key=value, and the config is already "
                    f"{getattr(args, dest)!r}: give one config file, and overrides as key.path=value (e.g. {EXAMPLE})")
            else:
                setattr(args, dest, item)
        setattr(args, name, kept)


# --------------------------------------------------------------------------- schema
def config_schema() -> dict[str, Any]:
    """The JSON schema of :class:`~kdistill.config.ExperimentConfig`, with the short forms
    the loader also takes: a component as its built-in name (``student: classic_student``)
    and ``teacher_cache: true``."""
    from .. import config as cfg

    schema = cfg.ExperimentConfig.model_json_schema()
    defs = schema.get("$defs", {})
    for name, cls in vars(cfg).items():
        if isinstance(cls, type) and issubclass(cls, cfg.ComponentSpec) and name in defs:
            defs[name] = {"anyOf": [{"type": "string", "description": "a built-in name"}, defs[name]]}
    for section in defs.values():
        for prop in section.get("properties", {}).values():
            options = prop.get("anyOf", [])
            if {"$ref": "#/$defs/TeacherCacheConfig"} in options:
                options.insert(0, {"type": "boolean", "description": "true: the defaults, false: no cache"})
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema}


# --------------------------------------------------------------------------- the subcommand
def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("config", help="show a resolved config, check it, or write its JSON schema", description=__doc__)
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)

    s = actions.add_parser("show", help="print the config with overrides applied and every default filled in",
                           description="Print CONFIG as a run would use it: --set overrides applied, every default "
                                       "filled in (the config.yaml a run directory saves).")
    s.add_argument("config", nargs="?", metavar="CONFIG", help="experiment YAML (required; may also come after --set)")
    add_set_option(s)
    s.set_defaults(run=run_show)

    v = actions.add_parser("validate", help="check a config (keys, types, ranges, components) without running it",
                           description="Check CONFIG as `kdistill run` does before anything trains; print "
                                       "'ok: <name>', or every problem and exit with status 2.")
    v.add_argument("config", nargs="?", metavar="CONFIG", help="experiment YAML (required; may also come after --set)")
    add_set_option(v)
    v.set_defaults(run=run_validate, error_status=2)

    j = actions.add_parser("schema", help="write the JSON schema of experiment configs (editor completion)",
                           description="Write the JSON schema of an experiment config. Editors with the YAML "
                                       "language server use it when a config starts with\n"
                                       "  # yaml-language-server: $schema=FILE\n"
                                       "(FILE relative to the config, or absolute).")
    j.add_argument("-o", "--out", default=None, metavar="FILE", help="write the schema here (default: stdout)")
    j.set_defaults(run=run_schema)


def _load(args: argparse.Namespace):
    from ..config import load_config

    if args.config is None:
        raise ConfigError(f"give an experiment YAML: kdistill config {args.action} CONFIG.yaml [--set key.path=value ...]")
    return load_config(args.config, args.overrides)


def run_show(args: argparse.Namespace) -> int:
    from ..config import dump_config

    print(dump_config(_load(args)), end="")
    return 0


def run_validate(args: argparse.Namespace) -> int:
    from ..experiment import build_losses

    config = _load(args)  # keys, types, ranges, _component_ imports, keyword arguments
    for where in ("assistant", "distil"):  # the losses as the run builds them (their own checks)
        stage = getattr(config.stages, where)
        if stage is not None:
            try:
                build_losses(stage)
            except (ValueError, TypeError) as e:
                raise ConfigError(f"{args.config}: stages.{where}.losses: {e}") from None
    print(f"ok: {config.name}")
    return 0


def run_schema(args: argparse.Namespace) -> int:
    text = json.dumps(config_schema(), indent=1) + "\n"
    if args.out is None:
        print(text, end="")
        return 0
    from ..atomic import atomic_write_text

    atomic_write_text(args.out, text)
    print(f"wrote {args.out}; start a config with `# yaml-language-server: $schema={Path(args.out).resolve()}` "
          "(or a path relative to the config) for completion and checks in your editor")
    return 0
