"""Typed dataclass configs: defaults < YAML file < dotted command-line overrides.

This module owns turning YAML and command-line options into a config dataclass
(parse_config, load_yaml, config_from_dict), checking it (validate_config) and
writing it back out (config_to_dict, dump_yaml). It reads classes through
introspect.py; the `--help` text is help.py's, which builds on this module.

A job config nests section dataclasses: a section is set in YAML as a nested
mapping and on the command line as `--section.field value`. A section with a
`preset` field and a `from_preset(name)` classmethod starts from that preset
whenever the preset is given; its other explicitly given fields override it.
Every value is checked at start-up, and errors name the dotted field.

A field that holds a mapping of names to sections (`dict[str, SourceConfig]`) or a
list of sections (`list[StageConfig]`) is set in YAML as a mapping or list, and on
the command line in two ways:
  - one field of one item: `--data.sources.web.paths /x,/y` (an existing item keeps
    its other fields; a new name starts from the item class's defaults) and
    `--data.stages.0.replay_fraction 0.2` (an index below the list's length changes
    that item; the index equal to the length appends a new item);
  - the whole value in YAML flow style, parsed with yaml.safe_load:
    `--data.sources '{web: {paths: [/x]}}'`, `--data.stages '[{start_step: 5}]'`.
    It replaces the YAML file's value; per-item options then apply on top of it,
    whatever their order on the command line.
A mapping key may contain dots (`--data.sources.web.en.paths` names source
`web.en`): the last component that names a field of the item class ends the key.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import pathlib
import typing
from collections.abc import Callable, Mapping
from typing import Any, Literal

import yaml

from cptron.config.introspect import (
    PLACEHOLDER,
    dotted_fields,
    field_default,
    init_fields,
    is_section,
    is_union,
    items_of,
    type_hints,
    without_none,
)
from cptron.errors import ConfigError, invalid

_TRUE = ("true", "1", "yes", "y", "on")
_FALSE = ("false", "0", "no", "n", "off")
_NONE = ("none", "null")
_BARE = object()  # an option given without a value: `--flag` means true


class _Bad(Exception):
    """A value does not fit a type; the caller turns it into a ConfigError."""


def _suggest(name: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(name, choices, n=3, cutoff=0.6)
    return f"; did you mean {' or '.join(close)}?" if close else ""


# ---------------------------------------------------------------- value conversion


def _expected(tp: Any) -> str:
    """What a value of type `tp` must look like, for error messages."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if is_union(tp):
        parts = [_expected(a) for a in args if a is not type(None)]
        return " or ".join(parts + (["none"] if type(None) in args else []))
    if origin is Literal:
        return f"one of {list(args)}"
    if origin in (list, tuple, set, frozenset) or tp in (list, tuple):
        if origin is tuple and args and args[-1] is not Ellipsis:
            return f"{len(args)} comma-separated values ({', '.join(_expected(a) for a in args)})"
        if args and is_section(args[0]):
            return f"a list of mappings of {args[0].__name__} fields"
        item = _expected(args[0]) if args else "anything"
        return f"a list (comma-separated on the command line) whose items are each {item}"
    if origin is dict and len(args) == 2 and is_section(args[1]):
        return f"a mapping of names to mappings of {args[1].__name__} fields"
    if origin is dict or tp is dict:
        return "a mapping (k=v,k2=v2 on the command line)"
    if is_section(tp):
        return f"a mapping of {tp.__name__} fields"
    return {
        bool: "a boolean (true/false/yes/no/1/0)",
        int: "an integer",
        float: "a float",
        str: "a string",
        pathlib.Path: "a path",
    }.get(tp, f"a {getattr(tp, '__name__', tp)}")


def _convert(tp: Any, raw: Any, name: str, source: str | None = None) -> Any:
    """`raw` (a CLI string or a YAML value) as type `tp`, or ConfigError naming `name`."""
    if raw is _BARE:
        if tp is bool or (is_union(tp) and bool in typing.get_args(tp)):
            return True
        raise ConfigError(f"--{name}: missing value: expected {_expected(tp)}")
    try:
        return _coerce(tp, raw, name, source)
    except _Bad:
        where = f" (in {source})" if source else ""
        raise invalid(name, raw, f"{_expected(tp)}{where}") from None


def _coerce(tp: Any, raw: Any, name: str, source: str | None = None) -> Any:
    """`raw` as `tp`, or _Bad; sections inside (items of lists and mappings) name `source` in their errors."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any or tp is object:
        return raw
    if is_union(tp):
        if type(None) in args and (raw is None or (isinstance(raw, str) and raw.strip().lower() in _NONE)):
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(arg, raw, name, source)
            except _Bad:
                pass
        raise _Bad
    if origin is Literal:
        match = [c for c in args if (raw == c and type(raw) is type(c)) or (type(raw) is str and raw == str(c))]
        return match[0] if match else _fail()
    if tp in (bool, int, float):
        return _coerce_number(tp, raw)
    if tp is str:  # no numbers or booleans: YAML reads `1.10` as 1.1 and `no` as False; quote them
        return raw if isinstance(raw, str) else _fail()
    if tp is pathlib.Path:
        return pathlib.Path(raw) if isinstance(raw, (str, pathlib.PurePath)) else _fail()
    if origin in (list, tuple, set, frozenset) or tp in (list, tuple):
        if isinstance(raw, str):
            items = [x.strip() for x in raw.split(",")] if raw.strip() else []
        else:
            items = list(raw) if isinstance(raw, (list, tuple)) else _fail()
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(items) != len(args):
                raise _Bad
            return tuple(_coerce(a, x, f"{name}[{i}]", source) for i, (a, x) in enumerate(zip(args, items)))
        item_tp = args[0] if args else Any
        if isinstance(raw, str) and is_section(item_tp):  # "a,b" cannot spell sections
            raise _Bad
        out = [_coerce(item_tp, x, f"{name}[{i}]", source) for i, x in enumerate(items)]
        return (origin or tp)(out)
    if origin is dict or tp is dict:
        key_tp, val_tp = args or (Any, Any)
        if isinstance(raw, str) and is_section(val_tp):  # "k=v" cannot spell sections
            raise _Bad
        if isinstance(raw, str):
            pairs = [p.split("=", 1) for p in raw.split(",") if p.strip()]
            if any(len(p) != 2 for p in pairs):
                raise _Bad
            raw = {k.strip(): v.strip() for k, v in pairs}
        if not isinstance(raw, Mapping):
            raise _Bad
        return {_coerce(key_tp, k, name, source): _coerce(val_tp, v, f"{name}.{k}", source) for k, v in raw.items()}
    if is_section(tp):  # e.g. items of a list of dataclasses, given in YAML
        if isinstance(raw, tp):
            return raw
        return _build(tp, name + ".", None, raw, {}, source) if isinstance(raw, Mapping) else _fail()
    if isinstance(tp, type):
        return raw if isinstance(raw, tp) else _fail()
    return raw


def _coerce_number(tp: type, raw: Any) -> Any:
    text = raw.strip().lower() if isinstance(raw, str) else None
    if tp is bool:
        if isinstance(raw, bool) or (type(raw) is int and raw in (0, 1)):
            return bool(raw)
        return text in _TRUE if text in _TRUE + _FALSE else _fail()
    if isinstance(raw, bool):
        raise _Bad
    if isinstance(raw, int) or (tp is float and isinstance(raw, float)):
        return tp(raw)
    try:
        return tp(text) if text is not None else _fail()  # int("3.5") fails, as intended
    except ValueError:
        raise _Bad from None


def _fail() -> Any:
    raise _Bad


# ---------------------------------------------------------------- building


class _Items:
    """Command-line values of a mapping or list of sections: the whole value, then per-item fields."""

    def __init__(self) -> None:
        self.whole: Any = dataclasses.MISSING
        self.entries: dict[Any, dict] = {}  # item key (str name or int index) -> its fields' CLI tree


def _flow_value(raw: Any, dotted: str, kind: type, item_cls: type) -> Any:
    """The YAML flow-style text given as `--dotted` for a whole mapping or list of sections, loaded."""
    example = "'{NAME: {FIELD: VALUE}}'" if kind is dict else "'[{FIELD: VALUE}, ...]'"
    one = f"--{dotted}.{PLACEHOLDER[kind]}.<field> VALUE"
    shape = "mapping of names to" if kind is dict else "list of"
    if raw is not _BARE:
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            value = e
        if isinstance(value, Mapping if kind is dict else list):
            return value
    expected = (
        f"a YAML flow {shape} mappings of {item_cls.__name__} fields, e.g. --{dotted} {example}, or one field as {one}"
    )
    if raw is _BARE:
        raise ConfigError(f"--{dotted}: missing value: expected {expected}")
    raise invalid(f"--{dotted}", raw, expected)


def _apply_items(tp: Any, dotted: str, current: Any, items: _Items) -> Any:
    """`current` (from YAML, a base or defaults) with the command line's whole value and item fields."""
    kind, item_cls = items_of(tp)
    if items.whole is not dataclasses.MISSING:
        if is_union(tp) and isinstance(items.whole, str) and items.whole.strip().lower() in _NONE:
            if not items.entries:
                return None
            current = None
        else:
            current = _convert(tp, _flow_value(items.whole, dotted, kind, item_cls), dotted)
    out = kind() if current is None or current is dataclasses.MISSING else kind(current)  # a copy: bases stay
    for key in sorted(items.entries) if kind is list else items.entries:
        cli = items.entries[key]
        if kind is dict:
            name = _convert(typing.get_args(without_none(tp))[0], key, f"{dotted} key")
            out[name] = _build(item_cls, f"{dotted}.{key}.", out.get(name), {}, cli, None)
        elif key > len(out):
            raise ConfigError(
                f"--{dotted}.{key}.<field>: index {key} is invalid: expected an index below "
                f"{len(out)} (the items of {dotted}) or {len(out)} to append one; several new items "
                f"are easier to give in YAML or as --{dotted} '[{{FIELD: VALUE}}, ...]'"
            )
        else:
            base = out[key] if key < len(out) else None
            out[key : key + 1] = [_build(item_cls, f"{dotted}[{key}].", base, {}, cli, None)]
    return out


def _build(cls: type, prefix: str, base: Any, yaml_map: Any, cli_map: dict, source: str | None) -> Any:
    """An instance of `cls` from `base` (or the class defaults), then YAML, then CLI values."""
    where = f" (in {source})" if source else ""
    yaml_map = {} if yaml_map is None else yaml_map
    if not isinstance(yaml_map, Mapping):
        section = prefix[:-1] or "the top level"
        raise ConfigError(f"{section} must be a mapping of {cls.__name__} fields, got {yaml_map!r}{where}")
    fields, hints = init_fields(cls), type_hints(cls)
    for key in yaml_map:
        if key not in fields:
            hint = _suggest(f"{prefix}{key}", [prefix + n for n in fields])
            raise ConfigError(
                f"{prefix}{key} is not a field of {cls.__name__}{hint} (expected one of {sorted(fields)}){where}"
            )
    from_preset = getattr(cls, "from_preset", None)
    if "preset" in fields and callable(from_preset):
        raw = cli_map.get("preset", yaml_map.get("preset", dataclasses.MISSING))
        if raw is not dataclasses.MISSING:
            preset = _convert(hints["preset"], raw, prefix + "preset", None if "preset" in cli_map else source)
            if preset is not None:
                try:
                    base = from_preset(preset)
                except ConfigError as e:
                    if f"{prefix}preset" in str(e):
                        raise
                    raise ConfigError(f"{prefix}preset={preset!r} is invalid: {e}") from e
    values = {}
    for name, f in fields.items():
        tp, dotted = hints[name], prefix + name
        if is_section(tp):
            sub_base = getattr(base, name) if base is not None else field_default(f)
            sub_base = None if sub_base is dataclasses.MISSING else sub_base
            values[name] = _build(tp, dotted + ".", sub_base, yaml_map.get(name), cli_map.get(name, {}), source)
        elif isinstance(cli_map.get(name), _Items):
            if cli_map[name].whole is not dataclasses.MISSING:
                current = None  # replaced by the command line's whole value
            elif name in yaml_map:
                current = _convert(tp, yaml_map[name], dotted, source)
            else:
                current = getattr(base, name) if base is not None else field_default(f)
            values[name] = _apply_items(tp, dotted, current, cli_map[name])
        elif name in cli_map:
            values[name] = _convert(tp, cli_map[name], dotted)
        elif name in yaml_map:
            values[name] = _convert(tp, yaml_map[name], dotted, source)
        elif base is not None:
            values[name] = getattr(base, name)
        else:
            default = field_default(f)
            if default is dataclasses.MISSING:
                raise ConfigError(f"{dotted} is required: expected {_expected(tp)} (as --{dotted} or in YAML)")
            values[name] = default
    return cls(**values)


def validate_config(obj: Any, key: Any = dataclasses.MISSING) -> None:
    """Call `validate()` on every dataclass in `obj`, sections and items before their parent.

    Sections, items of lists and values of mappings are all visited. A mapping's
    value gets its key as validate's argument when validate takes one, so its
    errors can name it (SourceConfig.validate(name) writes `data.sources.<name>`).
    A parent may check its items again with more context (DataConfig does); the
    item's own checks then fail first, with the same message.
    """
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if isinstance(value, Mapping):
            items = list(value.items())
        else:
            items = [(dataclasses.MISSING, v) for v in (value if isinstance(value, (list, tuple)) else [value])]
        for item_key, item in items:
            if dataclasses.is_dataclass(item) and not isinstance(item, type):
                validate_config(item, item_key)
    validate = getattr(obj, "validate", None)
    if callable(validate):
        if key is not dataclasses.MISSING and _takes_an_argument(validate):
            validate(key)
        else:
            validate()


def _takes_an_argument(fn: Any) -> bool:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # a builtin without a signature
        return False
    return any(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL) for p in params)


def command_line_options(argv: list[str]) -> list[tuple[str | None, Any]]:
    """`argv` as the parser reads it, in order: (option name, raw value) for `--name value`, `--name=value`
    and a bare `--flag` (whose value is not a string), and (None, token) for a positional token."""
    out, i = [], 0
    while i < len(argv):
        token = argv[i]
        i += 1
        if not token.startswith("--") or token == "--":
            out.append((None, token))
            continue
        key, eq, raw = token[2:].partition("=")
        if not eq:
            if i < len(argv) and not argv[i].startswith("--"):
                raw, i = argv[i], i + 1
            else:
                raw = _BARE
        out.append((key, raw))
    return out


def _parse_argv(cls: type, argv: list[str], allow_positional_yaml: bool) -> tuple[str | None, dict]:
    """(positional YAML path or None, nested dict of CLI overrides) from `argv`.

    The tree holds a raw value per leaf field, a dict per section and an _Items
    per mapping or list of sections.
    """
    yaml_path, tree = None, {}
    known = dotted_fields(cls)
    for key, raw in command_line_options(argv):
        if key is None:
            if allow_positional_yaml and yaml_path is None and not tree:
                yaml_path = raw
                continue
            raise ConfigError(
                f"unexpected positional argument {raw!r}: expected --section.field value"
                + (" (a YAML path may only come first)" if allow_positional_yaml else "")
            )
        _place(cls, key.split("."), "", tree, raw, key, known)
    return yaml_path, tree


def _place(klass: type, parts: list[str], prefix: str, node: dict, raw: Any, option: str, known: list[str]) -> None:
    """Store the value `raw` of `--option` in `node`, the CLI tree of `klass`; `parts` are the names left."""
    name, rest = parts[0].replace("-", "_"), parts[1:]  # dashes only in field names: keys keep theirs
    fields, dotted = init_fields(klass), prefix + name
    tp = type_hints(klass)[name] if name in fields else None
    if tp is None:
        tail = "".join("." + p for p in rest)
        close = difflib.get_close_matches(name, list(fields), n=3, cutoff=0.6)
        hint = (
            f"; did you mean {' or '.join(prefix + c + tail for c in close)}?"
            if close
            else _suggest(option.replace("-", "_"), known)
        )
        raise ConfigError(f"--{option}: unknown field {option!r}{hint} (see --help)")
    items = items_of(tp)
    if rest and not is_section(tp) and not items:
        raise ConfigError(
            f"--{option}: unknown field {option!r}: {dotted} has no fields; expected --{dotted} "
            f"VALUE, {_expected(tp)} (see --help)"
        )
    if is_section(tp):
        if not rest:
            raise ConfigError(f"--{option}: {dotted!r} is a section: set its fields as --{dotted}.<field>")
        _place(tp, rest, dotted + ".", node.setdefault(name, {}), raw, option, known)
        return
    if not items:
        node[name] = raw
        return
    kind, item_cls = items
    entry = node.get(name)
    if not isinstance(entry, _Items):
        entry = node[name] = _Items()
    if not rest:
        entry.whole = raw
        return
    item_fields = init_fields(item_cls)
    usage = (
        f"--{dotted}.{PLACEHOLDER[kind]}.<field> VALUE with <field> a {item_cls.__name__} field, "
        f"one of {sorted(item_fields)}"
    )
    if kind is list:
        if not rest[0].isdigit() or len(rest) < 2:
            raise ConfigError(f"--{option}: expected {usage}; <index> counts from 0")
        item_key, sub = int(rest[0]), rest[1:]
    else:
        # The longest key whose next component is a field: source names may contain dots.
        cut = next((j for j in range(len(rest) - 1, 0, -1) if rest[j].replace("-", "_") in item_fields), None)
        if cut is None:
            item = ".".join(rest[:-1]) or "<name>"
            close = difflib.get_close_matches(rest[-1].replace("-", "_"), list(item_fields), n=3, cutoff=0.6)
            hint = f"; did you mean {' or '.join(f'{dotted}.{item}.{c}' for c in close)}?" if close else ""
            raise ConfigError(f"--{option}: unknown field {option!r}{hint} (expected {usage})")
        item_key, sub = ".".join(rest[:cut]), rest[cut:]
    _place(item_cls, sub, f"{dotted}.{item_key}.", entry.entries.setdefault(item_key, {}), raw, option, known)


def load_yaml(path: str) -> dict:
    """The mapping in the YAML file `path` (an empty file is an empty mapping)."""
    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh)
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror or e}") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from e
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"config file {path} must hold a mapping of fields, got {type(data).__name__}")
    return dict(data)


def parse_config(
    cls: type,
    argv: list[str],
    yaml_path: str | None = None,
    prog: str = "cptron",
    *,
    allow_positional_yaml: bool = False,
    description: str | None = None,
    format_help: Callable[..., str] | None = None,
) -> Any:
    """A validated `cls` from its defaults, then `yaml_path`, then the overrides in `argv`.

    With `allow_positional_yaml`, a positional argument (only one, and before any option)
    is the YAML path. With `format_help`, `-h`/`--help` prints `format_help(cls, prog,
    description, positional_yaml=allow_positional_yaml)` and exits with status 0:
    cptron.config.parse_config passes help.format_help (this module cannot import help.py,
    which builds on it); without it, `-h`/`--help` are options like any other.
    """
    argv = list(argv)
    if format_help is not None and ("-h" in argv or "--help" in argv):
        print(format_help(cls, prog, description, positional_yaml=allow_positional_yaml))
        raise SystemExit(0)
    positional, cli = _parse_argv(cls, argv, allow_positional_yaml)
    if positional is not None and yaml_path is not None:
        raise ConfigError(f"two config files given: {yaml_path!r} and positional {positional!r}; expected one")
    path = yaml_path if yaml_path is not None else positional
    data = load_yaml(path) if path is not None else {}
    obj = _build(cls, "", None, data, cli, path)
    validate_config(obj)
    return obj


# ---------------------------------------------------------------- dicts and YAML


def config_to_dict(obj: Any) -> Any:
    """`obj` as plain YAML/JSON data: dataclasses become dicts, tuples lists, paths strings."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: config_to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.init}
    if isinstance(obj, pathlib.PurePath):
        return str(obj)
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [config_to_dict(x) for x in obj]
    if isinstance(obj, Mapping):
        return {k: config_to_dict(v) for k, v in obj.items()}
    return obj


def config_from_dict(cls: type, data: Mapping, validate: bool = True) -> Any:
    """A `cls` from a (possibly partial) nested dict such as `config_to_dict` returns."""
    obj = _build(cls, "", None, data, {}, None)
    if validate:
        validate_config(obj)
    return obj


def dump_yaml(obj: Any, path: str | None = None) -> str:
    """`obj` as YAML, in field order; also written to `path` when given."""
    text = yaml.safe_dump(config_to_dict(obj), sort_keys=False, default_flow_style=False)
    if path is not None:
        pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
        pathlib.Path(path).write_text(text, encoding="utf-8")
    return text


__all__ = ["parse_config", "config_to_dict", "config_from_dict", "dump_yaml", "load_yaml", "validate_config"]
