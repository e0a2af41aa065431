"""Errors raised for bad user input; the CLI prints them as one line and exits non-zero."""

from __future__ import annotations


class LookalikeError(ValueError):
    """Bad input: the message names the file, row, column or field and what was expected."""


class TableError(LookalikeError):
    """A dataset table that does not follow the schema."""


class ConfigError(LookalikeError):
    """A config file or override that does not match the config schema."""


class ImageError(LookalikeError):
    """An image that cannot be used (missing, empty, truncated, corrupt, bbox outside it); `reason` omits the file
    name."""

    def __init__(self, message: str, reason: str = "") -> None:
        super().__init__(message)
        self.reason = reason or message


class ProvenanceError(LookalikeError):
    """An input made from another dataset table or model than the command's config names."""


class LookalikeWarning(UserWarning):
    """Something skipped or adjusted on the user's behalf; the CLI prints it as one line."""


def printable(text: str) -> str:
    """Text safe to print: bytes of non-UTF-8 file names (kept as surrogates) shown as \\x escapes."""
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
