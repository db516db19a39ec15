"""The ``kdistill`` command: one module per subcommand, each with ``add_parser`` and ``run``."""

from __future__ import annotations

import argparse
import re
import os
import sys
import textwrap
from typing import Sequence

from .. import __version__
from ..errors import KDistillError
from . import bench, cache, classic, compare, config, export, layers, report, run, sweep

SUBCOMMANDS = (run, classic, sweep, report, compare, export, bench, layers, cache, config)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions whole, with their structure: plain paragraphs filled to the terminal's
    width, numbered or bulleted lists and indented lines kept as written, reST markup
    dropped. Each option's default is said once: appended as ``(default: X)`` unless the
    help text already says it, and never for a default that means "unset" (``None``, a
    flag's ``False``)."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        text = re.sub(r":\w+:`~[\w.]*?(\w+)`", r"\1", text)  # :class:`~kdistill.teacher.TeacherCache` -> TeacherCache
        text = re.sub(r":\w+:`([\w.]+)`", r"\1", text)  # :mod:`kdistill.regimes` -> kdistill.regimes
        text = re.sub(r"\*\*(.+?)\*\*", r"\1", text, flags=re.S).replace("``", "`")
        paragraphs = []
        for paragraph in re.split(r"\n\s*\n", text.strip()):
            lines = paragraph.splitlines()
            if re.match(r"\s*(\d+\.|[-*])\s", lines[0]):  # a list: as written
                paragraphs.append("\n".join(indent + line for line in lines))
                continue
            block: list[str] = []
            words: list[str] = []
            for line in [*lines, None]:
                if (line is None or line.startswith(" ")) and words:  # fill the plain lines so far
                    block.append(textwrap.fill(" ".join(words), width, initial_indent=indent, subsequent_indent=indent,
                                               break_on_hyphens=False, break_long_words=False))
                    words = []
                if line is not None and line.startswith(" "):
                    block.append(indent + line)  # an indented line (an example): as written
                elif line is not None:
                    words.append(line.strip())
            paragraphs.append("\n".join(block))
        return "\n\n".join(paragraphs)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if ("default" in text.lower() or default is None or default is argparse.SUPPRESS
                or isinstance(default, bool) or default == []):
            return text
        if action.option_strings or action.nargs in (argparse.OPTIONAL, argparse.ZERO_OR_MORE):
            return f"{text} (default: %(default)s)"
        return text


class ArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` with :class:`HelpFormatter`; subcommands' parsers (and
    theirs) are made of this class too."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="kdistill",
        description="Knowledge distillation for PyTorch: train a small student from a large teacher.",
    )
    parser.add_argument("--version", action="version", version=f"kdistill {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in SUBCOMMANDS:
        module.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit status (2 for usage errors, 1 for failures;
    ``kdistill config validate``: 2 for an invalid config)."""
    args = build_parser().parse_args(argv)
    # kdistill never downloads: Hugging Face libraries stay offline unless the user says otherwise
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        config.split_overrides(args)  # a config file written after --set goes back to its argument
        return int(args.run(args) or 0)
    except KDistillError as e:
        command = " ".join(filter(None, (args.command, getattr(args, "action", None))))  # cache build, config validate
        print(f"kdistill {command}: error: {e}", file=sys.stderr)
        return getattr(args, "error_status", 1)
    except KeyboardInterrupt:
        print(f"kdistill {args.command}: interrupted; continue with `kdistill run --resume RUN_DIR` "
              "(the last checkpoint and finished stages are kept)", file=sys.stderr)
        return 130
