"""`auto`: a race among initializers, each at a shared grid of learning rates, inside the run's own steps.

Only the race's config and flags live here (adapters never train): the init stage sees `is_race`
and runs the race (tasks/race.py). The config schema narrows `candidates` to the union of the
registered candidates' configs (tasks/config.py).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from adapterflow.adapters.registry import InitConfig, Initializer, race_candidates, register

# The share of train.max_steps the race's losing contenders may add: an auto run trains at most 10% more steps.
MAX_BUDGET = 0.1
# × train.learning_rate, log-spaced by 2 over a 16× span: the LR moves the result more than the init does.
DEFAULT_LR_MULTIPLIERS = (0.25, 0.5, 1.0, 2.0, 4.0)


def default_candidates() -> list[InitConfig]:
    return [candidate.default_config() for candidate in race_candidates() if candidate.in_default_race]


class AutoInit(InitConfig):
    """Candidates × learning rates race on the run's own schedule; a contender is cut only when its validation loss is
    worse than the leader's by more than `sigmas` times the noise of the two losses; the winner's race run goes on."""

    method: Literal["auto"]
    candidates: list[InitConfig] = Field(default_factory=default_candidates, min_length=2)
    lr_multipliers: list[float] = Field(default_factory=lambda: list(DEFAULT_LR_MULTIPLIERS), min_length=1)
    budget: float = Field(MAX_BUDGET, gt=0.0)  # share of the run's steps the losing contenders may spend, ≤ MAX_BUDGET
    sigmas: float = Field(2.0, gt=0.0, le=10.0)  # how far beyond the noise a loss difference must be to cut

    @field_validator("candidates", mode="before")
    @classmethod
    def _names_are_enough(cls, value):
        """`candidates: [lora, pissa]` is shorthand for `[{method: lora}, {method: pissa}]`."""
        return [{"method": v} if isinstance(v, str) else v for v in value] if isinstance(value, list) else value

    @field_validator("budget")
    @classmethod
    def _at_most_a_tenth(cls, value: float) -> float:
        if value > MAX_BUDGET:
            raise ValueError(
                f"adapter.init.budget is {value}, at most {MAX_BUDGET} is allowed: it is the share of train.max_steps the "
                "race's losing contenders may add (the winner's race steps are its own training). Lower it, or raise "
                "train.max_steps for a longer race"
            )
        return value

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
