"""The Trainer for init methods with a regularizer (KaSA, SORSA): loss = task loss + weight × regularizer.

The unweighted regularizer, averaged over the steps since the last log, is logged as `regularizer` beside `loss`
(with `regularizer_weight`): the training journal records them as train/regularizer and train/regularizer_weight and
ships them to MLflow with the other step metrics. The logged `loss` is the total the optimizer saw; evaluation losses
stay the task loss alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import torch
from transformers import Trainer


@dataclass(frozen=True)
class BoundRegularizer:
    value: Callable[[object], torch.Tensor]  # (peft model) -> scalar tensor
    weight: float


def trainer_class(init_dir: Path, learning_rate: float):
    """What to build the run's Trainer with: the plain Trainer, or RegularizedTrainer when the init method has a regularizer."""
    regularizer = init_regularizer(init_dir, learning_rate)
    return Trainer if regularizer is None else partial(RegularizedTrainer, regularizer=regularizer)


def init_regularizer(init_dir: Path, learning_rate: float) -> BoundRegularizer | None:
    """The regularizer the init products name (their meta carries the method and its config), bound to that config."""
    from adapterflow.adapters.products import read_init_meta
    from adapterflow.adapters.registry import get_initializer

    meta = read_init_meta(init_dir)
    if "regularizer_init" not in meta:
        return None
    initializer = get_initializer(meta["method"])
    init = initializer.config.model_validate(meta["regularizer_init"])
    value = initializer.regularizer.value
    return BoundRegularizer(lambda model: value(model, init), float(initializer.regularizer.weight(init, learning_rate)))


class RegularizedTrainer(Trainer):
    def __init__(self, *args, regularizer: BoundRegularizer, **kwargs):
        super().__init__(*args, **kwargs)
        self.regularizer = regularizer
        self._values: list[torch.Tensor] = []  # since the last log

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        if model.training:  # evaluation (prediction_step) scores the task alone
            loss = loss + self._regularizer_term(model, num_items_in_batch)
        return (loss, outputs) if return_outputs else loss

    def _regularizer_term(self, model, num_items_in_batch) -> torch.Tensor | float:
        weight = self.regularizer.weight
        with torch.set_grad_enabled(torch.is_grad_enabled() and weight > 0):
            value = self.regularizer.value(self.accelerator.unwrap_model(model))
        self._values.append(value.detach())
        if weight == 0:
            return 0.0
        # Once per optimizer step, however many micro-batches it accumulates.
        if self._loss_left_unscaled_for_accumulation(num_items_in_batch):
            weight = weight / self.current_gradient_accumulation_steps
        return weight * value

    def _loss_left_unscaled_for_accumulation(self, num_items_in_batch) -> bool:
        """True where training_step will not divide this loss by the accumulation steps (transformers 5.24's rule there)."""
        if self.loss_is_scaled_for_ga is not None:
            return self.loss_is_scaled_for_ga
        return bool(self.model_accepts_loss_kwargs and num_items_in_batch is not None) or self.compute_loss_func is not None

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._values:  # a training log, not an evaluation's
            logs["regularizer"] = torch.stack(self._values).float().mean().item()
            logs["regularizer_weight"] = self.regularizer.weight  # SORSA's default depends on the run's learning rate
            self._values.clear()
        super().log(logs, start_time)
