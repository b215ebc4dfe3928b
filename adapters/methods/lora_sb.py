"""LoRA-SB: B, A from the SVD of the estimated first full-fine-tuning update, frozen; an r×r R between them trains.

The first Adam step moves W by about -lr·sign(G), so the update estimate is that (as in the
reference repository RaghavSinghal10/lora-sb). Its top-r SVD U·S·Vᵀ gives A = Vᵀ, B0 = U and
R = S/s, so the model starts at W + (top-r part of the first update); it does not preserve outputs.
Not in peft: gradients come from peft's LoRA-GA estimator, the rest is ours.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field

from adapterflow.adapters.layers import delta_factors, lora_layers, short_name
from adapterflow.adapters.methods.basic import ranks_of
from adapterflow.adapters.methods.gradient import drop_gradients, estimate_gradients, kept_gradient, singular_vector_residual
from adapterflow.adapters.registry import InitConfig, Initializer, register
from adapterflow.adapters.report import InitReport
from adapterflow.errors import InitError

if TYPE_CHECKING:
    import torch

FACTOR_TOL = 1e-3


class LoraSbInit(InitConfig):
    """Frozen B, A from the SVD of the estimated first update; only an r×r matrix between them trains."""

    run_defaults = {"update_lr": "first_step_lr"}

    method: Literal["lora_sb"]
    batches: int = Field(8, ge=1, le=10_000)
    update_lr: float | None = Field(None, gt=0, le=1.0)  # None: the learning rate of the first training step


def apply_lora_sb(model, settings, context):
    from peft import get_peft_model

    update_lr = settings.init.update_lr
    if not update_lr:
        raise InitError("lora_sb needs adapter.init.update_lr (the learning rate of the first training step).")
    used = estimate_gradients(model, settings, context)
    peft_model = get_peft_model(model, settings.lora_config(True))
    spectra = {short_name(name): _init_layer(module, update_lr) for name, module in lora_layers(peft_model)}
    report = InitReport(method="lora_sb", ranks=ranks_of(peft_model), spectra=spectra)
    report.notes.append(f"first update -{update_lr:g}·sign(G) from {used} batches; trains an r×r matrix per layer")
    return peft_model, report


def first_update(module, update_lr: float, name: str = "") -> torch.Tensor:
    return -update_lr * kept_gradient(module, name).sign()


def _init_layer(module, update_lr: float) -> list[float]:
    import torch

    from adapterflow.adapters.weight_svd import SvdPlan, decompose

    # Full SVD: sign matrices have flat spectra, where randomized SVD is inaccurate.
    r, scaling = module.r["default"], module.scaling["default"]
    with torch.no_grad():
        u, s, vh = decompose(first_update(module, update_lr), r, SvdPlan("principal", niter=None))
        module.lora_A["default"].weight.data = vh.contiguous().to(module.lora_A["default"].weight.dtype)
        module.lora_B["default"].weight.data = (u * (s / scaling)).contiguous().to(module.lora_B["default"].weight.dtype)
    return [round(v, 8) for v in s.tolist()]


def verify_lora_sb(peft_model, settings) -> dict[str, float]:
    """A's rows are right singular vectors of the update and s·B = update·Aᵀ, so s·B·A is its top-r part."""
    worst_factor, worst_vector = 0.0, 0.0
    for name, module in lora_layers(peft_model):
        update = first_update(module, settings.init.update_lr, name)
        b, a, scaling = delta_factors(module)
        if b.norm() == 0:
            raise InitError(f"LoRA-SB did not initialize layer {short_name(name)}: B is zero (fell back to plain LoRA?)")
        expected = update @ a.T
        worst_factor = max(worst_factor, float((scaling * b - expected).norm() / expected.norm().clamp_min(1e-30)))
        worst_vector = max(worst_vector, singular_vector_residual(update, a))
        if worst_factor > FACTOR_TOL or worst_vector > FACTOR_TOL:
            raise InitError(f"LoRA-SB did not initialize layer {short_name(name)} from the update's SVD "
                            f"(factor error {worst_factor:.2e}, singular-vector residual {worst_vector:.2e})")
    drop_gradients(peft_model)
    return {"max_factor_error": worst_factor, "max_singular_vector_residual": worst_vector}


register(
    Initializer(
        name="lora_sb", family="gradient", config=LoraSbInit, apply=apply_lora_sb, verify=verify_lora_sb, mutates_base=False,
        needs_data=True, needs_grad=True, supports_quantized=False, preserves_outputs=False, trains_middle_only=True,
        spectrum_label="singular value of the first update -lr·sign(G)",
    )
)
