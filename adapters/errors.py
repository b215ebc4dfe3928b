"""Errors raised by initializers. Kept here so adapters/ never imports the pipeline."""


class InitError(Exception):
    """An initializer cannot run with these settings, or its result broke an invariant."""

    exit_code = 2
