"""Run one registered initializer and check its invariants."""

from __future__ import annotations

import time
from dataclasses import replace

from adapterflow.adapters.context import InitContext
from adapterflow.adapters.registry import get_initializer
from adapterflow.adapters.report import InitReport
from adapterflow.adapters.settings import LoraSettings
from adapterflow.errors import InitError


def initialize(model, settings: LoraSettings, method: str, context: InitContext):
    """Wrap `model` with a LoRA adapter initialized by `method`; returns (peft_model, report)."""
    from adapterflow.adapters.invariants import check_outputs_preserved, model_outputs

    initializer = get_initializer(method)
    settings = with_init_config(settings, initializer)
    check_targets(model, settings.target_modules, settings.r)
    check_patterns(model, settings)
    if initializer.needs_data and context.calibration is None:
        raise InitError(f"init method {method!r} needs calibration data and got none; it will not fall back to plain LoRA.")
    before = model_outputs(model, context.probe) if initializer.preserves_outputs else None
    start = time.perf_counter()
    try:
        peft_model, report = initializer.apply(model, settings, context)
    except ValueError as err:
        raise InitError(_explain_peft_error(method, settings, err)) from None
    report.seconds = time.perf_counter() - start
    if initializer.verify is not None:
        report.checks.update(initializer.verify(peft_model, settings))
    if before is not None:
        report.checks["max_output_change"] = check_outputs_preserved(method, before, model_outputs(peft_model, context.probe))
    report.check_seconds = time.perf_counter() - start - report.seconds
    return peft_model, report


def with_init_config(settings: LoraSettings, initializer) -> LoraSettings:
    """The settings with the method's config: its defaults when none was given."""
    if settings.init is None:
        return replace(settings, init=initializer.default_config())
    if settings.init.method != initializer.name:
        raise InitError(f"init method {initializer.name!r} was given the config of {settings.init.method!r}")
    return settings


def check_targets(model, targets: tuple[str, ...], r: int) -> None:
    """Refuse target names that match no linear layer, and ranks a matched layer cannot hold."""
    import torch

    linear = {name: module for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}
    matched = {n: m for n, m in linear.items() if any(n == t or n.endswith("." + t) for t in targets)}
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in matched)]
    if missing:
        available = sorted({n.rsplit(".", 1)[-1] for n in linear})
        raise InitError(
            f"adapter.target_modules {missing} match no linear layer of the model. "
            f"Linear layer names in this model: {', '.join(available)}."
        )
    # in/out features, not weight.shape: a 4-bit weight is stored packed.
    shapes = {n: (m.out_features, m.in_features) for n, m in matched.items()}
    smallest = min(shapes, key=lambda n: min(shapes[n]))
    limit = min(shapes[smallest])
    if r > limit:
        raise InitError(f"adapter.r = {r} is larger than layer {smallest} {shapes[smallest]} allows; use r <= {limit}.")


def check_patterns(model, settings: LoraSettings) -> None:
    """Refuse rank/alpha pattern keys that match no adapted layer: peft would ignore them without a word."""
    import torch

    linear = (name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear))
    adapted = [n for n in linear if any(n == t or n.endswith("." + t) for t in settings.target_modules)]
    unmatched = settings.unmatched_patterns(adapted)
    if unmatched:
        raise InitError(f"adapter.rank_pattern / alpha_pattern keys {unmatched} match none of the adapted layers "
                        f"(e.g. {adapted[0]}); a key matches the end of a layer name, e.g. query or layer.0.attention.self.query.")


def _explain_peft_error(method: str, settings: LoraSettings, err: ValueError) -> str:
    text = str(err)
    if "not found in the base model" in text or "Target modules" in text:
        return (
            f"adapter.target_modules {list(settings.target_modules)} match no module of the model. "
            "Use names of linear layers in the model (e.g. query/value for BERT, q_proj/v_proj for Llama)."
        )
    return f"init method {method!r} failed: {text}"


__all__ = ["initialize", "InitReport"]
