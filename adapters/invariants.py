"""Invariants checked at run time, so a wrong or fallen-back initialization never trains."""

from __future__ import annotations

import torch

from adapterflow.adapters.layers import delta_factors, lora_layers, short_name
from adapterflow.errors import InitError

OUTPUT_ATOL = 1e-5


@torch.no_grad()
def model_outputs(model, probe: dict) -> torch.Tensor:
    was_training = model.training
    model.eval()
    out = model(**probe)
    model.train(was_training)
    return out.logits.detach().float().clone()


def check_outputs_preserved(method: str, before: torch.Tensor, after: torch.Tensor) -> float:
    """Largest change of the model's outputs, relative to their scale (at least 1)."""
    scale = max(1.0, before.abs().max().item())
    diff = (after - before).abs().max().item() / scale
    if not diff <= OUTPUT_ATOL:
        raise InitError(
            f"init method {method!r} changed the model's outputs by {diff:.2e} (relative); it must preserve them "
            f"to {OUTPUT_ATOL:.0e}. This is a bug in the initializer, not in your config."
        )
    return diff


@torch.no_grad()
def principal_split(module) -> tuple[float, float]:
    """For W = W_res + s·BA: (leak, ratio).

    leak  = |Q_B^T W_res| / |W_res|: 0 when BA and the residual live in orthogonal subspaces.
    ratio = sigma_max(W_res) / sigma_min(s·BA): <= 1 when BA holds the principal components.
    """
    b, a, scaling = delta_factors(module)
    residual = module.base_layer.weight.detach().float()
    q_b, _ = torch.linalg.qr(b)
    leak = (q_b.T @ residual).norm() / residual.norm().clamp_min(1e-12)
    delta_sv = _delta_singular_values(b, a, scaling)
    top_residual = _top_singular_value(residual)
    return leak.item(), (top_residual / delta_sv[-1].clamp_min(1e-12)).item()


def _delta_singular_values(b: torch.Tensor, a: torch.Tensor, scaling: float) -> torch.Tensor:
    """Singular values of s·B·A through two thin QRs and an r×r SVD."""
    q_b, r_b = torch.linalg.qr(b)
    q_a, r_a = torch.linalg.qr(a.T)
    return torch.linalg.svdvals(scaling * r_b @ r_a.T)


def _top_singular_value(matrix: torch.Tensor, iters: int = 30) -> torch.Tensor:
    """Power iteration: a cheap lower bound of sigma_max (a full SVD would cost as much as PiSSA)."""
    generator = torch.Generator().manual_seed(0)
    vector = torch.randn(matrix.shape[1], generator=generator)
    for _ in range(iters):
        vector = matrix.T @ (matrix @ vector)
        vector = vector / vector.norm().clamp_min(1e-30)
    return (matrix @ vector).norm()


def delta_spectra(peft_model, top: int = 64) -> dict[str, list[float]]:
    spectra = {}
    for name, module in lora_layers(peft_model):
        b, a, scaling = delta_factors(module)
        spectra[short_name(name)] = [round(v, 6) for v in _delta_singular_values(b, a, scaling)[:top].tolist()]
    return spectra


def check_principal(method: str, peft_model, leak_tol: float, ratio_tol: float, hint: str = "") -> dict[str, float]:
    worst_leak, worst_ratio = 0.0, 0.0
    for name, module in lora_layers(peft_model):
        leak, ratio = principal_split(module)
        worst_leak, worst_ratio = max(worst_leak, leak), max(worst_ratio, ratio)
        if leak > leak_tol or ratio > 1.0 + ratio_tol:
            raise InitError(
                f"init method {method!r}: layer {short_name(name)} does not hold the principal components "
                f"(subspace leak {leak:.2e}, residual/adapter top singular value ratio {ratio:.3f}).{hint}"
            )
    return {"max_subspace_leak": worst_leak, "max_residual_to_adapter_sv_ratio": worst_ratio}
