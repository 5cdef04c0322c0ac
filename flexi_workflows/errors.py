"""Errors the project raises on bad input.

One family of exceptions so the CLI can print a clean message (no torch stack trace) for anything
that is the user's input at fault, while real bugs still surface with a traceback.
"""


class FlexiError(Exception):
    """Base class for every user-facing error of flexi-workflows."""


class ConfigError(FlexiError, ValueError):
    """A recipe, adapter config or command-line value is invalid; the message names the key."""


class RankError(FlexiError, ValueError):
    """A rank or rank vector does not fit the adapter (≤ 0, > r_max, wrong length)."""


class TargetModuleError(FlexiError, ValueError):
    """Target module names matched nothing in the model."""


class ModelNotFoundError(FlexiError, FileNotFoundError):
    """A model path or hub name could not be resolved."""


class DataError(FlexiError, ValueError):
    """A dataset file is malformed, misses a field or is empty; the message names file and line."""
