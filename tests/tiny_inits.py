"""What the initializer tests share: the two tiny architectures, their target layers, and a model with dropout off."""

from __future__ import annotations

import torch

from adapterflow.tasks.config import ModelSpec
from adapterflow.tasks.model_io import load_model, resolve_base

ARCHS = {  # arch: (task, target modules, peft task type)
    "bert": ("sequence_classification", ("query", "value"), "SEQ_CLS"),
    "llama": ("causal_lm", ("q_proj", "v_proj"), "CAUSAL_LM"),
}
R, ALPHA = 4, 8
LABELS = ["a", "b", "c"]


def tiny_model(folder, arch: str, dropout: bool = False):
    """Seeded; dropout off by default, so what an init computed from the model is what a test recomputes."""
    torch.manual_seed(0)
    model = load_model(resolve_base(ModelSpec(path=str(folder))), ARCHS[arch][0], LABELS)
    if not dropout:
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
    return model


def probe() -> dict:
    return {"input_ids": torch.randint(5, 2000, (2, 10), generator=torch.Generator().manual_seed(1))}
