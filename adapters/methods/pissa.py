"""SVD-of-the-weights family: PiSSA (principal components), MiLoRA (minor components), OLoRA (QR)."""

from __future__ import annotations

from adapters.invariants import check_principal, delta_spectra
from adapters.methods.basic import ranks_of
from adapters.registry import Initializer, register
from adapters.report import InitReport
from adapters.weight_svd import SvdPlan, apply_weight_svd

# Randomized SVD is approximately principal; full SVD exactly (up to float32).
LEAK_TOL = {"full": 1e-3, "randomized": 0.05}
RATIO_TOL = {"full": 1e-3, "randomized": 0.05}


def apply_pissa(model, settings, context):
    from peft import get_peft_model

    niter = settings.knobs.get("niter")
    plan = SvdPlan("principal", niter, settings.knobs.get("oversampling", 8))
    peft_model = get_peft_model(model, settings.lora_config(True))
    spectra = apply_weight_svd(peft_model, plan)
    kind = "full" if niter is None else "randomized"
    report = InitReport(method="pissa", ranks=ranks_of(peft_model), spectra=spectra)
    hint = " Raise adapter.init.oversampling or niter, or drop niter for a full SVD." if niter is not None else ""
    report.checks.update(check_principal("pissa", peft_model, LEAK_TOL[kind], RATIO_TOL[kind], hint))
    report.notes.append("svd: full" if niter is None else f"svd: randomized, niter={niter}, oversampling={plan.oversampling}")
    return peft_model, report


def apply_milora(model, settings, context):
    from peft import get_peft_model

    peft_model = get_peft_model(model, settings.lora_config(True))
    spectra = apply_weight_svd(peft_model, SvdPlan("minor", None))
    report = InitReport(method="milora", ranks=ranks_of(peft_model), spectra=spectra)
    report.checks["max_subspace_leak"] = max_leak(peft_model)
    report.notes.append("svd: full (minor components need the whole spectrum)")
    return peft_model, report


def apply_olora(model, settings, context):
    from peft import get_peft_model

    peft_model = get_peft_model(model, settings.lora_config("olora"))
    return peft_model, InitReport(method="olora", ranks=ranks_of(peft_model), spectra=delta_spectra(peft_model))


def max_leak(peft_model) -> float:
    from adapters.invariants import principal_split
    from adapters.layers import lora_layers

    return max(principal_split(module)[0] for _, module in lora_layers(peft_model))


for _name, _apply in (("pissa", apply_pissa), ("milora", apply_milora), ("olora", apply_olora)):
    register(
        Initializer(
            name=_name, family="svd", mutates_base=True, needs_data=False, needs_grad=False,
            supports_quantized=False, preserves_outputs=True, apply=_apply,
        )
    )
