"""Exceptions that name what was wrong, so users see the field or file at fault."""


class CptronError(Exception):
    """Base class of every error cptron raises on purpose."""


class ConfigError(CptronError, ValueError):
    """An invalid configuration value; the message names the dotted field."""


class CheckpointError(CptronError):
    """A missing, incomplete or mismatched checkpoint; the message names the path."""


class ConversionError(CptronError):
    """A Hugging Face model that cannot be converted; the message names the file or tensor."""
