"""`auto`: a race among initializers, each at a few learning rates; the winner's init and LR train.

Only the race's config and flags live here (adapters never train): the init stage sees `is_race`
and runs the race (tasks/race.py). The config schema narrows `candidates` to the union of the
registered candidates' configs (tasks/config.py).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from adapterflow.adapters.registry import InitConfig, Initializer, race_candidates, register


def default_candidates() -> list[InitConfig]:
    return [candidate.default_config() for candidate in race_candidates() if candidate.in_default_race]


class AutoInit(InitConfig):
    """Successive halving among candidates × learning rates within a step budget; the winner trains."""

    method: Literal["auto"]
    candidates: list[InitConfig] = Field(default_factory=default_candidates, min_length=2)
    lr_multipliers: list[float] = Field(default_factory=lambda: [0.5, 1.0, 2.0], min_length=1)  # × train.learning_rate
    budget: float = Field(0.15, gt=0.0, le=1.0)  # share of the run's training steps the whole race may use

    @field_validator("candidates", mode="before")
    @classmethod
    def _names_are_enough(cls, value):
        """`candidates: [lora, pissa]` is shorthand for `[{method: lora}, {method: pissa}]`."""
        return [{"method": v} if isinstance(v, str) else v for v in value] if isinstance(value, list) else value

    @model_validator(mode="after")
    def _distinct(self) -> "AutoInit":
        methods = [c.method for c in self.candidates]
        if len(set(methods)) != len(methods):
            raise ValueError(f"adapter.init.candidates lists a method twice: {methods}")
        if any(m <= 0 for m in self.lr_multipliers) or len(set(self.lr_multipliers)) != len(self.lr_multipliers):
            raise ValueError(f"adapter.init.lr_multipliers must be distinct and positive, got {self.lr_multipliers}")
        return self

    def rank_problem(self, r: int) -> str | None:
        """A candidate that cannot use r would fail mid-race: refuse it with the config."""
        return next((problem for candidate in self.candidates if (problem := candidate.rank_problem(r))), None)


register(
    Initializer(
        name="auto", family="search", config=AutoInit, apply=None, mutates_base=False, needs_data=True,
        needs_grad=False, supports_quantized=True, preserves_outputs=False, is_race=True,
    )
)
