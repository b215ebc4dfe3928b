"""EVA: A from the SVD of each layer's input activations, ranks redistributed by explained variance.

peft's implementation, with the preprocessing step it needs (without `initialize_lora_eva_weights`
peft silently leaves plain LoRA); `verify_eva` proves it ran. The report's spectra are the
explained-variance ratios of the components each layer kept, read from peft's own PCA.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from adapterflow.adapters.layers import delta_factors, lora_layers, short_name
from adapterflow.adapters.methods.basic import ranks_of
from adapterflow.adapters.registry import InitConfig, Initializer, register
from adapterflow.adapters.report import InitReport
from adapterflow.errors import InitError

ORTHONORMAL_TOL = 1e-3


class EvaInit(InitConfig):
    """SVD of layer-input activations over train batches; the rank budget r × layers is redistributed."""

    method: Literal["eva"]
    rho: float = Field(2.0, ge=1.0)  # a layer may get up to rho·r ranks
    tau: float = Field(0.99, gt=0.0, le=1.0)  # cosine similarity at which components count as converged
    whiten: bool = False


def apply_eva(model, settings, context):
    from peft import EvaConfig, get_peft_model
    from peft.tuners.lora.eva import initialize_lora_eva_weights

    eva = EvaConfig(rho=settings.init.rho, tau=settings.init.tau, whiten=settings.init.whiten)
    peft_model = get_peft_model(model, settings.lora_config("eva", eva_config=eva))
    seen, handles = watch_eva_hooks(peft_model)
    forward, passes = counted_forward(context.progress)
    try:
        initialize_lora_eva_weights(peft_model, dataloader=context.calibration, forward_fn=forward, show_progress_bar=False)
    except ValueError as err:
        if "unpack" not in str(err):
            raise
        # peft's incremental PCA expects (batch, tokens, features) inputs at every target.
        raise InitError(
            "EVA needs token-level inputs at every target module, but one receives 2-D input (e.g. BERT's "
            "pooler.dense matched by the name 'dense'). Name the targets more precisely in adapter.target_modules "
            "(e.g. query, value, attention.output.dense)."
        ) from None
    finally:
        for handle in handles:
            handle.remove()
    context.progress(passes(), passes())  # open-ended until now: it stopped when its components converged
    report = InitReport(method="eva", ranks=ranks_of(peft_model))
    report.notes.append(f"rank budget {settings.r} x {len(report.ranks)} layers redistributed with rho={eva.rho}")
    record_explained_variance(report, explained_variance(seen, report.ranks))
    return peft_model, report


def counted_forward(progress):
    """peft's default forward (`model(**inputs)`) that reports each calibration batch to `progress`.

    EVA cycles its batches until every layer's components converge, so the total is open (None).
    Returns the forward and a function giving the passes so far.
    """
    done = 0

    def forward(model, inputs):
        nonlocal done
        output = model(**inputs)
        done += 1
        progress(done, None)
        return output

    return forward, lambda: done


def watch_eva_hooks(peft_model):
    """Note the hooks peft's EVA attaches to each LoRA layer while it runs.

    peft 0.21 exposes no explained variance: get_eva_state_dict returns only the kept components, and
    the per-layer IncrementalPCA (with explained_variance_ratio_) lives in a forward hook it discards.
    A pre-hook sees those hooks at no cost; recomputing the PCA would cost another calibration pass.
    """
    from peft.tuners.lora.eva import HashHook, SVDHook

    seen = {HashHook: {}, SVDHook: {}}

    def note(module, args):
        for hook in module._forward_hooks.values():
            if type(hook) in seen:
                seen[type(hook)][short_name(hook.name)] = hook

    return seen, [module.register_forward_pre_hook(note) for _, module in lora_layers(peft_model)]


def explained_variance(seen, ranks: dict[str, int]) -> dict[str, list[float]]:
    """Per layer with ranks, the explained-variance ratios of all components peft computed.

    peft runs one PCA per distinct input (query and value of a BERT layer share one), grouping layers
    by the hash of their first input; the same grouping finds each layer's PCA.
    """
    from peft.tuners.lora.eva import HashHook, SVDHook

    hashes = {name: hook.hashed_inputs[0] for name, hook in seen[HashHook].items() if hook.hashed_inputs}
    pca_by_input = {hashes[name]: hook.svd for name, hook in seen[SVDHook].items()
                    if name in hashes and hasattr(hook.svd, "explained_variance_ratio_")}
    pcas = {name: pca_by_input.get(hashes[name]) for name in ranks if name in hashes}
    return {name: pca.explained_variance_ratio_.tolist() for name, pca in pcas.items() if pca is not None}


def record_explained_variance(report: InitReport, ratios: dict[str, list[float]]) -> None:
    """Spectra: the kept components' ratios per layer; checks: the smallest per-layer sum."""
    if not ratios or set(ratios) != set(report.ranks):
        report.notes.append("explained variance not recorded: peft's EVA hooks were not seen (peft internals changed?)")
        return
    report.spectra = {name: ratios[name][:rank] for name, rank in report.ranks.items()}
    kept = [sum(values) for values in report.spectra.values()]
    report.checks["min_explained_variance"] = min(kept)
    computed = max(len(values) for values in ratios.values())
    report.notes.append(f"explained variance of the kept components per layer: {min(kept):.3f} to {max(kept):.3f} "
                        f"(of up to {computed} computed)")


def verify_eva(peft_model, settings) -> dict[str, float]:
    """Ranks sum to the budget; unwhitened A rows are orthonormal (Kaiming rows are not)."""
    import torch

    ranks = ranks_of(peft_model)
    budget = settings.r * len(ranks)
    if sum(ranks.values()) != budget:
        raise InitError(f"EVA assigned {sum(ranks.values())} ranks in total, not the budget {budget}: {ranks}")
    worst = 0.0
    for name, module in lora_layers(peft_model):
        _, a, _ = delta_factors(module)
        worst = max(worst, (a @ a.T - torch.eye(a.shape[0])).abs().max().item())
        if not settings.init.whiten and worst > ORTHONORMAL_TOL:
            raise InitError(f"EVA did not initialize layer {short_name(name)}: its A rows are not orthonormal (fell back to plain LoRA?)")
    return {"max_a_orthonormality_error": worst, "rank_budget": float(budget)}


register(
    Initializer(
        name="eva", family="variance", config=EvaInit, apply=apply_eva, verify=verify_eva, mutates_base=False,
        needs_data=True, needs_grad=False, supports_quantized=True, preserves_outputs=True, in_default_race=True,
        spectrum_label="explained-variance ratio of kept component",
    )
)
