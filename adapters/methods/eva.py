"""EVA: A from the SVD of each layer's input activations, ranks redistributed by explained variance.

peft's implementation, with the preprocessing step it needs (without `initialize_lora_eva_weights`
peft silently leaves plain LoRA); `verify_eva` proves it ran.
"""

from __future__ import annotations

import torch

from adapters.errors import InitError
from adapters.layers import delta_factors, lora_layers, short_name
from adapters.methods.basic import ranks_of
from adapters.registry import Initializer, register
from adapters.report import InitReport

ORTHONORMAL_TOL = 1e-3


def apply_eva(model, settings, context):
    from peft import EvaConfig, get_peft_model
    from peft.tuners.lora.eva import initialize_lora_eva_weights

    knobs = settings.knobs
    eva = EvaConfig(rho=knobs.get("rho", 2.0), tau=knobs.get("tau", 0.99), whiten=knobs.get("whiten", False))
    peft_model = get_peft_model(model, settings.lora_config("eva", eva_config=eva))
    try:
        initialize_lora_eva_weights(peft_model, dataloader=context.calibration, show_progress_bar=False)
    except ValueError as err:
        if "unpack" not in str(err):
            raise
        # peft's incremental PCA expects (batch, tokens, features) inputs at every target.
        raise InitError(
            "EVA needs token-level inputs at every target module, but one receives 2-D input (e.g. BERT's "
            "pooler.dense matched by the name 'dense'). Name the targets more precisely in adapter.target_modules "
            "(e.g. query, value, attention.output.dense)."
        ) from None
    report = InitReport(method="eva", ranks=ranks_of(peft_model))
    report.notes.append(f"rank budget {settings.r} x {len(report.ranks)} layers redistributed with rho={eva.rho}")
    return peft_model, report


def verify_eva(peft_model, settings) -> dict[str, float]:
    """Ranks sum to the budget; unwhitened A rows are orthonormal (Kaiming rows are not)."""
    ranks = ranks_of(peft_model)
    budget = settings.r * len(ranks)
    if sum(ranks.values()) != budget:
        raise InitError(f"EVA assigned {sum(ranks.values())} ranks in total, not the budget {budget}: {ranks}")
    worst = 0.0
    for name, module in lora_layers(peft_model):
        _, a, _ = delta_factors(module)
        worst = max(worst, (a @ a.T - torch.eye(a.shape[0])).abs().max().item())
        if not settings.knobs.get("whiten", False) and worst > ORTHONORMAL_TOL:
            raise InitError(f"EVA did not initialize layer {short_name(name)}: its A rows are not orthonormal (fell back to plain LoRA?)")
    return {"max_a_orthonormality_error": worst, "rank_budget": float(budget)}


register(
    Initializer(
        name="eva", family="variance", mutates_base=False, needs_data=True, needs_grad=False,
        supports_quantized=True, preserves_outputs=True, apply=apply_eva, verify=verify_eva,
    )
)
