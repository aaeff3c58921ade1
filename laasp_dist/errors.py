"""Errors that reach the user as one clear line (the CLI prints them and exits non-zero)."""


class LaaspError(Exception):
    """Base class of every user-facing error: bad config, data, checkpoint or argument."""


class ConfigError(LaaspError):
    """A config file or option is invalid."""


class DataError(LaaspError):
    """A data set is missing, empty, corrupt or too small for what was asked."""


class SpecError(LaaspError):
    """A slim-model spec or weights file is missing, corrupt or inconsistent."""


class PruningError(LaaspError):
    """A pruning request cannot be carried out (unknown group, unreachable target ...)."""


class DeviceError(LaaspError):
    """A device the config or a flag asks for is not usable here (e.g. no CUDA where a GPU was asked for)."""
