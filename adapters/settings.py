"""The LoRA shape every initializer works on, with the method's own typed config and peft's variants."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from adapterflow.adapters.registry import InitConfig, Initializer, Refusal

VARIANTS = ("lora", "dora", "rslora")  # adapter.variant: what each LoRA layer computes (peft's use_dora / use_rslora)


@dataclass(frozen=True)
class LoraSettings:
    r: int
    alpha: float
    dropout: float
    target_modules: tuple[str, ...]
    task_type: str  # peft TaskType name: "SEQ_CLS" or "CAUSAL_LM"
    modules_to_save: tuple[str, ...] | None = None
    init: InitConfig | None = None  # the method's own config; None: its defaults
    variant: str = "lora"
    rank_pattern: dict[str, int] = field(default_factory=dict)  # peft's: module-name pattern -> rank
    alpha_pattern: dict[str, float] = field(default_factory=dict)  # peft's: module-name pattern -> alpha

    def lora_config(self, init_lora_weights, **extra):
        from peft import LoraConfig

        return LoraConfig(
            r=self.r,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=list(self.target_modules),
            modules_to_save=list(self.modules_to_save) if self.modules_to_save else None,
            task_type=self.task_type,
            init_lora_weights=init_lora_weights,
            use_dora=self.variant == "dora",
            use_rslora=self.variant == "rslora",
            rank_pattern=dict(self.rank_pattern),
            alpha_pattern=dict(self.alpha_pattern),
            **extra,
        )

    def unmatched_patterns(self, layer_names: list[str]) -> list[str]:
        """Pattern keys that match none of the adapted layers: peft would ignore them silently."""
        keys = [*self.rank_pattern, *self.alpha_pattern]
        return [key for key in dict.fromkeys(keys) if not any(pattern_matches(key, name) for name in layer_names)]


def pattern_matches(key: str, name: str) -> bool:
    """peft's rule (utils.other.get_pattern_key): the key, as a regex, matches the end of the name at a dot."""
    return re.match(rf"(.*\.)?({key})$", name) is not None


def variant_problem(initializer: Initializer, variant: str, loraplus: bool, rank_pattern: bool) -> Refusal | None:
    """Why this initializer cannot take the adapter's variant, LoRA+ or a rank_pattern, and what to use instead.

    rsLoRA, rank_pattern and alpha_pattern are fine with base-rewriting methods: their conversion to a
    plain LoRA delta (adapters/products.py) keeps each layer's scaling, whatever its r, alpha and rule.
    """
    from adapterflow.adapters.registry import Refusal

    name = initializer.name
    if variant == "dora" and initializer.mutates_base:
        return Refusal(f"adapter.variant dora cannot be combined with init method {name}: it rewrites the base, and DoRA's "
                       "magnitude does not carry over to the plain LoRA delta registered for the untouched base",
                       "use variant lora or rslora, or init lora, gaussian, orthogonal or eva")
    if variant == "dora" and initializer.trains_middle_only:
        return Refusal(f"adapter.variant dora cannot be combined with init method {name}, which trains only an r×r matrix "
                       "between frozen factors", "use variant lora or rslora, or another init method")
    if loraplus and initializer.trains_middle_only:
        return Refusal(f"adapter.loraplus_lr_ratio cannot be combined with init method {name}: its A is frozen, so the "
                       "ratio would only scale the learning rate", "remove adapter.loraplus_lr_ratio and set train.learning_rate")
    if loraplus and initializer.structured:
        return Refusal(f"adapter.loraplus_lr_ratio cannot be combined with init method {name}: it trains an r×r matrix "
                       "between B and A, which LoRA+'s B/A learning-rate split has no rate for",
                       "remove adapter.loraplus_lr_ratio and set train.learning_rate")
    if rank_pattern and initializer.assigns_ranks:
        return Refusal(f"adapter.rank_pattern cannot be combined with init method {name}, which sets every layer's rank "
                       "itself", "remove adapter.rank_pattern (alpha_pattern is fine)")
    return None
