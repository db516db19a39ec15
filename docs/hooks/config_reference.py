"""MkDocs hook: the experiment-file reference, generated from the config schema.

``docs/config_reference.md`` holds an introduction and the marker line below; at build
time the marker is replaced by one section per mapping of an experiment file (the top
level, ``data``, ``stages.distil``, ...) with a table of its keys: type and constraints,
default and description, all read from ``kdistill.config.ExperimentConfig``'s JSON schema.
Defaults the schema cannot hold (those made by a ``default_factory``, such as a stage's
optimizer) are read from the pydantic field itself.

``python docs/hooks/config_reference.py`` prints the generated Markdown.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

MARKER = "<!-- config-reference -->"
PAGE = "config_reference.md"

_JSON_TYPES = {"integer": "int", "number": "float", "string": "str", "boolean": "bool", "null": "null", "object": "mapping"}
_ROLE = re.compile(r":(?:class|func|meth|mod|data|attr|exc|obj):`~?([^`]+)`")


def _import_config():
    try:
        from kdistill import config
    except ImportError:  # building from a checkout without the package installed
        sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))
        from kdistill import config
    return config


def _markdown(text: str) -> str:
    """reST inline markup of the docstrings -> Markdown (``x`` -> `x`, :class:`~a.B` -> `B`)."""
    text = _ROLE.sub(lambda m: f"`{m.group(1)}`", text)
    return re.sub(r"``([^`]+)``", r"`\1`", text)


def _escape(text: str) -> str:
    """Plain text for Markdown: outside `code spans`, <, _, * and | are literal characters."""
    parts = re.split(r"(`[^`]*`)", text)
    for i in range(0, len(parts), 2):
        parts[i] = parts[i].replace("<", "&lt;").replace("_", "\\_").replace("*", "\\*").replace("|", "\\|")
    return "".join(parts)


def _one_line(text: str) -> str:
    """A description for a table cell: Markdown, on one line, with no column separator."""
    return _escape(" ".join(_markdown(text).split()))


def _summary(text: str) -> str:
    """The first sentence of a section's description (the description of a key that has none)."""
    first = re.split(r"(?<=[.;])\s", " ".join(text.split()), maxsplit=1)[0]
    return first[:-1] + "." if first.endswith(";") else first


def _yaml(value: Any) -> str:
    """A default as it would be written in an experiment file (inline YAML)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return value if value and re.fullmatch(r"[\w./$~<>-]+", value) else json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_yaml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_yaml(v)}" for k, v in value.items()) + "}"
    return str(value)


def _ref_name(schema: dict[str, Any]) -> str | None:
    ref = schema.get("$ref")
    return ref.rsplit("/", 1)[1] if ref else None


def _constraints(schema: dict[str, Any]) -> list[str]:
    out = []
    for key, sign in (("minimum", "≥"), ("exclusiveMinimum", ">"), ("maximum", "≤"), ("exclusiveMaximum", "<")):
        if key in schema:
            out.append(f"{sign} {schema[key]}")
    if "minItems" in schema:
        out.append(f"at least {schema['minItems']} item{'s' if schema['minItems'] != 1 else ''}")
    return out


def _type(schema: dict[str, Any], defs: dict[str, Any]) -> str:
    """The type of a schema node, Markdown: `int` ≥ 1, [mapping](#anchor), list of ..., `null`."""
    if "anyOf" in schema:
        return " or ".join(_type(s, defs) for s in schema["anyOf"])
    name = _ref_name(schema)
    if name is not None:
        kind = "component" if defs[name].get("additionalProperties") else "mapping"
        return f"[{kind}](#{name.lower()})"
    if "enum" in schema:
        return " or ".join(f"`{_yaml(v)}`" for v in schema["enum"])
    kind = schema.get("type")
    if kind == "array":
        text = f"list of {_type(schema.get('items', {}), defs)}"
    else:
        text = f"`{_JSON_TYPES.get(kind, kind or 'any')}`"
    bounds = _constraints(schema)
    return f"{text} ({', '.join(bounds)})" if bounds else text


def _factory_default(model: type, field: str, defs: dict[str, Any]) -> str:
    """The default a ``default_factory`` makes, as inline YAML; a nested section's is its own."""
    from pydantic import BaseModel

    value = model.model_fields[field].get_default(call_default_factory=True)

    def dump(v: Any) -> Any:
        if isinstance(v, BaseModel):
            return {k: x for k, x in v.model_dump(mode="json", by_alias=True).items() if x is not None}
        if isinstance(v, list):
            return [dump(x) for x in v]
        return v

    if isinstance(value, BaseModel) and type(value).__name__ in defs and not defs[type(value).__name__].get("additionalProperties"):
        return f"[its keys' defaults](#{type(value).__name__.lower()})"
    return f"`{_yaml(dump(value))}`"


def _refs(schema: dict[str, Any]) -> list[str]:
    """Every section a property's schema points to (through anyOf and list items)."""
    name = _ref_name(schema)
    if name is not None:
        return [name]
    out: list[str] = []
    for sub in schema.get("anyOf", []):
        out += _refs(sub)
    if "items" in schema:
        out += _refs(schema["items"])
    return out


def render() -> str:
    """The reference: one section per mapping, in the order an experiment file nests them."""
    config = _import_config()
    root_model = config.ExperimentConfig
    schema = root_model.model_json_schema()
    defs: dict[str, Any] = schema.get("$defs", {})
    root = root_model.__name__
    nodes = {root: schema, **defs}

    # 1. walk every key path depth first, recording where each section is used
    paths: dict[str, list[str]] = {}

    def walk(name: str, path: str) -> None:
        paths.setdefault(name, [])
        if path and path not in paths[name]:
            paths[name].append(path)
        for key, prop in nodes[name].get("properties", {}).items():
            is_list = prop.get("type") == "array" or any(s.get("type") == "array" for s in prop.get("anyOf", []))
            child = (f"{path}.{key}" if path else key) + ("[]" if is_list else "")
            for ref in _refs(prop):
                walk(ref, child)

    walk(root, "")
    order = list(paths)  # first visits, depth first

    # 2. one section per schema node: where it is used, what it is, its keys
    out: list[str] = []
    for name in order:
        node = nodes[name]
        model = getattr(config, name, None)
        where = ", ".join(f"`{p}`" for p in paths[name]) if paths[name] else "The top level"
        out.append(f"## {where} {{ #{name.lower()} }}\n")
        out.append(("A component; in" if node.get("additionalProperties") else "In") + f" Python: `{config.__name__}.{name}`.\n")
        if node.get("description"):
            out.append(_escape(_markdown(node["description"]).strip()) + "\n")
        if node.get("additionalProperties"):
            out.append("Keys other than those below are passed to the component as keyword arguments.\n")
        out.append("| key | type | default | description |")
        out.append("|---|---|---|---|")
        required = set(node.get("required", []))
        for key, prop in node.get("properties", {}).items():
            if key in required:
                default = "required"
            elif "default" in prop:
                default = f"`{_yaml(prop['default'])}`"
            elif model is not None:
                field = next((f for f, info in model.model_fields.items() if (info.alias or f) == key), key)
                default = _factory_default(model, field, defs)
            else:
                default = ""
            about = prop.get("description") or " ".join(_summary(nodes[r].get("description", "")) for r in _refs(prop))
            out.append(f"| `{key}` | {_type(prop, defs)} | {default} | {_one_line(about)} |")
        out.append("")
    return "\n".join(out)


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    if page.file.src_uri != PAGE:
        return markdown
    if MARKER not in markdown:
        raise ValueError(f"docs/{PAGE} lost its marker line {MARKER!r}: the generated reference goes there")
    return markdown.replace(MARKER, render())


if __name__ == "__main__":
    print(render())
