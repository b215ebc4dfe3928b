"""Importing this package registers every built-in initializer."""

from adapters.methods import basic, eva, pissa  # noqa: F401
