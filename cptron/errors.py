"""Exceptions that name what was wrong, so users see the field or file at fault."""


class CptronError(Exception):
    """Base class of every error cptron raises on purpose."""


class ConfigError(CptronError, ValueError):
    """An invalid configuration value; the message names the dotted field."""


class CheckpointError(CptronError):
    """A missing, incomplete or mismatched checkpoint; the message names the path."""


class ConversionError(CptronError):
    """A Hugging Face model that cannot be converted; the message names the file or tensor."""


def invalid(field: str, value: object, expected: str) -> ConfigError:
    """The house message for an impossible value: `field=value is invalid: expected ...`."""
    return ConfigError(f"{field}={value!r} is invalid: expected {expected}")


def require(ok: bool, field: str, value: object, expected: str) -> None:
    """Raise `invalid(field, value, expected)` unless `ok`; `field` is the dotted name users type."""
    if not ok:
        raise invalid(field, value, expected)


class NonFiniteLossError(CptronError):
    """The loss, a gradient norm or a weight about to be saved is NaN/inf, and the policy says stop."""
