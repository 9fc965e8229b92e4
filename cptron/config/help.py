"""`--help` text of a config dataclass: every dotted option with its type, default and docstring.

This module owns format_help, which cptron.config.parse_config prints for
`-h`/`--help`. It builds on introspect.py and parse.py (config_to_dict writes
mapping defaults); neither imports it. Mappings and lists of sections get one
block each, listing their item class's fields under a `<name>`/`<index>` placeholder.
"""

from __future__ import annotations

import dataclasses
import inspect
import pathlib
import textwrap
import typing
from collections.abc import Mapping
from typing import Any, Literal

import yaml

from cptron.config.introspect import (
    PLACEHOLDER,
    field_default,
    field_docs,
    init_fields,
    is_section,
    is_union,
    items_of,
    type_hints,
)
from cptron.config.parse import config_to_dict


def _type_label(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    items = items_of(tp)
    if items:
        label = "'{NAME: {FIELD: VALUE}, ...}'" if items[0] is dict else "'[{FIELD: VALUE}, ...]'"
        return label + ("|none" if is_union(tp) else "")
    if is_union(tp):
        parts = [_type_label(a) for a in args if a is not type(None)]
        return "|".join(parts + (["none"] if type(None) in args else []))
    if origin is Literal:
        return "{" + ",".join(str(a) for a in args) + "}"
    if origin is tuple and args and args[-1] is not Ellipsis:
        return ",".join(_type_label(a) for a in args)
    if origin in (list, tuple, set, frozenset):
        return f"{_type_label(args[0]) if args else 'VALUE'},..."
    if origin is dict:
        return "KEY=VALUE,..."
    return {bool: "BOOL", int: "INT", float: "FLOAT", str: "STR", pathlib.Path: "PATH"}.get(
        tp, getattr(tp, "__name__", str(tp)).upper()
    )


def _format_value(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (Mapping, list)) and not value:
        return "empty"
    if isinstance(value, Mapping) or (isinstance(value, list) and dataclasses.is_dataclass(value[0])):
        return yaml.safe_dump(config_to_dict(value), default_flow_style=True, width=10**9).strip()
    if isinstance(value, (list, tuple, set, frozenset)):
        return ",".join(_format_value(v) for v in value) if value else "empty"
    return str(value)


def _class_summary(cls: type) -> str:
    doc = inspect.getdoc(cls) or ""
    # dataclasses invent "Name(field: type, ...)" when a class has no docstring
    return "" if doc.startswith(cls.__name__ + "(") else doc.splitlines()[0] if doc else ""


def _items_help(kind: type, dotted: str) -> str:
    """How a mapping or list of sections is set on the command line, after its field's docstring."""
    one, whole = ("<name>", "mapping") if kind is dict else ("<index>", "list")
    return (
        f"On the command line: --{dotted}.{one}.<field> VALUE sets one field of one item (options "
        f"below); --{dotted} with a YAML flow {whole} (as shown) replaces the whole {whole}, before "
        "those."
    )


def _help_section(cls: type, prefix: str, defaults: Any, out: list[str], doc: str = "") -> None:
    leaves, sections = [], []
    docs, hints = field_docs(cls), type_hints(cls)
    for name, f in init_fields(cls).items():
        default = getattr(defaults, name) if defaults is not None else field_default(f)
        (sections if is_section(hints[name]) else leaves).append((name, default))
    if leaves:
        title = prefix[:-1] if prefix else "options"
        # A section is described by its field's docstring in the parent; the top level by the description.
        summary = doc or (_class_summary(cls) if prefix else "")
        out.append(f"\n{title}:" + (f" {summary}" if summary else ""))
    for name, default in leaves:
        shown = "required" if default is dataclasses.MISSING else f"default: {_format_value(default)}"
        out.append(f"  --{prefix}{name} {_type_label(hints[name])}  ({shown})")
        items = items_of(hints[name])
        text = docs.get(name, "(undocumented)") + (" " + _items_help(items[0], prefix + name) if items else "")
        out.append(textwrap.fill(text, width=88, initial_indent=" " * 6, subsequent_indent=" " * 6))
    for name, _ in leaves:  # one block per mapping or list of sections, with its item class's fields
        items = items_of(hints[name])
        if items:
            kind, item_cls = items
            new = (
                "a new <name> starts from these defaults"
                if kind is dict
                else "<index> counts from 0; the index after the last appends an item with these defaults"
            )
            _help_section(
                item_cls,
                f"{prefix}{name}.{PLACEHOLDER[kind]}.",
                None,
                out,
                f"{_class_summary(item_cls)} ({item_cls.__name__}: {new})".lstrip(),
            )
    for name, default in sections:
        _help_section(
            hints[name],
            f"{prefix}{name}.",
            None if default is dataclasses.MISSING else default,
            out,
            docs.get(name, ""),
        )


def format_help(
    cls: type, prog: str = "cptron", description: str | None = None, *, positional_yaml: bool = False
) -> str:
    """Every field of `cls` (dotted), with its type, default and docstring, grouped by section."""
    usage = f"usage: {prog}" + (" [CONFIG.yaml]" if positional_yaml else "") + " [--section.field VALUE ...]"
    out = [usage]
    if description:
        out.append("\n" + description.strip())
    out.append(
        "\nValues apply in order: defaults, then the YAML file, then the command line. "
        "Booleans take true/false/yes/no/1/0 (a bare --flag is true), optional fields take "
        "none, lists are comma-separated. A section's preset applies before its other fields. "
        "Mappings and lists of sections take one field of one item as --field.<name>.<field> "
        "(--field.<index>.<field>), or the whole value in YAML flow style."
    )
    _help_section(cls, "", None, out)
    return "\n".join(out) + "\n"


__all__ = ["format_help"]
