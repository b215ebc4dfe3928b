"""Training a LoRA layer in the structured form ΔW = s·B·M·A, with an r×r intermediate M.

Two forms, both a torch parametrization of lora_B (lora_B = B·M), so the model stays a plain peft
LoRA model and folding the parametrization before saving leaves an ordinary adapter (lora_B = B·M,
lora_A = A) that `PeftModel.from_pretrained` loads as is:
- "intermediate": only M trains; B and A are frozen (LoRA-SB's R, NLoRA's IntTune);
- "all": B, M and A all train (NLoRA's StructuredLoRA form).
B and M are split from lora_B canonically (QR with a positive diagonal: B orthonormal, M upper
triangular), so a folded adapter and its structure name the same factors, and an initial adapter
on disk needs no file beside it.
"""

from __future__ import annotations

import torch
from torch.nn.utils import parametrize

from adapterflow.adapters.layers import lora_layers

STRUCTURES = ("intermediate", "all")  # which factors of B·M·A train


def split_left(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, M) with B·M = weight: B with orthonormal columns, M upper triangular with a positive diagonal (unique)."""
    basis, middle = torch.linalg.qr(weight.detach().float())
    signs = torch.where(torch.diagonal(middle) < 0, -1.0, 1.0)
    return (basis * signs).to(weight.dtype), (middle * signs[:, None]).to(weight.dtype)


class FixedLeftFactor(torch.nn.Module):
    """lora_B = B·M with B a frozen buffer; the parametrized tensor is M."""

    def __init__(self, basis: torch.Tensor):
        super().__init__()
        self.register_buffer("basis", basis)

    def forward(self, middle: torch.Tensor) -> torch.Tensor:
        return self.basis @ middle

    def right_inverse(self, weight: torch.Tensor) -> torch.Tensor:
        return self.basis.T @ weight  # exact: B has orthonormal columns and weight lies in their span


class TrainableLeftFactor(torch.nn.Module):
    """lora_B = B·M with both trained; the parametrized tensor is B stacked on M ((out + r) × r).

    One tensor, not two: peft's checkpoints, the Trainer's optimizer and the checkpoint merger all handle
    one parametrized weight per layer already; the optimizer (Adam, weight decay) treats each entry alone,
    so stacking changes nothing it computes.
    """

    def __init__(self, rank: int):
        super().__init__()
        self.rank = rank

    def forward(self, stacked: torch.Tensor) -> torch.Tensor:
        return stacked[: -self.rank] @ stacked[-self.rank :]

    def right_inverse(self, weight: torch.Tensor) -> torch.Tensor:
        return torch.cat(split_left(weight))


def train_structured(peft_model, trainable: str) -> None:
    """Reshape every LoRA layer into B·M·A, training `trainable` ("intermediate": only M; "all": B, M and A)."""
    if trainable not in STRUCTURES:
        raise ValueError(f"trainable must be one of {STRUCTURES}, got {trainable!r}")
    for _, module in lora_layers(peft_model):
        lora_a, lora_b = module.lora_A["default"], module.lora_B["default"]
        if trainable == "intermediate":
            lora_a.weight.requires_grad_(False)
            form = FixedLeftFactor(split_left(lora_b.weight)[0])
        else:
            form = TrainableLeftFactor(lora_b.weight.shape[1])
        parametrize.register_parametrization(lora_b, "weight", form, unsafe=True)


def train_middle_only(peft_model) -> None:
    """LoRA-SB: lora_B = B0·R with B0 the orthonormal factor of the initial B, A frozen."""
    train_structured(peft_model, "intermediate")


def structure_of(peft_model) -> str | None:
    """Which structure the model trains in ("intermediate", "all"), or None for plain LoRA."""
    for _, module in lora_layers(peft_model):
        lora_b = module.lora_B["default"]
        if parametrize.is_parametrized(lora_b, "weight"):
            form = lora_b.parametrizations.weight[0]
            return "intermediate" if isinstance(form, FixedLeftFactor) else "all"
    return None


def fold_middle(peft_model) -> None:
    """Replace every B·M parametrization by its value: a plain lora_B weight again."""
    for _, module in lora_layers(peft_model):
        lora_b = module.lora_B["default"]
        if parametrize.is_parametrized(lora_b, "weight"):
            parametrize.remove_parametrizations(lora_b, "weight", leave_parametrized=True)
