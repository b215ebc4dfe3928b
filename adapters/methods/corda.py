"""CorDA: SVD of W·C, C the covariance of the layer's inputs on calibration samples (peft, with the input
covariances gathered by adapters/covariance.py, shared with EVA).

IPM keeps the components that matter for the task data (the adapter trains them); KPM keeps the
components that matter for a "knowledge" dataset in the frozen base. Each sample's inputs are
normalized on their own (as peft does), so the calibration iterable yields batch-size-1 inputs.
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
    import tempfile
    from pathlib import Path

    import torch
    from peft import get_peft_model
    from peft.tuners.lora.config import CordaConfig
    from peft.tuners.lora.corda import preprocess_corda

    mode = settings.init.mode
    with tempfile.TemporaryDirectory() as folder:
        # peft reads covariances from this file instead of hooking the model itself.
        corda = CordaConfig(corda_method=mode, covariance_file=str(Path(folder) / "covariance.pt"))
        config = settings.lora_config("corda", corda_config=corda)
        torch.save(input_covariances(model, config, reported(context.calibration, context.progress)), corda.covariance_file)
        with torch.no_grad():
            preprocess_corda(model, config)
    corda.covariance_file = None  # gone; the adapter's saved config must not name it
    peft_model = get_peft_model(model, config)
    report = InitReport(method="corda", ranks=ranks_of(peft_model))
    report.notes.append(f"mode {mode}")
    return peft_model, report


def input_covariances(model, config, samples) -> dict:
    """Per target layer, the mean over samples of XᵀX with X the sample's inputs divided by their maximum.

    peft's own hooks compute exactly this (calib_cov_distribution); the shared collector sums each
    input once for layers that share it, in float64.
    """
    import torch
    from peft.tuners.lora.corda import target_modules

    from adapterflow.adapters.covariance import collect_covariances  # in here: `adapterflow check` imports no torch

    layers = dict(target_modules(model, config))
    model.eval()
    covariances = collect_covariances(model, layers, samples, token_mask=lambda sample: None,
                                      scale=lambda rows: rows.float() / rows.float().max().abs())
    unseen = sorted(name for name in layers if name not in covariances.owner)
    if unseen:
        raise InitError(f"CorDA saw no calibration input at {', '.join(unseen[:5])}")
    result = {name: (covariances.moments[covariances.owner[name]].outer / covariances.batches).float() for name in layers}
    if not all(torch.isfinite(matrix).all() for matrix in result.values()):
        raise InitError("CorDA found an invalid value (NaN or inf) in the inputs of a target layer")
    return result


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
