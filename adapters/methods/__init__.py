"""Importing this package registers every built-in initializer."""

from adapterflow.adapters.methods import basic, corda, eva, gradient, loftq, lora_sb, pissa  # noqa: F401
