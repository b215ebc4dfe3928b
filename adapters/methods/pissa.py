"""PiSSA: the adapter starts as the principal r singular components of W, the base keeps the rest.

Full SVD through peft's "pissa"; `niter` selects peft's randomized "pissa_niter_N".
"""

from __future__ import annotations

from adapters.invariants import check_principal, delta_spectra
from adapters.methods.basic import ranks_of
from adapters.registry import Initializer, register
from adapters.report import InitReport

# Randomized SVD without oversampling is only approximately principal (see STACK.md).
LEAK_TOL = {"full": 1e-3, "randomized": 0.5}
RATIO_TOL = {"full": 1e-3, "randomized": 1.0}


def apply_pissa(model, settings, context):
    from peft import get_peft_model

    niter = settings.knobs.get("niter")
    init_value = "pissa" if niter is None else f"pissa_niter_{niter}"
    peft_model = get_peft_model(model, settings.lora_config(init_value))
    kind = "full" if niter is None else "randomized"
    report = InitReport(method="pissa", ranks=ranks_of(peft_model), spectra=delta_spectra(peft_model))
    report.checks.update(check_principal("pissa", peft_model, LEAK_TOL[kind], RATIO_TOL[kind]))
    report.notes.append(f"svd: {kind}" + (f", niter={niter}" if niter is not None else ""))
    return peft_model, report


register(
    Initializer(
        name="pissa",
        family="svd",
        mutates_base=True,
        needs_data=False,
        needs_grad=False,
        supports_quantized=False,
        preserves_outputs=True,
        apply=apply_pissa,
    )
)
