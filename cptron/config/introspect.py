"""What a config dataclass declares: field docstrings, type hints, sections, items, defaults.

A config class is a dataclass whose fields carry a one-line attribute docstring
(a string literal on the line after the field). A field whose type is a dataclass
is a *section*; a field holding a mapping of names to sections or a list of
sections has *items*, written `<name>`/`<index>` in dotted names (PLACEHOLDER).
This module only reads classes and types; parse.py and help.py build on it.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import textwrap
import types
import typing
from typing import Any, Union

# How `--help` and the suggestions write an item's key in a mapping or list of sections.
PLACEHOLDER = {dict: "<name>", list: "<index>"}


def field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings of the dataclass `cls`'s fields, base classes included."""
    return dict(_field_docs(cls))


@functools.cache
def _field_docs(cls: type) -> dict[str, str]:
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):  # subclasses override their bases' docs
        if klass is object:
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError, SyntaxError):  # built in a REPL or by exec: no source
            continue
        node = next((n for n in tree.body if isinstance(n, ast.ClassDef)), None)
        body = node.body if node is not None else []
        for stmt, nxt in zip(body, body[1:]):
            if (
                isinstance(stmt, ast.AnnAssign)
                and isinstance(stmt.target, ast.Name)
                and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                docs[stmt.target.id] = inspect.cleandoc(nxt.value.value)
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in docs.items() if k in names}


@functools.cache
def type_hints(cls: type) -> dict[str, Any]:
    """Each field's resolved type (its annotation as written when a forward reference does not resolve)."""
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # an unresolvable forward reference: fall back to what is there
        hints = {}
    return {f.name: hints.get(f.name, f.type) for f in dataclasses.fields(cls)}


def init_fields(cls: type) -> dict[str, dataclasses.Field]:
    """The fields a config sets (those `__init__` takes), by name, in declaration order."""
    return {f.name: f for f in dataclasses.fields(cls) if f.init}


def is_section(tp: Any) -> bool:
    """Whether a field of type `tp` is a section (a nested config dataclass)."""
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def is_union(tp: Any) -> bool:
    """Whether `tp` is a Union (`X | Y`, `Optional[X]`)."""
    return typing.get_origin(tp) in (Union, types.UnionType)


def field_default(f: dataclasses.Field) -> Any:
    """`f`'s default (a fresh one from its factory), or dataclasses.MISSING when it has none."""
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def without_none(tp: Any) -> Any:
    """`X` for `Optional[X]`, else `tp`."""
    others = [a for a in typing.get_args(tp) if a is not type(None)] if is_union(tp) else [tp]
    return others[0] if len(others) == 1 else tp


def items_of(tp: Any) -> tuple[type, type] | None:
    """(dict or list, item class) when `tp` is a mapping or list of sections (or Optional of one)."""
    tp = without_none(tp)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is list and len(args) == 1 and is_section(args[0]):
        return list, args[0]
    if origin is dict and len(args) == 2 and is_section(args[1]):
        return dict, args[1]
    return None


def dotted_fields(cls: type, prefix: str = "") -> list[str]:
    """Every settable field of `cls` as a dotted name (items of mappings/lists as `<name>`/`<index>`)."""
    out = []
    for name in init_fields(cls):
        tp = type_hints(cls)[name]
        items = items_of(tp)
        if is_section(tp):
            out += dotted_fields(tp, f"{prefix}{name}.")
        elif items:
            out += [prefix + name] + dotted_fields(items[1], f"{prefix}{name}.{PLACEHOLDER[items[0]]}.")
        else:
            out.append(prefix + name)
    return out


__all__ = [
    "PLACEHOLDER",
    "dotted_fields",
    "field_default",
    "field_docs",
    "init_fields",
    "is_section",
    "is_union",
    "items_of",
    "type_hints",
    "without_none",
]
