"""CorDA: SVD of W·C, C the covariance of the layer's inputs on calibration samples (peft).

IPM keeps the components that matter for the task data (the adapter trains them); KPM keeps the
components that matter for a "knowledge" dataset in the frozen base. peft's preprocessing hooks
assume one sample per forward, so the calibration iterable yields batch-size-1 inputs.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from adapterflow.adapters.context import reported
from adapterflow.adapters.layers import delta_factors, lora_layers, short_name
from adapterflow.adapters.methods.basic import ranks_of
from adapterflow.adapters.registry import InitConfig, Initializer, SampleSource, register
from adapterflow.adapters.report import InitReport
from adapterflow.errors import InitError


class CordaInit(InitConfig):
    """SVD of W·C with C the input covariance: IPM on task data, KPM on a knowledge dataset."""

    path_fields = ("knowledge",)

    method: Literal["corda"]
    mode: Literal["ipm", "kpm"] = "ipm"
    samples: int = Field(128, ge=1, le=100_000)  # calibration samples, one per forward
    knowledge: str | None = None  # KPM: a data file whose text field holds knowledge samples
    knowledge_field: str = "text"

    @model_validator(mode="after")
    def _kpm_needs_knowledge(self) -> "CordaInit":
        if self.mode == "kpm" and not self.knowledge:
            raise ValueError("corda mode kpm needs adapter.init.knowledge: a data file of knowledge samples to preserve")
        return self

    def sample_source(self) -> SampleSource:
        if self.mode == "kpm":
            return SampleSource(self.samples, "knowledge", "knowledge_field")
        return SampleSource(self.samples)


def apply_corda(model, settings, context):
    from peft import get_peft_model
    from peft.tuners.lora.config import CordaConfig
    from peft.tuners.lora.corda import preprocess_corda

    mode = settings.init.mode
    config = settings.lora_config("corda", corda_config=CordaConfig(corda_method=mode))

    def run_model():
        for sample in reported(context.calibration, context.progress):
            model(**sample)

    import torch

    with torch.no_grad():
        preprocess_corda(model, config, run_model=run_model)
    peft_model = get_peft_model(model, config)
    report = InitReport(method="corda", ranks=ranks_of(peft_model))
    report.notes.append(f"mode {mode}")
    return peft_model, report


def verify_corda(peft_model, settings) -> dict[str, float]:
    """A fallback leaves B = 0; CorDA's B·A carries a real part of W."""
    smallest = float("inf")
    for name, module in lora_layers(peft_model):
        b, a, scaling = delta_factors(module)
        share = ((scaling * b @ a).norm() / module.base_layer.weight.float().norm().clamp_min(1e-12)).item()
        smallest = min(smallest, share)
        if share < 1e-6:
            raise InitError(f"CorDA did not initialize layer {short_name(name)}: B·A is zero (fell back to plain LoRA?)")
    return {"min_adapter_to_residual_norm": smallest}


register(
    Initializer(
        name="corda", family="svd", config=CordaInit, apply=apply_corda, verify=verify_corda, mutates_base=True,
        needs_data=True, needs_grad=False, supports_quantized=False, preserves_outputs=True, calibration="samples",
    )
)
