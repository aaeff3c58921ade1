"""Errors that reach the user as one clear line (the CLI prints them and exits non-zero).

The base class and `DataError` belong to the data layer (`data_pipelines.errors`), which
does not import this package; they are re-exported here.
"""

from data_pipelines.errors import DataError
from data_pipelines.errors import UserFacingError as LaaspError

__all__ = ["LaaspError", "ConfigError", "DataError", "SpecError", "PruningError", "DeviceError",
           "UnfinishedRunError"]


class ConfigError(LaaspError):
    """A config file or option is invalid."""


class SpecError(LaaspError):
    """A slim-model spec or weights file is missing, corrupt or inconsistent."""


class PruningError(LaaspError):
    """A pruning request cannot be carried out (unknown group, unreachable target ...)."""


class DeviceError(LaaspError):
    """A device the config or a flag asks for is not usable here (e.g. no CUDA where a GPU was asked for)."""


class UnfinishedRunError(LaaspError):
    """A run folder has no final model yet (or is no run folder at all)."""
