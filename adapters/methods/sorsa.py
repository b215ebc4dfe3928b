"""SORSA (arXiv 2409.00055): W = W_res + U·diag(S)·Vᵀ from the top-r SVD; U, S and V train under an orthonormality regularizer.

Not in peft; built on its LoRA layers. Init: A = Vᵀ, B = U·diag(S)/s (so s·B·A = U·diag(S)·Vᵀ), the base keeps
the residual, as for PiSSA. Training: B is a parametrization of one trainable tensor holding U above S, so U and
S train as separate factors as in the reference (Gunale0926/SORSA) and the regularizer sees U itself. On save the
parametrization is folded (plain lora_B) and, as for every base-rewriting method, the adapter becomes the rank-2r
delta s·(BA − B0A0) that loads on the untouched base.

The regularizer follows the reference's `calc_ortho`: the mean over the adapted layers' A and U of ‖AAᵀ−I‖_F and
‖UᵀU−I‖_F (norms, not squared). The reference adds its gradient scaled by γ/lr with γ = 4e-4 (its "learning rate of
the orthonormal regularizer"), so the default weight is 4e-4 / train.learning_rate.
"""

from __future__ import annotations

from functools import cache
from typing import TYPE_CHECKING, Literal

from pydantic import Field

from adapterflow.adapters.layers import delta_factors, lora_layers, short_name
from adapterflow.adapters.methods.basic import ranks_of
from adapterflow.adapters.registry import InitConfig, Initializer, Regularizer, register
from adapterflow.adapters.report import InitReport
from adapterflow.errors import InitError

if TYPE_CHECKING:
    import torch

REFERENCE_GAMMA = 4e-4
ORTHONORMAL_TOL = 1e-4
LEAK_TOL, RATIO_TOL = 1e-3, 1e-3  # full SVD: exactly principal up to float32, as PiSSA's


class SorsaInit(InitConfig):
    """Principal singular vectors and values of W, trained with an orthonormality regularizer on the vectors."""

    method: Literal["sorsa"]
    # The regularizer's weight in the loss; None: the reference's γ/lr, 4e-4 / train.learning_rate.
    regularizer_weight: float | None = Field(None, ge=0, le=1e4)


def apply_sorsa(model, settings, context):
    from peft import get_peft_model

    peft_model = get_peft_model(model, settings.lora_config(True))
    spectra = {short_name(name): _init_layer(module) for name, module in lora_layers(peft_model)}
    report = InitReport(method="sorsa", ranks=ranks_of(peft_model), spectra=spectra)
    weight = settings.init.regularizer_weight
    weight_text = f"{weight:g}" if weight is not None else f"{REFERENCE_GAMMA:g} / learning rate"
    report.notes.append(f"svd: full; regularizer weight {weight_text}")
    return peft_model, report


def _init_layer(module) -> list[float]:
    import torch

    from adapterflow.adapters.weight_svd import SvdPlan, decompose

    weight, lora_a, lora_b = module.base_layer.weight, module.lora_A["default"].weight, module.lora_B["default"].weight
    with torch.no_grad():
        u, s, vh = decompose(weight, module.r["default"], SvdPlan("principal", niter=None))
        lora_a.data = vh.contiguous().to(lora_a.dtype)
        lora_b.data = (u * (s / module.scaling["default"])).contiguous().to(lora_b.dtype)
        weight.data = (weight.data.float() - (u * s) @ vh).to(weight.dtype)
    return [round(v, 6) for v in s.tolist()]


def verify_sorsa(peft_model, settings) -> dict[str, float]:
    """B·A holds the principal components (PiSSA's check); A's rows and the columns of U = s·B/S are orthonormal."""
    from adapterflow.adapters.invariants import check_principal

    worst = 0.0
    for name, module in lora_layers(peft_model):
        b, a, _ = delta_factors(module)
        if b.norm() == 0:
            raise InitError(f"SORSA did not initialize layer {short_name(name)}: B is zero, as in plain LoRA")
        u = b / b.norm(dim=0).clamp_min(1e-30)
        error = max(off_identity(a @ a.T).item(), off_identity(u.T @ u).item())
        if error > ORTHONORMAL_TOL:
            raise InitError(f"SORSA: layer {short_name(name)}'s singular vectors are not orthonormal (‖·ᵀ· − I‖_F {error:.2e})")
        worst = max(worst, error)
    return {**check_principal("sorsa", peft_model, LEAK_TOL, RATIO_TOL), "max_orthonormality_error": worst}


def off_identity(gram: torch.Tensor) -> torch.Tensor:
    """‖G − I‖_F, in float32."""
    import torch

    return torch.linalg.matrix_norm(gram.float() - torch.eye(gram.shape[0], device=gram.device))


def train_vectors_and_values(peft_model) -> None:
    """Training form: every lora_B becomes U·diag(S)/s with U and S trainable (one stacked tensor)."""
    from torch.nn.utils import parametrize

    for _, module in lora_layers(peft_model):
        form = _vectors_times_values()(module.scaling["default"])
        parametrize.register_parametrization(module.lora_B["default"], "weight", form, unsafe=True)


@cache
def _vectors_times_values():
    """The parametrization's class, made on first use: importing the registry must not import torch."""
    import torch

    class VectorsTimesValues(torch.nn.Module):
        """lora_B = U·diag(S)/s from one trainable tensor: U (out × r) with S as its last row.

        One tensor, not two, as for NLoRA's trainable B·M: peft's checkpoints, the optimizer and the checkpoint merger
        handle one parametrized weight per layer; Adam and weight decay treat each entry alone either way.
        """

        def __init__(self, scaling: float):
            super().__init__()
            self.scaling = scaling

        def forward(self, stacked: torch.Tensor) -> torch.Tensor:
            return stacked[:-1] * (stacked[-1:] / self.scaling)

        def right_inverse(self, weight: torch.Tensor) -> torch.Tensor:
            norms = weight.norm(dim=0, keepdim=True).clamp_min(1e-30)  # S/s, exact while U's columns are orthonormal (at init)
            return torch.cat([weight / norms, norms * self.scaling])

    return VectorsTimesValues


def orthonormality(peft_model, init_config) -> torch.Tensor:
    """The reference's regularizer: mean of ‖AAᵀ−I‖_F and ‖UᵀU−I‖_F over the adapted layers."""
    import torch
    from torch.nn.utils import parametrize

    terms = []
    for name, module in lora_layers(peft_model):
        lora_b = module.lora_B["default"]
        if not parametrize.is_parametrized(lora_b, "weight"):
            raise InitError(f"SORSA: layer {short_name(name)} trains as plain LoRA (no U, S factors); it will not fall back.")
        u, a = lora_b.parametrizations.weight.original[:-1].float(), module.lora_A["default"].weight.float()
        terms += [off_identity(a @ a.T), off_identity(u.T @ u)]
    return torch.stack(terms).mean()


def regularizer_weight(init_config: SorsaInit, learning_rate: float) -> float:
    if init_config.regularizer_weight is not None:
        return init_config.regularizer_weight
    return REFERENCE_GAMMA / learning_rate


register(
    Initializer(
        name="sorsa",
        family="svd",
        config=SorsaInit,
        apply=apply_sorsa,
        verify=verify_sorsa,
        mutates_base=True,
        needs_data=False,
        needs_grad=False,
        supports_quantized=False,
        preserves_outputs=True,
        regularizer=Regularizer(orthonormality, regularizer_weight),
        training_form=train_vectors_and_values,
    )
)
