"""The adapter initializer library: pure torch/peft, never imports prefect or mlflow."""

from adapters.context import InitContext
from adapters.errors import InitError
from adapters.initialize import initialize
from adapters.products import apply_init, export_init, save_trained_adapter
from adapters.registry import Initializer, get_initializer, register, registered_names
from adapters.report import InitReport
from adapters.settings import LoraSettings

__all__ = [
    "InitContext", "InitError", "InitReport", "Initializer", "LoraSettings", "apply_init", "export_init",
    "get_initializer", "initialize", "register", "registered_names", "save_trained_adapter",
]
