"""Walking the LoRA layers of a peft model."""

from __future__ import annotations

from typing import Iterator


def lora_layers(peft_model, adapter: str = "default") -> Iterator[tuple[str, object]]:
    from peft.tuners.lora import LoraLayer

    for name, module in peft_model.named_modules():
        if isinstance(module, LoraLayer) and adapter in module.lora_A:
            yield name, module


def delta_factors(module, adapter: str = "default"):
    """(B, A, scaling) of one LoRA layer, as float32 tensors."""
    a = module.lora_A[adapter].weight.detach().float()
    b = module.lora_B[adapter].weight.detach().float()
    return b, a, float(module.scaling[adapter])


def short_name(name: str) -> str:
    return name.removeprefix("base_model.model.")
