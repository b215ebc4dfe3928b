"""The LoRA shape every initializer works on, with the method's own typed config."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from adapterflow.adapters.registry import InitConfig


@dataclass(frozen=True)
class LoraSettings:
    r: int
    alpha: float
    dropout: float
    target_modules: tuple[str, ...]
    task_type: str  # peft TaskType name: "SEQ_CLS" or "CAUSAL_LM"
    modules_to_save: tuple[str, ...] | None = None
    init: InitConfig | None = None  # the method's own config; None: its defaults

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
            **extra,
        )
