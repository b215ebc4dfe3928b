"""Gradient family: LoRA-GA and LoRA-SB start from G, the mean gradient of the loss w.r.t. each target weight.

G comes from peft's estimator (`preprocess_loraga`) on a few labelled training batches. LoRA-GA
has two scalings: peft's (B = U·S, only B rescaled) and the reference repository's
(Outsider565/LoRA-GA: B = U and A = Vᵀ both orthonormal, both rescaled), the default here. Only
the reference one makes the first LoRA step reproduce the top-2r part of G up to one scalar.
"""

from __future__ import annotations

import warnings
from itertools import islice
from typing import TYPE_CHECKING, Literal

from pydantic import Field

from adapterflow.adapters.context import reported
from adapterflow.adapters.layers import delta_factors, lora_layers, short_name
from adapterflow.adapters.methods.basic import ranks_of
from adapterflow.adapters.registry import InitConfig, Initializer, register
from adapterflow.adapters.report import InitReport
from adapterflow.errors import InitError

if TYPE_CHECKING:
    import torch

GRAD_ATTR = "_peft_loraga_grad"  # where peft's estimator leaves G on each target layer
KEPT_GRAD = "_adapterflow_init_grad"  # G kept on the LoRA layer for the checks (peft drops its own copy)
PEFT_SCALE_NAMES = {"stable": "stable", "unit": "unit", "gd": "gd_scale", "weight_svd": "weight_svd"}
SINGULAR_VECTOR_TOL = 0.05


class LoraGaInit(InitConfig):
    """B, A from the SVD of the mean gradient of W on a few train batches (W <- W - s·BA)."""

    method: Literal["lora_ga"]
    batches: int = Field(8, ge=1, le=10_000)  # labelled train batches whose mean gradient is decomposed
    direction: Literal["ArB2r", "ArBr", "A2rBr", "random"] = "ArB2r"  # which singular components go to A and B
    scale: Literal["stable", "unit", "gd", "weight_svd"] = "stable"
    stable_gamma: float = Field(16.0, gt=0)
    convention: Literal["reference", "peft"] = "reference"  # whose scaling: Outsider565/LoRA-GA's or peft's


def estimate_gradients(model, settings, context) -> int:
    """Attach G to every target layer (peft's `_peft_loraga_grad`); returns the batches used."""
    from peft import LoraGAConfig
    from peft.tuners.lora.loraga import preprocess_loraga

    batches = labelled_batches(context.calibration, settings.init.batches)

    def train_step():
        for batch in reported(batches, context.progress):
            model(**batch).loss.backward()

    with warnings.catch_warnings():
        # peft's counting hooks fire on outputs only, as intended: no input needs a gradient.
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        preprocess_loraga(model, settings.lora_config("lora_ga", lora_ga_config=LoraGAConfig()), train_step)
    for module in model.modules():
        if hasattr(module, GRAD_ATTR):
            setattr(module, KEPT_GRAD, getattr(module, GRAD_ATTR))
    return len(batches)


def labelled_batches(calibration, count: int) -> list[dict]:
    batches = list(islice(iter(calibration), count))
    if not batches or any("labels" not in batch for batch in batches):
        raise InitError("gradient-based init needs labelled training batches (with 'labels'); it will not fall back to plain LoRA.")
    return batches


def apply_lora_ga(model, settings, context):
    from peft import LoraGAConfig, get_peft_model

    init = settings.init
    used, spectra = estimate_gradients(model, settings, context), {}
    if init.convention == "peft":
        ga = LoraGAConfig(direction=init.direction, scale=PEFT_SCALE_NAMES[init.scale], stable_gamma=init.stable_gamma)
        peft_model = get_peft_model(model, settings.lora_config("lora_ga", lora_ga_config=ga))
    else:
        peft_model = get_peft_model(model, settings.lora_config(True))
        spectra = {short_name(name): _init_reference(module, init) for name, module in lora_layers(peft_model)}
    report = InitReport(method="lora_ga", ranks=ranks_of(peft_model), spectra=spectra)
    report.notes.append(f"gradients from {used} batches; {init.convention} scaling, direction {init.direction}, scale {init.scale}")
    return peft_model, report


def _init_reference(module, init: LoraGaInit) -> list[float]:
    """Outsider565/LoRA-GA: B, A are singular vectors of G, both multiplied by one factor; W <- W - s·BA.

    The SVD oversamples (q = 2r + max(2r, 24)) where the reference uses q = 4r: gradients of
    attention projections can have flat spectra, where q = 4r misses some of the top 2r components.
    """
    import torch

    from adapterflow.adapters.weight_svd import SvdPlan, decompose

    base = module.base_layer
    grad, r, scaling = getattr(base, GRAD_ATTR).float(), module.r["default"], module.scaling["default"]
    with torch.no_grad():
        u, s, vh = decompose(grad, 2 * r, SvdPlan("principal", niter=4, oversampling=max(2 * r, 24)))
        b_index, a_index = component_split(init.direction, r)
        factor = _reference_factor(init, base.weight, grad.shape[0], r, scaling)
        b, a = factor * u[:, b_index], factor * vh[a_index]
        dtype = base.weight.dtype
        module.lora_A["default"].weight.data = a.contiguous().to(dtype)
        module.lora_B["default"].weight.data = b.contiguous().to(dtype)
        base.weight.data = (base.weight.float() - scaling * (b.to(dtype).float() @ a.to(dtype).float())).to(dtype)
    return [round(v, 8) for v in s.tolist()]


def component_split(direction: str, r: int) -> tuple[list[int], list[int]]:
    """Which of the top 2r singular components go to B (columns) and A (rows): disjoint sets."""
    if direction == "ArBr":
        return list(range(0, 2 * r, 2)), list(range(1, 2 * r, 2))
    if direction == "A2rBr":
        return list(range(r)), list(range(r, 2 * r))
    if direction == "ArB2r":
        return list(range(r, 2 * r)), list(range(r))
    import torch

    order = torch.randperm(2 * r).tolist()
    return order[r:], order[:r]


def _reference_factor(init: LoraGaInit, weight, out_features: int, r: int, scaling: float) -> float:
    if init.scale == "stable":
        return out_features**0.25 / init.stable_gamma**0.5
    if init.scale == "gd":
        return 1.0 / scaling
    if init.scale == "weight_svd":
        import torch

        sigma = torch.svd_lowrank(weight.float(), q=min(4 * r, min(weight.shape)), niter=4)[1][:r] / scaling
        return float(sigma.sqrt().mean())
    return 1.0


def verify_lora_ga(peft_model, settings) -> dict[str, float]:
    """B's columns and A's rows are singular vectors of G (Kaiming rows and B = 0 are not)."""
    worst = 0.0
    for name, module in lora_layers(peft_model):
        grad = kept_gradient(module, name)
        b, a, _ = delta_factors(module)
        if b.norm() == 0:
            raise InitError(f"LoRA-GA did not initialize layer {short_name(name)}: B is zero (fell back to plain LoRA?)")
        worst = max(worst, singular_vector_residual(grad.T, b.T), singular_vector_residual(grad, a))
        if worst > SINGULAR_VECTOR_TOL:
            raise InitError(f"LoRA-GA did not initialize layer {short_name(name)}: "
                            f"its factors are not singular vectors of the gradient (residual {worst:.3f})")
    drop_gradients(peft_model)
    return {"max_singular_vector_residual": worst}


def kept_gradient(module, name: str) -> torch.Tensor:
    if not hasattr(module.base_layer, KEPT_GRAD):
        raise InitError(f"no gradient was estimated for layer {short_name(name)}: the gradient-based init did not run")
    return getattr(module.base_layer, KEPT_GRAD).float()


def singular_vector_residual(matrix: torch.Tensor, rows: torch.Tensor) -> float:
    """Largest ‖MᵀM x − (xᵀMᵀMx) x‖ / σ₁² over the normalized rows x: zero for right singular vectors of M.

    Columns of B are left singular vectors of G, i.e. right singular vectors of Gᵀ: pass (Gᵀ, Bᵀ).
    """
    import torch

    x = rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-30)
    gram_x = (x @ matrix.T) @ matrix  # rows: (MᵀM x)ᵀ
    rayleigh = (gram_x * x).sum(dim=1, keepdim=True)
    top = torch.linalg.matrix_norm(matrix, ord=2) ** 2
    return float((gram_x - rayleigh * x).norm(dim=1).max() / top.clamp_min(1e-30))


def drop_gradients(peft_model) -> None:
    """G is as large as the weights; free it once the checks have used it."""
    for _, module in lora_layers(peft_model):
        for attr in (GRAD_ATTR, KEPT_GRAD):
            if hasattr(module.base_layer, attr):
                delattr(module.base_layer, attr)


register(
    Initializer(
        name="lora_ga", family="gradient", config=LoraGaInit, apply=apply_lora_ga, verify=verify_lora_ga, mutates_base=True,
        needs_data=True, needs_grad=True, supports_quantized=False, preserves_outputs=True, in_default_race=True,
        spectrum_label="singular value of the mean gradient G",
    )
)
