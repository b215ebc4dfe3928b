"""The adapter initializer library: pure torch/peft, never imports prefect or mlflow."""

from adapterflow.adapters.context import InitContext
from adapterflow.errors import InitError
from adapterflow.adapters.initialize import initialize
from adapterflow.adapters.products import apply_init, export_init, save_trained_adapter
from adapterflow.adapters.registry import Initializer, get_initializer, register, registered_names
from adapterflow.adapters.report import InitReport
from adapterflow.adapters.settings import LoraSettings

__all__ = [
    "InitContext", "InitError", "InitReport", "Initializer", "LoraSettings", "apply_init", "export_init",
    "get_initializer", "initialize", "register", "registered_names", "save_trained_adapter",
]
