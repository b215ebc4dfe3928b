"""SVD of the weights: the adapter takes r singular components of W, the base keeps the rest.

Our own, not peft's "pissa_niter_N": that one calls torch.svd_lowrank with q = r, i.e. without
oversampling, and loses most of its accuracy on slowly decaying spectra (bench/init_cost.py
measures it). Here q = r + oversampling. MiLoRA (the minor components) is not in peft at all.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from adapterflow.adapters.layers import lora_layers, short_name


@dataclass(frozen=True)
class SvdPlan:
    components: str  # "principal" | "minor"
    niter: int | None  # None: full SVD
    oversampling: int = 8


def decompose(weight: torch.Tensor, r: int, plan: SvdPlan) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U_r, S_r, Vh_r) of the chosen r components of `weight` (out × in), in float32."""
    matrix = weight.detach().float()
    if plan.components == "minor":
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
        return u[:, -r:], s[-r:], vh[-r:]
    if plan.niter is None:
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
        return u[:, :r], s[:r], vh[:r]
    q = min(r + plan.oversampling, min(matrix.shape))
    u, s, v = torch.svd_lowrank(matrix, q=q, niter=plan.niter)
    return u[:, :r], s[:r], v[:, :r].T


@torch.no_grad()
def apply_weight_svd(peft_model, plan: SvdPlan) -> dict[str, list[float]]:
    """Set A, B of every LoRA layer from the SVD and move that part out of the base weight."""
    spectra = {}
    for name, module in lora_layers(peft_model):
        weight = module.base_layer.weight
        r, scaling = module.r["default"], module.scaling["default"]
        if r > min(weight.shape):
            raise ValueError(f"rank {r} exceeds what layer {short_name(name)} {tuple(weight.shape)} allows ({min(weight.shape)})")
        u, s, vh = decompose(weight, r, plan)
        root = torch.sqrt(s / scaling)
        module.lora_A["default"].weight.data = (root[:, None] * vh).to(module.lora_A["default"].weight.dtype)
        module.lora_B["default"].weight.data = (u * root[None, :]).to(module.lora_B["default"].weight.dtype)
        delta = (u * s[None, :]) @ vh
        weight.data = (weight.data.float() - delta).to(weight.dtype)
        spectra[short_name(name)] = [round(v, 6) for v in s.tolist()]
    return spectra
