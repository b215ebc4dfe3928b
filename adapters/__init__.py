"""The adapter initializer library: pure torch/peft, never imports prefect or mlflow.

Importing it (the config schema does, for the registry) loads no torch: the modules that need it
at import time, products.py, load on first use of their names.
"""

from adapterflow.adapters.context import InitContext
from adapterflow.adapters.initialize import initialize
from adapterflow.adapters.registry import Initializer, get_initializer, register, registered, registered_names, unregister
from adapterflow.adapters.report import InitReport
from adapterflow.adapters.settings import LoraSettings
from adapterflow.errors import InitError

_PRODUCTS = ("apply_init", "export_init", "save_trained_adapter")

__all__ = [
    "InitContext", "InitError", "InitReport", "Initializer", "LoraSettings", "apply_init", "export_init", "get_initializer",
    "initialize", "register", "registered", "registered_names", "save_trained_adapter", "unregister",
]


def __getattr__(name: str):
    if name in _PRODUCTS:
        from adapterflow.adapters import products

        return getattr(products, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
