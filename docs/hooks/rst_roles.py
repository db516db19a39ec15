"""Griffe extension: the docstrings' reST cross-reference roles as links in the API reference.

The docstrings are Google style with reST inline markup: ``:class:`~kdistill.outputs.Batch```,
``:func:`kd_loss```, ``:mod:`.store```. Markdown has no roles, so each one becomes an
optional autorefs cross-reference: a link where the target is rendered on some page of the
API reference, plain code where it is not (a private helper, a torch class), never a
warning. The name is resolved the way Python would from where the docstring is: relative
to its package for a leading dot, through the imports and members in scope for a bare name.
"""

from __future__ import annotations

import html
import re
from typing import Any, Iterator

import griffe

_ROLE = re.compile(r":(?:py:)?(?:class|func|meth|mod|data|attr|exc|obj|const):`(~)?([^`]+?)`")


def _objects(obj: griffe.Object) -> Iterator[griffe.Object]:
    yield obj
    for member in obj.members.values():
        if not member.is_alias:
            yield from _objects(member)


def _target(obj: griffe.Object, name: str) -> str | None:
    """The full dotted path ``name`` means in ``obj``'s docstring, or None."""
    name = name.rstrip("()")
    if name.startswith("."):
        dots = len(name) - len(name.lstrip("."))
        module = obj.module
        base = module.path if module.is_init_module else module.path.rpartition(".")[0]
        for _ in range(dots - 1):
            base = base.rpartition(".")[0]
        return f"{base}.{name[dots:]}" if name[dots:] else base
    first, _, rest = name.partition(".")
    try:
        head = obj.resolve(first)
    except Exception:  # noqa: BLE001 - a name not in scope stays plain code
        return None
    return f"{head}.{rest}" if rest else head


def _canonical(collection: Any, path: str) -> str:
    """Where ``path`` is defined (a re-export's original), which is where the reference renders it."""
    try:
        return collection.get_member(path).canonical_path
    except Exception:  # noqa: BLE001 - outside the package: keep the path as written
        return path


def convert(text: str, obj: griffe.Object, collection: Any) -> str:
    def repl(match: re.Match) -> str:
        short, name = match.group(1), match.group(2).strip()
        shown = name.lstrip(".").rsplit(".", 1)[-1] if short else name.lstrip(".")
        target = _target(obj, name)
        if target is None:
            return f"`{shown}`"
        target = _canonical(collection, target)
        return f'<autoref identifier="{html.escape(target)}" optional><code>{html.escape(shown)}</code></autoref>'

    return _ROLE.sub(repl, text)


class ReSTRoles(griffe.Extension):
    """Rewrites the roles once the whole package is loaded (so every name can be resolved)."""

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        collection = pkg.modules_collection
        for obj in _objects(pkg):
            if obj.docstring is not None and ":" in obj.docstring.value:
                obj.docstring.value = convert(obj.docstring.value, obj, collection)

    # griffe 1.x releases before on_package call this one; a second pass finds no role left
    on_package_loaded = on_package
