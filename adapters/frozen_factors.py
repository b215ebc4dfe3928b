"""LoRA-SB's training shape: A and B0 frozen, lora_B = B0·R with only the r×r R trainable.

A torch parametrization keeps the model a plain peft LoRA model; folding it before saving leaves
an ordinary adapter (lora_B = B0·R) that `PeftModel.from_pretrained` loads as is.
"""

from __future__ import annotations

import torch
from torch.nn.utils import parametrize

from adapterflow.adapters.layers import lora_layers


class FixedLeftFactor(torch.nn.Module):
    def __init__(self, basis: torch.Tensor):
        super().__init__()
        self.register_buffer("basis", basis)

    def forward(self, middle: torch.Tensor) -> torch.Tensor:
        return self.basis @ middle

    def right_inverse(self, weight: torch.Tensor) -> torch.Tensor:
        return self.basis.T @ weight  # exact: B0 has orthonormal columns and weight lies in their span


def train_middle_only(peft_model) -> None:
    """B = B0·R with B0 the orthonormal factor of the initial B (its QR), A frozen."""
    for _, module in lora_layers(peft_model):
        lora_a, lora_b = module.lora_A["default"], module.lora_B["default"]
        lora_a.weight.requires_grad_(False)
        basis, _ = torch.linalg.qr(lora_b.weight.detach().float())
        parametrize.register_parametrization(lora_b, "weight", FixedLeftFactor(basis.to(lora_b.weight.dtype)), unsafe=True)


def fold_middle(peft_model) -> None:
    """Replace every B0·R parametrization by its value: a plain lora_B weight again."""
    for _, module in lora_layers(peft_model):
        lora_b = module.lora_B["default"]
        if parametrize.is_parametrized(lora_b, "weight"):
            parametrize.remove_parametrizations(lora_b, "weight", leave_parametrized=True)
