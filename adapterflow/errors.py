"""Errors a user can cause. The CLI prints their message alone and exits non-zero.

One module for the whole package, below flows/, tasks/ and adapters/, so the initializer library
raises the same InitError the CLI and the training worker catch.
"""


class AdapterflowError(Exception):
    """Base for every error that has a message meant for the user, not a traceback."""

    exit_code = 2


class ConfigError(AdapterflowError):
    """The YAML, a key, a value, or a combination of options is wrong."""


class DataError(AdapterflowError):
    """A data file is missing, unreadable, or fails its expectations."""

    exit_code = 3


class ModelError(AdapterflowError):
    """The base model cannot be found or loaded."""


class InitError(AdapterflowError):
    """An adapter initializer cannot run with these settings, or its result broke an invariant."""


class TrainingError(AdapterflowError):
    """Training diverged (NaN/inf loss) or stopped; nothing is registered."""

    exit_code = 4


class RegistryError(AdapterflowError):
    """The model registry refused or cannot be reached."""

    exit_code = 5


# Not an error: the run trained and kept its adapter, but a service stayed down, so registration (or the data
# push, or some tracking) waits for `adapterflow register RUN_DIR`. A scheduler sees it apart from 0 and from failures.
DEFERRED_EXIT_CODE = 6
