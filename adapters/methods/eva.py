"""EVA: A from the principal components of each layer's input activations, ranks redistributed by explained variance.

Why not peft's incremental SVD (`initialize_lora_eva_weights` over a dataloader): it runs a randomized
SVD per layer per batch and cycles the batches until every component's cosine to its previous value
reaches tau, so it pays more forward passes, each with SVDs: on the demo (bench/init_cost.py --only
eva, 2 threads) 13 passes and 7.0 s, where this takes 8 and 3.0 s. Here each layer's input
covariance is accumulated over the calibration batches (one forward pass each, adapters/covariance.py)
and eigendecomposed after each batch until the kept components' span settles (tau, see Convergence);
peft still loads the result (its `eva_state_dict` path), so rank-0 layers, rank_pattern and alpha
scaling stay peft's.
`verify_eva` proves the components were loaded (plain LoRA's A rows are not orthonormal).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from pydantic import Field

# torch and the covariance code are imported inside the functions: loading a config imports every method
# module, and `adapterflow check` must stay free of torch.
from adapterflow.adapters.layers import delta_factors, lora_layers, short_name
from adapterflow.adapters.methods.basic import ranks_of
from adapterflow.adapters.registry import InitConfig, Initializer, register
from adapterflow.adapters.report import InitReport
from adapterflow.errors import InitError

if TYPE_CHECKING:
    import torch

ORTHONORMAL_TOL = 1e-3
RHO_CEILING = 1000  # peft caps an unusually large rho at max weight dimension // r


class EvaInit(InitConfig):
    """PCA of layer-input activations over train batches; the rank budget r × layers is redistributed."""

    method: Literal["eva"]
    rho: float = Field(2.0, ge=1.0)  # a layer may get up to rho·r ranks
    tau: float = Field(0.99, gt=0.0, le=1.0)  # converged at this principal-angle cosine to the previous batch
    whiten: bool = False


def apply_eva(model, settings, context):
    from peft import EvaConfig, get_peft_model
    from peft.tuners.lora.eva import initialize_lora_eva_weights

    eva = EvaConfig(rho=settings.init.rho, tau=settings.init.tau, whiten=settings.init.whiten)
    peft_model = get_peft_model(model, settings.lora_config("eva", eva_config=eva))
    components, passes, converged = eva_components(peft_model, context.calibration, context.progress, settings.r, eva)
    context.progress(passes, passes)  # open-ended until now: it stopped when its components converged
    state = {name: parts.rows for name, parts in components.items()}
    initialize_lora_eva_weights(peft_model, eva_state_dict=state, show_progress_bar=False)
    report = InitReport(method="eva", ranks=ranks_of(peft_model))
    report.notes.append(f"rank budget {settings.r} x {len(components)} layers redistributed with rho={eva.rho}")
    report.notes.append(f"components from the input covariances of {passes} calibration batches, "
                        + ("converged at tau" if converged else f"not converged at tau={eva.tau} when the batches ran out"))
    record_explained_variance(report, {short_name(name): parts.ratios for name, parts in components.items()})
    return peft_model, report


@dataclass(frozen=True)
class LayerComponents:
    """One layer's kept A rows, and the explained-variance ratios of all components computed for it."""

    rows: torch.Tensor
    ratios: list[float]


def eva_components(peft_model, batches, progress, r: int, eva) -> tuple[dict[str, LayerComponents], int, bool]:
    """Per LoRA layer (peft's full name): its components, ranks distributed as peft's EVA does.

    Also returns the calibration batches used and whether the components converged before they ran out.
    """
    from peft.tuners.lora.eva import UNSUPPORTED_LORA_MODULES

    layers = {name: module for name, module in lora_layers(peft_model) if not isinstance(module, UNSUPPORTED_LORA_MODULES)}
    watch = Convergence(_max_components(peft_model, r, eva.rho), r * len(layers), eva.tau, progress)
    covariances = layer_covariances(peft_model, layers, batches, eva, watch)
    unseen = sorted(short_name(name) for name in layers if name not in covariances.owner)
    if unseen:  # peft would leave them plain LoRA
        why = "" if covariances.batches else " (no calibration batches)"
        raise InitError(f"EVA saw no calibration input at {', '.join(unseen[:5])}{why}")
    result = {}
    for name, rank in watch.ranks.items():
        vectors, ratios, singular = watch.pcas[covariances.owner[name]]
        rows = vectors[:rank]
        if eva.whiten:  # as peft: each component divided by the square root of its singular value
            rows = rows / singular[:rank].sqrt().reshape(-1, 1)
        result[name] = LayerComponents(rows, ratios[: watch.max_components].tolist())
    return result, covariances.batches, watch.converged


class Convergence:
    """EVA's stopping rule on exact covariances: stop once, for every layer, the span of the components
    it is currently given has principal-angle cosines ≥ tau to the same span one batch earlier.

    peft compares component by component. With exact covariances two components of near-equal variance
    swap order from batch to batch while their span stays put, so that rule keeps cycling: on the demo
    it took 18 batches where the span had settled after 8 (the A rows' span is what LoRA trains).
    The pass also ends when the batches run out.
    """

    def __init__(self, max_components: int, budget: int, tau: float, progress):
        self.max_components, self.budget, self.tau, self.progress = max_components, budget, tau, progress
        self.pcas: dict = {}
        self.ranks: dict[str, int] = {}
        self.converged = False

    def __call__(self, covariances) -> bool:
        self.progress(covariances.batches, None)
        previous = self.pcas
        from adapterflow.adapters.covariance import principal_components

        self.pcas = {first: principal_components(moments.scatter()) for first, moments in covariances.moments.items()}
        ratios = {first: pca[1][: self.max_components] for first, pca in self.pcas.items()}
        self.ranks = distribute_ranks(ratios, covariances.owner, self.budget)
        self.converged = set(previous) == set(self.pcas) and all(
            self._settled(previous[first][0], self.pcas[first][0], self.ranks[layer])
            for layer, first in covariances.owner.items())
        return self.converged

    def _settled(self, before: torch.Tensor, now: torch.Tensor, rank: int) -> bool:
        import torch

        return rank == 0 or bool(torch.linalg.svdvals(before[:rank] @ now[:rank].T).min() >= self.tau)


def layer_covariances(peft_model, layers, batches, eva, enough):
    """Input moments per shared input, over one pass; adapters off and dropout off, as in peft's EVA."""
    device = next(peft_model.parameters()).device
    moved = ({key: value.to(device) if hasattr(value, "to") else value for key, value in batch.items()} for batch in batches)
    from adapterflow.adapters.covariance import NotTokenLevel, attention_token_mask, collect_covariances

    mask = attention_token_mask(eva.label_mask_value if eva.use_label_mask else None)
    training = peft_model.training
    peft_model.eval()
    try:
        with peft_model.disable_adapter():
            return collect_covariances(peft_model, layers, moved, mask, enough)
    except NotTokenLevel:
        raise InitError(
            "EVA needs token-level inputs at every target module, but one receives 2-D input (e.g. BERT's "
            "pooler.dense matched by the name 'dense'). Name the targets more precisely in adapter.target_modules "
            "(e.g. query, value, attention.output.dense)."
        ) from None
    finally:
        peft_model.train(training)


def _max_components(model, r: int, rho: float) -> int:
    if rho > RHO_CEILING:
        rho = min(rho, max(max(p.shape) for p in model.parameters()) // r)
    return round(r * rho)


def distribute_ranks(ratios: dict[str, torch.Tensor], owner: dict[str, str], budget: int) -> dict[str, int]:
    """The `budget` largest explained-variance ratios over all layers, counted per layer (EVA's rule, as in peft).

    Layers sharing an input share its ratios. The stable sort breaks their ties in `owner`'s order, where
    a group's first layer comes first, so it gets the larger count, as peft gives it to its hooked layer.
    """
    keys = [layer for layer, first in owner.items() for _ in ratios[first]]
    import torch

    values = torch.cat([ratios[first] for first in owner.values()])
    chosen = Counter(keys[i] for i in values.argsort(descending=True, stable=True)[:budget].tolist())
    return {layer: chosen.get(layer, 0) for layer in owner}


def record_explained_variance(report: InitReport, ratios: dict[str, list[float]]) -> None:
    """Spectra: the kept components' ratios per layer; checks: the smallest per-layer sum."""
    kept_layers = {name: rank for name, rank in report.ranks.items() if name in ratios}
    report.spectra = {name: ratios[name][:rank] for name, rank in kept_layers.items()}
    kept = [sum(values) for values in report.spectra.values()]
    report.checks["min_explained_variance"] = min(kept)
    computed = max(len(values) for values in ratios.values())
    report.notes.append(f"explained variance of the kept components per layer: {min(kept):.3f} to {max(kept):.3f} "
                        f"(of up to {computed} computed)")


def verify_eva(peft_model, settings) -> dict[str, float]:
    """Ranks sum to the budget r × target layers; unwhitened A rows are orthonormal (Kaiming rows are not)."""
    import torch

    ranks = ranks_of(peft_model)
    budget = settings.r * target_layer_count(peft_model, settings)
    if sum(ranks.values()) != budget:
        raise InitError(f"EVA assigned {sum(ranks.values())} ranks in total, not the budget {budget}: {ranks}")
    worst = 0.0
    for name, module in lora_layers(peft_model):
        _, a, _ = delta_factors(module)
        worst = max(worst, (a @ a.T - torch.eye(a.shape[0])).abs().max().item())
        if not settings.init.whiten and worst > ORTHONORMAL_TOL:
            raise InitError(f"EVA did not initialize layer {short_name(name)}: its A rows are not orthonormal (fell back to plain LoRA?)")
    return {"max_a_orthonormality_error": worst, "rank_budget": float(budget)}


def target_layer_count(peft_model, settings) -> int:
    """Target layers, counting those EVA gave rank 0 (peft puts their plain base layer back)."""
    import torch
    from peft.tuners.lora import LoraLayer
    from peft.tuners.tuners_utils import check_target_module_exists
    from transformers.pytorch_utils import Conv1D

    config = settings.lora_config(True)
    model = peft_model.get_base_model()
    return sum(1 for name, module in model.named_modules()
               if isinstance(module, (LoraLayer, torch.nn.Linear, Conv1D)) and check_target_module_exists(config, name))


register(
    Initializer(
        name="eva", family="variance", config=EvaInit, apply=apply_eva, verify=verify_eva, mutates_base=False,
        needs_data=True, needs_grad=False, supports_quantized=True, preserves_outputs=True, in_default_race=True,
        spectrum_label="explained-variance ratio of kept component", assigns_ranks=True,
    )
)
