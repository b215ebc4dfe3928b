"""LoftQ (peft): A, B fitted so that the 4-bit residual plus the adapter stays close to W.

peft runs it with bitsandbytes' CUDA kernels only; the CLI refuses it without CUDA before any
compute (tasks/hardware.py). The base is rewritten like PiSSA's, so the registered adapter is
converted to a plain LoRA delta on the untouched base.
"""

from __future__ import annotations

from adapterflow.errors import InitError
from adapterflow.adapters.layers import delta_factors, lora_layers, short_name
from adapterflow.adapters.methods.basic import ranks_of
from adapterflow.adapters.registry import Initializer, register
from adapterflow.adapters.report import InitReport


def apply_loftq(model, settings, context):
    import torch
    from peft import LoftQConfig, get_peft_model

    if not torch.cuda.is_available():
        raise InitError("LoftQ needs CUDA (peft quantizes with bitsandbytes' CUDA kernels). On CPU use method pissa "
                        "with model.quantization: nf4 (QPiSSA).")
    loftq = LoftQConfig(loftq_bits=4, loftq_iter=settings.knobs.get("iterations", 1))
    peft_model = get_peft_model(model, settings.lora_config("loftq", loftq_config=loftq))
    return peft_model, InitReport(method="loftq", ranks=ranks_of(peft_model))


def verify_loftq(peft_model, settings) -> dict[str, float]:
    for name, module in lora_layers(peft_model):
        if delta_factors(module)[0].norm() == 0:
            raise InitError(f"LoftQ did not initialize layer {short_name(name)}: B is zero (fell back to plain LoRA?)")
    return {}


register(
    Initializer(
        name="loftq", family="svd", mutates_base=True, needs_data=False, needs_grad=False,
        supports_quantized=True, preserves_outputs=False, apply=apply_loftq, verify=verify_loftq,
    )
)
