"""Checkpoint merging by Metrics-Weighted Averaging (Choi & Yu 2025, arXiv:2504.18580).

The trainable adapter tensors of the last K checkpoints are averaged with weights from a metric:
    by loss:  w_i ∝ loss_i ** -penalty   (lower loss weighs more)
    by steps: w_i ∝ step_i ** penalty    (later checkpoints weigh more)
One penalty sharpens the weights whatever K is; penalty 0 is the uniform average.

Snapshots are taken in memory when the Trainer saves a checkpoint, in the tensors' effective form
(LoRA-SB's B0·R as its B), so the merge needs no checkpoint reloading and suits every init method.
peft's `add_weighted_adapter` is not used: it merges different adapters into a new one (and for
"linear" requires equal ranks and rescales factors by sqrt(w)), not snapshots of one adapter.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers import TrainerCallback

PARAMETRIZED = ".parametrizations.weight.original"


@dataclass
class Snapshot:
    step: int
    train_loss: float
    tensors: dict[str, torch.Tensor] = field(repr=False)


def mwa_weights(snapshots: list[Snapshot], penalty: float, weight_by: str) -> list[float]:
    if weight_by == "loss":
        raw = [max(s.train_loss, 1e-8) ** -penalty for s in snapshots]
    else:
        raw = [float(s.step) ** penalty for s in snapshots]
    total = sum(raw)
    return [r / total for r in raw]


def adapter_tensors(model) -> dict[str, torch.Tensor]:
    """CPU copies of the trainable tensors, a parametrized weight under its plain name and value."""
    tensors = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if name.endswith(PARAMETRIZED):
            module_name = name.removesuffix(PARAMETRIZED)
            tensors[module_name + ".weight"] = model.get_submodule(module_name).weight.detach().float().cpu().clone()
        else:
            tensors[name] = param.detach().float().cpu().clone()
    return tensors


def weighted_average(snapshots: list[Snapshot], weights: list[float]) -> dict[str, torch.Tensor]:
    return {name: sum(w * s.tensors[name] for s, w in zip(snapshots, weights)) for name in snapshots[0].tensors}


@torch.no_grad()
def load_tensors(model, tensors: dict[str, torch.Tensor]) -> None:
    """Into a model whose parametrizations are already folded (names as in `adapter_tensors`)."""
    params = dict(model.named_parameters())
    missing = sorted(set(tensors) - set(params))
    if missing:
        raise KeyError(f"merged tensors without a parameter in the model: {missing[:3]}")
    for name, value in tensors.items():
        params[name].copy_(value.to(params[name].dtype))


def last_logged_loss(log_history: list[dict]) -> float:
    losses = [entry["loss"] for entry in log_history if "loss" in entry]
    return float(losses[-1]) if losses else math.nan


class CheckpointSnapshots(TrainerCallback):
    """Keeps the last `keep` checkpoints' adapter tensors with the training loss logged by then."""

    def __init__(self, keep: int):
        self.snapshots: deque[Snapshot] = deque(maxlen=keep)

    def on_save(self, args, state, control, model=None, **kwargs):
        self.take(model, state)

    def take(self, model, state) -> None:
        if self.snapshots and self.snapshots[-1].step == state.global_step:
            return
        self.snapshots.append(Snapshot(state.global_step, last_logged_loss(state.log_history), adapter_tensors(model)))


def merge_report(snapshots: list[Snapshot], weights: list[float], spec) -> dict:
    return {
        "method": "metrics-weighted averaging", "weight_by": spec.weight_by, "penalty": spec.penalty,
        "checkpoints": [{"step": s.step, "train_loss": s.train_loss, "weight": w} for s, w in zip(snapshots, weights)],
    }


@dataclass(frozen=True)
class MergeChoice:
    """Merged or final adapter, judged on validation; the merge report (weights per checkpoint) beside it."""

    method: str
    weight_by: str
    penalty: float
    checkpoints: tuple[dict, ...]  # {"step", "train_loss", "weight"} per merged checkpoint
    metric: str
    split: str
    final: float
    merged: float
    chosen: str  # "merged" | "final"
    adapter_dir: str  # the chosen one, registered

    def to_dict(self) -> dict:
        return {**asdict(self), "checkpoints": list(self.checkpoints)}

    def tag_text(self) -> str:
        return f"{self.chosen} ({self.metric} on {self.split}: merged {self.merged:.4f}, final {self.final:.4f})"


def choose_adapter(config, base_ref, final_dir: str, merged_dir: str, report: dict) -> MergeChoice:
    """Both candidates on the validation split, judged by the gate metric; a tie keeps the final one.

    Validation, not the evaluation split: choosing on the split that is reported would bias it.
    """
    from adapterflow.tasks.config import LOWER_IS_BETTER
    from adapterflow.tasks.evaluate import evaluate_adapter

    metric = config.gate_metric()
    final = evaluate_adapter(config, base_ref, Path(final_dir), "validation")[metric]
    merged = evaluate_adapter(config, base_ref, Path(merged_dir), "validation")[metric]
    better = merged < final if metric in LOWER_IS_BETTER else merged > final
    return MergeChoice(
        method=report["method"], weight_by=report["weight_by"], penalty=report["penalty"], checkpoints=tuple(report["checkpoints"]),
        metric=metric, split="validation", final=final, merged=merged,
        chosen="merged" if better else "final", adapter_dir=merged_dir if better else final_dir,
    )


def merge_markdown(choice: MergeChoice) -> str:
    rows = "\n".join(f"| {c['step']} | {c['train_loss']:.4f} | {c['weight']:.3f} |" for c in choice.checkpoints)
    return (
        f"# Checkpoint merge ({choice.method}, by {choice.weight_by}, penalty {choice.penalty:g})\n\n"
        f"| step | train loss | weight |\n|---|---|---|\n{rows}\n\n"
        f"{choice.metric} on {choice.split}: merged {choice.merged:.4f}, final {choice.final:.4f}. "
        f"Registered: **{choice.chosen}**.\n"
    )
