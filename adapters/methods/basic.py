"""Random initializers: peft's own, B = 0 so the adapter starts as a no-op."""

from __future__ import annotations

from adapterflow.adapters.layers import lora_layers, short_name
from adapterflow.adapters.registry import Initializer, register
from adapterflow.adapters.report import InitReport


def peft_builtin(method: str, init_lora_weights):
    def apply(model, settings, context):
        from peft import get_peft_model

        peft_model = get_peft_model(model, settings.lora_config(init_lora_weights))
        report = InitReport(method=method, ranks=ranks_of(peft_model))
        return peft_model, report

    return apply


def ranks_of(peft_model) -> dict[str, int]:
    return {short_name(name): module.r["default"] for name, module in lora_layers(peft_model)}


for _name, _value in (("lora", True), ("gaussian", "gaussian")):
    register(
        Initializer(
            name=_name,
            family="random",
            mutates_base=False,
            needs_data=False,
            needs_grad=False,
            supports_quantized=True,
            preserves_outputs=True,
            apply=peft_builtin(_name, _value),
        )
    )
