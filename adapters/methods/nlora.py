"""NLoRA (Guo, Chang & Wu 2025, arXiv:2502.14482): a Nyström approximation of W as ΔW = s·B·M·A, trained in that form.

The three-matrix form (StructuredLoRA) puts an r×r intermediate M between B and A. NLoRA initializes it
from sketches of W, without an SVD of W: with Gaussian Ω (in × k) and Ψ (out × 2k), k = r + oversampling,

    W ≈ W_nys = (W·Ω) · [Ψᵀ·W·Ω]_r⁺ · (Ψᵀ·W),

the generalized Nyström approximation (Nakatsukasa 2020) with its 2k × k core truncated to rank r:
with [Ψᵀ·W·Ω]_r = U_r·S_r·V_rᵀ, B = W·Ω·V_r, M = S_r⁻¹, A = U_rᵀ·Ψᵀ·W. Two passes over W (plus two per
power iteration) and an SVD of the small core only. Without oversampling (k = r, the core inverted
whole) the approximation is poor on flat spectra: on the demo's MiniLM it left 1.64× the optimal
rank-r residual, against 1.09× with oversampling 24 (bench/init_cost.py --only nlora).

As with PiSSA, W_nys moves into the adapter and the base keeps W − W_nys, so outputs are preserved.
`trainable` picks what trains: B, M and A (NLoRA), or only M (IntTune, the paper's IntermediateTune).
The factors are stored orthonormal (B, A) around an r×r core, as plain LoRA (lora_B = B·M); training
reshapes lora_B into B·M (adapters/frozen_factors.py) and saving folds it back.

The reference code (TracyGuo2001/NLoRA) takes W's first r columns and rows and W[:r, :r] itself as M
and leaves the base as it is: that product is not a Nyström approximation of W (it needs the core's
pseudo-inverse) and the model's outputs change at init. Random sketches instead of W's first rows and
columns: no coordinate is special in a weight matrix, and Gaussian sketches come with error bounds.
"""

from __future__ import annotations

import zlib
from typing import TYPE_CHECKING, Literal, NamedTuple

from pydantic import Field

from adapterflow.adapters.layers import delta_factors, lora_layers, short_name
from adapterflow.adapters.methods.basic import ranks_of
from adapterflow.adapters.registry import InitConfig, Initializer, register
from adapterflow.adapters.report import InitReport
from adapterflow.errors import InitError

if TYPE_CHECKING:
    import torch

# How much of W the residual keeps on the truncated sketches: 0 in exact arithmetic, ~1e-6 in float32,
# 1 for an empty adapter (plain LoRA's B = 0). 16-bit bases round the residual far more.
SKETCH_TOL = {"float32": 1e-3, "half": 5e-2}


class NloraInit(InitConfig):
    """ΔW = s·B·M·A from a Nyström sketch of W; `trainable: intermediate` is IntTune (only the r×r M trains)."""

    method: Literal["nlora"]
    trainable: Literal["all", "intermediate"] = "all"  # all: B, M and A train (NLoRA); intermediate: only M (IntTune)
    oversampling: int = Field(24, ge=0, le=1024)  # sketch widths k = r + oversampling (Ω) and 2k (Ψ)
    niter: int = Field(0, ge=0, le=16)  # power iterations on the range sketch (two more passes over W each)
    seed: int = Field(0, ge=0, lt=2**31)  # of the Gaussian sketches, drawn per layer with its name


class Sketch(NamedTuple):
    omega: torch.Tensor  # in × k, after the power iterations
    psi: torch.Tensor  # out × l
    range: torch.Tensor  # W·Ω, out × k
    core: tuple  # (U_r, S_r, V_r) of the l × k core Ψᵀ·W·Ω, in float64


def sketch(weight: torch.Tensor, r: int, plan: NloraInit, name: str) -> Sketch:
    """W's sketches for a rank-r Nyström approximation: the same for the same weight, seed and layer name."""
    import torch

    out_features, in_features = weight.shape
    k = min(r + plan.oversampling, out_features, in_features)
    generator = torch.Generator().manual_seed(zlib.crc32(f"{plan.seed}:{name}".encode()))
    omega = torch.randn(in_features, k, generator=generator).to(weight.device)
    psi = torch.randn(out_features, min(2 * k, out_features), generator=generator).to(weight.device)
    for _ in range(plan.niter):  # Ω ← orth(Wᵀ·orth(W·Ω)): sharpens the range on slowly decaying spectra
        omega = torch.linalg.qr(weight.T @ torch.linalg.qr(weight @ omega).Q).Q
    y = weight @ omega
    u, s, vh = torch.linalg.svd((psi.T @ y).double(), full_matrices=False)
    if not s[r - 1] > 1e-10 * s[0]:
        raise InitError(f"nlora: layer {name} has fewer than r = {r} independent directions; lower adapter.r for it")
    return Sketch(omega, psi, y, (u[:, :r], s[:r], vh[:r].T))


def nystrom(weight: torch.Tensor, r: int, plan: NloraInit, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, K, A) with W_nys = B·K·A: B (out × r) and A (r × in) orthonormal, K the r×r core."""
    import torch

    matrix = weight.detach().float()
    sk = sketch(matrix, r, plan, name)
    u_r, s_r, v_r = sk.core
    left = sk.range.double() @ v_r  # W·Ω·V_r
    right = u_r.T @ (sk.psi.T @ matrix).double()  # U_rᵀ·Ψᵀ·W
    q_left, r_left = torch.linalg.qr(left)
    q_right, r_right = torch.linalg.qr(right.T)
    return q_left.float(), ((r_left / s_r) @ r_right.T).float(), q_right.T.float()


def apply_nlora(model, settings, context):
    import torch
    from peft import get_peft_model

    from adapterflow.adapters.frozen_factors import train_structured

    plan = settings.init
    peft_model = get_peft_model(model, settings.lora_config(True))
    with torch.no_grad():
        spectra = {short_name(name): _init_layer(module, plan, short_name(name)) for name, module in lora_layers(peft_model)}
    train_structured(peft_model, plan.trainable)
    report = InitReport(method="nlora", ranks=ranks_of(peft_model), spectra=spectra)
    trains = "B, M and A train (NLoRA)" if plan.trainable == "all" else "only the r×r M trains (IntTune)"
    report.notes.append(f"Nyström sketch: oversampling {plan.oversampling}, {plan.niter} power iterations, seed {plan.seed}; {trains}")
    return peft_model, report


def _init_layer(module, plan: NloraInit, name: str) -> list[float]:
    """lora_A = A, lora_B = B·K/s (plain LoRA until training reshapes it); the base keeps W − W_nys."""
    import torch

    weight, r, scaling = module.base_layer.weight, module.r["default"], module.scaling["default"]
    left, core, right = nystrom(weight, r, plan, name)
    lora_a, lora_b = module.lora_A["default"], module.lora_B["default"]
    lora_a.weight.data = right.contiguous().to(lora_a.weight.dtype)
    lora_b.weight.data = (left @ core / scaling).contiguous().to(lora_b.weight.dtype)
    b, a, _ = delta_factors(module)  # what the adapter computes, so base + adapter = W to rounding
    weight.data = (weight.data.float() - scaling * (b @ a)).to(weight.dtype)
    return [round(v, 6) for v in torch.linalg.svdvals(core).tolist()]


def sketch_gaps(weight: torch.Tensor, residual: torch.Tensor, r: int, plan: NloraInit, name: str) -> tuple[float, float]:
    """How far W − residual is from W_nys, by the two properties that single it out among rank-r matrices: it
    reproduces W on Ω·V_r (residual·Ω·V_r = 0) and on Ψ·U_r (U_rᵀ·Ψᵀ·residual = 0). Relative to W there."""
    sk = sketch(weight, r, plan, name)
    u_r, _, v_r = sk.core
    omega_r, psi_r = sk.omega @ v_r.float(), sk.psi @ u_r.float()
    right = (residual @ omega_r).norm() / (weight @ omega_r).norm().clamp_min(1e-30)
    left = (psi_r.T @ residual).norm() / (psi_r.T @ weight).norm().clamp_min(1e-30)
    return right.item(), left.item()


def verify_nlora(peft_model, settings) -> dict[str, float]:
    from adapterflow.adapters.frozen_factors import structure_of

    plan, worst = settings.init, 0.0
    for name, module in lora_layers(peft_model):
        b, a, scaling = delta_factors(module)
        residual = module.base_layer.weight
        tol = SKETCH_TOL["float32" if residual.dtype.itemsize >= 4 else "half"]
        residual = residual.detach().float()
        gaps = sketch_gaps(residual + scaling * (b @ a), residual, module.r["default"], plan, short_name(name))
        worst = max(worst, *gaps)
        if max(gaps) > tol:
            raise InitError(
                f"nlora did not move the Nyström approximation of layer {short_name(name)} into its adapter: the "
                f"residual keeps {max(gaps):.1e} of W on the sketches (an empty adapter, plain LoRA, keeps 1)"
            )
    structure = structure_of(peft_model)
    if structure != plan.trainable:
        raise InitError(f"nlora: the adapter trains as {structure or 'plain LoRA'}, not in the B·M·A form with trainable {plan.trainable}")
    return {"max_sketch_residual": worst}


register(
    Initializer(
        name="nlora",
        family="svd",
        config=NloraInit,
        apply=apply_nlora,
        verify=verify_nlora,
        mutates_base=True,
        needs_data=False,
        needs_grad=False,
        supports_quantized=False,
        preserves_outputs=True,
        structured=True,
        spectrum_label="singular value of s·B·M·A (the Nyström approximation)",
    )
)
