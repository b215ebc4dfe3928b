"""LoftQ (peft): A, B fitted so that the 4-bit residual plus the adapter stays close to W.

peft runs it with bitsandbytes' CUDA kernels only; the CLI refuses it without CUDA before any
compute (tasks/hardware.py). The base is rewritten like PiSSA's, so the registered adapter is
converted to a plain LoRA delta on the untouched base.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from adapterflow.adapters.layers import delta_factors, lora_layers, short_name
from adapterflow.adapters.methods.basic import ranks_of
from adapterflow.adapters.registry import InitConfig, Initializer, Refusal, register
from adapterflow.adapters.report import InitReport
from adapterflow.errors import InitError

CUDA_ONLY = Refusal(
    reason="peft quantizes with bitsandbytes' CUDA kernels",
    instead="method: pissa with model.quantization: nf4 (QPiSSA: decompose in full precision, quantize the residual)",
)


class LoftqInit(InitConfig):
    """A, B chosen so that Q(W - s·BA) + s·BA is close to W for the 4-bit quantizer Q (CUDA only in peft)."""

    method: Literal["loftq"]
    iterations: int = Field(1, ge=1, le=20)  # alternating quantize / SVD steps


def apply_loftq(model, settings, context):
    import torch
    from peft import LoftQConfig, get_peft_model

    if not torch.cuda.is_available():
        raise InitError(f"LoftQ needs CUDA ({CUDA_ONLY.reason}). On CPU use {CUDA_ONLY.instead}.")
    loftq = LoftQConfig(loftq_bits=4, loftq_iter=settings.init.iterations)
    peft_model = get_peft_model(model, settings.lora_config("loftq", loftq_config=loftq))
    return peft_model, InitReport(method="loftq", ranks=ranks_of(peft_model))


def verify_loftq(peft_model, settings) -> dict[str, float]:
    for name, module in lora_layers(peft_model):
        if delta_factors(module)[0].norm() == 0:
            raise InitError(f"LoftQ did not initialize layer {short_name(name)}: B is zero (fell back to plain LoRA?)")
    return {}


# peft's LoftQ quantizes the full-precision weights itself, so it runs on the unquantized base. It does
# not race: a race shares one base and device, and LoftQ needs a 4-bit base on CUDA.
register(
    Initializer(
        name="loftq", family="svd", config=LoftqInit, apply=apply_loftq, verify=verify_loftq, mutates_base=True,
        needs_data=False, needs_grad=False, supports_quantized=False, preserves_outputs=False,
        cuda_only=CUDA_ONLY, needs_4bit_base="method pissa for an unquantized base", in_races=False,
    )
)
