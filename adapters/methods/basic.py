"""Random initializers: peft's own, B = 0 so the adapter starts as a no-op."""

from __future__ import annotations

from typing import Literal

from adapterflow.adapters.layers import lora_layers, short_name
from adapterflow.adapters.registry import InitConfig, Initializer, register
from adapterflow.adapters.report import InitReport


class LoraInit(InitConfig):
    """Kaiming-uniform A, B = 0: the adapter starts as a no-op."""

    method: Literal["lora"] = "lora"


class GaussianInit(InitConfig):
    """Gaussian A, B = 0."""

    method: Literal["gaussian"]


def peft_builtin(method: str, init_lora_weights):
    def apply(model, settings, context):
        from peft import get_peft_model

        peft_model = get_peft_model(model, settings.lora_config(init_lora_weights))
        report = InitReport(method=method, ranks=ranks_of(peft_model))
        return peft_model, report

    return apply


def ranks_of(peft_model) -> dict[str, int]:
    return {short_name(name): module.r["default"] for name, module in lora_layers(peft_model)}


for _name, _value, _config, _default_candidate in (("lora", True, LoraInit, True), ("gaussian", "gaussian", GaussianInit, False)):
    register(
        Initializer(
            name=_name, family="random", config=_config, apply=peft_builtin(_name, _value), mutates_base=False,
            needs_data=False, needs_grad=False, supports_quantized=True, preserves_outputs=True,
            in_default_race=_default_candidate,
        )
    )
