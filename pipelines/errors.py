"""Exceptions raised for bad user input or unusable files.

Every message names the field, the value and the fix. The CLI turns these into exit code 2
with no traceback.
"""

from __future__ import annotations

__all__ = ["HycompError", "ConfigError", "DataError", "CompressionError", "UntrustedFileError"]


class HycompError(Exception):
    """Base class of the errors a user can act on."""


class ConfigError(HycompError, ValueError):
    """A setting has an unknown name or an out-of-range value."""


class DataError(HycompError):
    """A dataset file is missing, corrupt or of the wrong shape."""


class CompressionError(HycompError, RuntimeError):
    """A compression stage could not produce a valid model (the trial fails, the study goes on)."""


class UntrustedFileError(HycompError):
    """A checkpoint or export does not match its recorded checksum, or is not a plain tensor file."""


def unknown_name(field: str, value: object, valid: list[str] | tuple[str, ...]) -> ConfigError:
    """A ConfigError for a name that is not in a registry, listing the valid names."""
    return ConfigError(
        f"{field}: unknown value {value!r}. Valid values: {', '.join(sorted(map(str, valid)))}."
    )
