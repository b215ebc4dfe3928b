"""Input covariances of target layers, gathered in one forward pass per calibration batch.

Each group of target layers that receive the same input tensor (a BERT layer's query, key and value)
is accumulated once. Sums are kept in float64: the scatter matrix is formed as Σxxᵀ − n·μμᵀ at the
end, which loses the variance to cancellation in float32 when the mean is large.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch

TokenMask = Callable[[dict], "torch.Tensor | None"]


class NotTokenLevel(ValueError):
    """A target layer's input is not (batch, tokens, features)."""

    def __init__(self, layer: str, shape: tuple[int, ...]):
        super().__init__(f"layer {layer} receives input of shape {shape}, not (batch, tokens, features)")
        self.layer = layer


@dataclass
class Moments:
    """Running count, sum and sum of outer products of one input's rows."""

    count: int = 0
    total: torch.Tensor | None = None
    outer: torch.Tensor | None = None

    def add(self, rows: torch.Tensor) -> None:
        rows = rows.detach().to(torch.float64)
        if self.total is None:
            self.total = rows.new_zeros(rows.shape[1])
            self.outer = rows.new_zeros(rows.shape[1], rows.shape[1])
        self.count += rows.shape[0]
        self.total += rows.sum(0)
        self.outer.addmm_(rows.T, rows)

    def scatter(self) -> torch.Tensor:
        """Σ (x − μ)(x − μ)ᵀ over all rows seen."""
        if not self.count:
            raise ValueError("no input rows were seen")
        return self.outer - torch.outer(self.total, self.total) / self.count


@dataclass
class Covariances:
    """Per group of layers sharing one input: its moments. `owner` maps each layer to its group's first layer."""

    moments: dict[str, Moments] = field(default_factory=dict)
    owner: dict[str, str] = field(default_factory=dict)
    batches: int = 0

    def groups(self) -> dict[str, list[str]]:
        grouped: dict[str, list[str]] = {}
        for layer, first in self.owner.items():
            grouped.setdefault(first, []).append(layer)
        return grouped


def attention_token_mask(label_mask_value: int | None = -100) -> TokenMask:
    """Tokens that count: attended ones, and where labels align with tokens, those not labelled `label_mask_value`.

    peft's EVA selects the same tokens (prepare_model_inputs_fn_language_modeling).
    """

    def mask(batch: dict) -> torch.Tensor | None:
        keep = batch.get("attention_mask")
        labels = batch.get("labels")
        if label_mask_value is not None and labels is not None and labels.shape == batch["input_ids"].shape:
            keep = (labels != label_mask_value) if keep is None else keep.bool() & (labels != label_mask_value)
        return None if keep is None else keep.bool()

    return mask


def collect_covariances(model, layers: dict[str, torch.nn.Module], batches: Iterable[dict],
                        token_mask: TokenMask = attention_token_mask(),
                        enough: Callable[[Covariances], bool] | None = None,
                        scale: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Covariances:
    """One forward per batch under no_grad, with forward pre-hooks on `layers` (name → module).

    `enough`, called after each batch, ends the pass early when it returns True; `scale` maps each
    batch's rows at a layer before they are summed (CorDA normalizes each sample).
    """
    result = Covariances()
    # per batch: token mask, input tensor → owning layer, hook calls so far; after the first batch, the calls a batch makes
    state: dict = {"mask": None, "seen": {}, "scale": scale, "calls": 0, "stop_after": None}
    handles = [module.register_forward_pre_hook(_hook(name, state, result)) for name, module in layers.items()]
    try:
        with torch.no_grad():
            for batch in batches:
                state["mask"], state["seen"], state["calls"] = token_mask(batch), {}, 0
                _forward_until_the_last_hook(model, batch)
                state["stop_after"] = state["stop_after"] or state["calls"]
                result.batches += 1
                if enough is not None and enough(result):
                    break
    finally:
        for handle in handles:
            handle.remove()
    return result


class _LastHookDone(Exception):
    """Raised by the batch's last hook call: nothing after it (later layers, the head) is needed."""


def _forward_until_the_last_hook(model, batch: dict) -> None:
    # The first batch runs whole and counts the hook calls a forward makes; later ones stop at the last call,
    # which skips whatever follows the last target layer (on the demo's attention targets EVA took ~4% less time).
    try:
        model(**batch)
    except _LastHookDone:
        pass


def _hook(name: str, state: dict, result: Covariances):
    def hook(module, args):
        inputs = args[0] if isinstance(args, tuple) else args
        if name not in result.owner:
            result.owner[name] = _same_input_owner(inputs, state["seen"]) or name
        state["seen"].setdefault(name, inputs)
        if result.owner[name] == name:  # otherwise its group's first layer holds the moments
            rows = _token_rows(name, inputs, state["mask"])
            result.moments.setdefault(name, Moments()).add(state["scale"](rows) if state["scale"] else rows)
        state["calls"] += 1
        if state["calls"] == state["stop_after"]:
            raise _LastHookDone

    return hook


def _same_input_owner(inputs: torch.Tensor, seen: dict[str, torch.Tensor]) -> str | None:
    """The first layer of this batch whose input equals `inputs` (grouping is fixed on the first batch)."""
    for layer, other in seen.items():
        if other is inputs or (other.shape == inputs.shape and torch.equal(other, inputs)):
            return layer
    return None


def _token_rows(name: str, inputs: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if inputs.ndim != 3:
        raise NotTokenLevel(name, tuple(inputs.shape))
    if mask is None:
        return inputs.reshape(-1, inputs.shape[-1])
    return inputs[mask.to(inputs.device)]


def principal_components(scatter: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(components as rows, explained-variance ratios, singular values of the centered data), largest first.

    One symmetric eigendecomposition: eigenvalues of the scatter matrix are the squared singular values
    of the centered data, and the ratios are those over its trace, as in peft's IncrementalPCA. The
    scatter is formed in float64 and decomposed in float32 (~7x faster at d = 384; components agree
    to ~1e-6).
    """
    scale = scatter.diagonal().sum().clamp_min(1e-300)
    values, vectors = torch.linalg.eigh((scatter / scale).float())
    values, vectors = values.flip(0).clamp_min(0.0), vectors.flip(1)
    return vectors.T.contiguous(), values, (values.double() * scale).sqrt().float()
