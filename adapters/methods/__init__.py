"""Importing this package registers every built-in initializer."""

from adapters.methods import basic, pissa  # noqa: F401
