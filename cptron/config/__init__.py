"""Typed dataclass configs for every cptron command: defaults < YAML file < dotted command-line overrides.

The package owns reading config dataclasses and turning YAML and `--section.field
value` options into checked instances, plus their `--help` text. Its modules
depend one way only, each on the ones before it:
  - introspect.py: what a config class declares (field docstrings, type hints,
    sections, mapping/list-of-section items, defaults);
  - parse.py: YAML loading, value coercion, dotted overrides, validation, and
    dicts/YAML out (config_to_dict, config_from_dict, dump_yaml);
  - help.py: the `--help` text (format_help).
parse_config below is parse.parse_config with format_help bound for `-h`/`--help`,
since parse.py cannot import help.py.

Not tyro: tyro (which reads the same attribute docstrings) was considered for the
command-line half and rejected. It expands a `dict[str, Section]` only into the keys
of its default, so `--data.sources.<new>.paths` cannot add a source; it has no
YAML-file layer to sit under the options (its YAML helpers are deprecated); its
errors are argparse-style, not `data.sources.web.weight='x' is invalid: expected ...`
with the dotted field and suggestions; and it would add tyro, typeguard and
docstring-parser for a parser whose replaceable part is under 200 lines.
"""

from __future__ import annotations

import functools

from cptron.config import parse as _parse
from cptron.config.help import format_help
from cptron.config.introspect import field_docs
from cptron.config.parse import config_from_dict, config_to_dict, dump_yaml, load_yaml, validate_config

parse_config = functools.partial(_parse.parse_config, format_help=format_help)
"""`cptron.config.parse.parse_config` with the `--help` text bound (see the module docstring)."""


__all__ = [
    "field_docs",
    "parse_config",
    "format_help",
    "config_to_dict",
    "config_from_dict",
    "dump_yaml",
    "load_yaml",
    "validate_config",
]
