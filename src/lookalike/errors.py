"""Errors raised for bad user input; the CLI prints them as one line and exits non-zero."""

from __future__ import annotations


class LookalikeError(ValueError):
    """Bad input: the message names the file, row, column or field and what was expected."""


class TableError(LookalikeError):
    """A dataset table that does not follow the schema."""


class ConfigError(LookalikeError):
    """A config file or override that does not match the config schema."""
