"""SVD-of-the-weights family: PiSSA (principal components), MiLoRA (minor components), OLoRA (QR)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from adapterflow.adapters.methods.basic import ranks_of
from adapterflow.adapters.registry import InitConfig, Initializer, register
from adapterflow.adapters.report import InitReport

# Full SVD is exactly principal (up to float32). Randomized SVD is approximately so: near a flat
# part of the spectrum sigma_(r+1) ~ sigma_r, so only a loose ratio is a fair run-time check; it
# still catches a fallback (B = 0: infinite ratio) or minor components (ratio >> 1).
LEAK_TOL = {"full": 1e-3, "randomized": 0.05}
RATIO_TOL = {"full": 1e-3, "randomized": 0.5}


class PissaInit(InitConfig):
    """Principal singular components of W; `niter` switches from full to randomized SVD."""

    method: Literal["pissa"]
    niter: int | None = Field(None, ge=0, le=64)  # None: full SVD; 2 is a good randomized choice
    oversampling: int = Field(24, ge=0, le=1024)  # randomized SVD uses q = r + oversampling


class MiloraInit(InitConfig):
    """Minor singular components of W (full SVD)."""

    method: Literal["milora"]


class OloraInit(InitConfig):
    """Orthonormal A, B from the QR decomposition of W."""

    method: Literal["olora"]


def apply_pissa(model, settings, context):
    from peft import get_peft_model

    from adapterflow.adapters.weight_svd import SvdPlan, apply_weight_svd

    niter = settings.init.niter
    plan = SvdPlan("principal", niter, settings.init.oversampling)
    peft_model = get_peft_model(model, settings.lora_config(True))
    spectra = apply_weight_svd(peft_model, plan)
    report = InitReport(method="pissa", ranks=ranks_of(peft_model), spectra=spectra)
    report.notes.append("svd: full" if niter is None else f"svd: randomized, niter={niter}, oversampling={plan.oversampling}")
    return peft_model, report


def verify_pissa(peft_model, settings) -> dict[str, float]:
    from adapterflow.adapters.invariants import check_principal

    niter = settings.init.niter
    kind = "full" if niter is None else "randomized"
    hint = " Raise adapter.init.oversampling or niter, or drop niter for a full SVD." if niter is not None else ""
    return check_principal("pissa", peft_model, LEAK_TOL[kind], RATIO_TOL[kind], hint)


def verify_split(peft_model, settings) -> dict[str, float]:
    return {"max_subspace_leak": max_leak(peft_model)}


def apply_milora(model, settings, context):
    from peft import get_peft_model

    from adapterflow.adapters.weight_svd import SvdPlan, apply_weight_svd

    peft_model = get_peft_model(model, settings.lora_config(True))
    spectra = apply_weight_svd(peft_model, SvdPlan("minor", None))
    report = InitReport(method="milora", ranks=ranks_of(peft_model), spectra=spectra)
    report.notes.append("svd: full (minor components need the whole spectrum)")
    return peft_model, report


def apply_olora(model, settings, context):
    from peft import get_peft_model

    from adapterflow.adapters.invariants import delta_spectra

    peft_model = get_peft_model(model, settings.lora_config("olora"))
    return peft_model, InitReport(method="olora", ranks=ranks_of(peft_model), spectra=delta_spectra(peft_model))


def max_leak(peft_model) -> float:
    from adapterflow.adapters.invariants import principal_split
    from adapterflow.adapters.layers import lora_layers

    return max(principal_split(module)[0] for _, module in lora_layers(peft_model))


for _name, _config, _apply, _verify in (
    ("pissa", PissaInit, apply_pissa, verify_pissa),
    ("milora", MiloraInit, apply_milora, verify_split),
    ("olora", OloraInit, apply_olora, None),
):
    register(
        Initializer(
            name=_name, family="svd", config=_config, apply=_apply, verify=_verify, mutates_base=True, needs_data=False,
            needs_grad=False, supports_quantized=False, preserves_outputs=True, in_default_race=_name == "pissa",
        )
    )
