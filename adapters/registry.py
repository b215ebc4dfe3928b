"""The initializer registry: each method is registered once with what it needs and does.

Config validation reads these flags to refuse impossible combinations before any compute.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from adapterflow.errors import InitError

FAMILIES = ("random", "svd", "gradient", "variance")


@dataclass(frozen=True)
class Initializer:
    name: str
    family: str
    mutates_base: bool  # W <- W - s*BA: the saved adapter is converted to plain LoRA
    needs_data: bool
    needs_grad: bool
    supports_quantized: bool
    preserves_outputs: bool  # right after init the model computes what the base computed
    apply: Callable  # (model, LoraSettings, InitContext) -> (PeftModel, InitReport)
    verify: Callable | None = None  # (peft_model, LoraSettings) -> {check: value}; raises InitError
    trains_middle_only: bool = False  # LoRA-SB: A, B0 frozen, lora_B = B0·R with R (r×r) trainable


_REGISTRY: dict[str, Initializer] = {}


def register(initializer: Initializer) -> Initializer:
    if initializer.name in _REGISTRY:
        raise ValueError(f"initializer {initializer.name!r} is already registered")
    if initializer.family not in FAMILIES:
        raise ValueError(f"initializer family must be one of {FAMILIES}, got {initializer.family!r}")
    _REGISTRY[initializer.name] = initializer
    return initializer


def get_initializer(name: str) -> Initializer:
    _load_builtin_methods()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise InitError(f"unknown init method {name!r}; known methods: {', '.join(sorted(_REGISTRY))}") from None


def registered_names() -> list[str]:
    _load_builtin_methods()
    return sorted(_REGISTRY)


def _load_builtin_methods() -> None:
    import adapterflow.adapters.methods  # noqa: F401  (registers on import)
