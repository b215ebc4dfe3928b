"""Importing this package registers every built-in initializer."""

from adapters.methods import basic, corda, eva, pissa  # noqa: F401
