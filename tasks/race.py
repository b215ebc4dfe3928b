"""The race initializer (its `is_race` flag): successive halving among (init method, learning rate) contenders.

Every candidate gets its own small LR sweep, so the race compares methods at their own good LR:
data-driven inits lose much of their edge over LoRA once the LR is tuned per method. The whole
race spends at most `budget` × the run's training steps. Contenders train at a constant LR, are
ranked by validation loss after each round, and the better half goes on (resuming from its
checkpoint, with the HF Trainer). The winner's init products and LR are then used for the real run.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from adapterflow.errors import ConfigError


@dataclass
class Contender:
    method: str
    learning_rate: float
    init: object  # the candidate's init config
    steps: int = 0
    eval_losses: list[float] = field(default_factory=list)
    init_seconds: float = 0.0

    @property
    def label(self) -> str:
        return f"{self.method}@{self.learning_rate:g}"

    @property
    def last_loss(self) -> float:
        return self.eval_losses[-1] if self.eval_losses else math.inf


def halving_schedule(contenders: int, budget_steps: int) -> list[tuple[int, int]]:
    """[(contenders in the round, new steps for each)]: equal budget per round, half survive each round."""
    rounds = max(1, math.ceil(math.log2(contenders)))
    schedule, alive = [], contenders
    for _ in range(rounds):
        schedule.append((alive, budget_steps // (rounds * alive)))
        alive = math.ceil(alive / 2)
    return schedule


def race_plan(config) -> list[tuple[int, int]]:
    """The schedule, or a ConfigError naming the fix when the budget cannot give every contender a step."""
    from adapterflow.tasks.init_adapter import total_steps

    init = config.adapter.init
    contenders = len(init.candidates) * len(init.lr_multipliers)
    budget_steps = math.floor(init.budget * total_steps(config))
    schedule = halving_schedule(contenders, budget_steps)
    if schedule[0][1] < 1:
        needed = math.ceil(len(schedule) * contenders / init.budget)
        raise ConfigError(
            f"adapter.init {init.method}: {contenders} contenders ({len(init.candidates)} candidates × {len(init.lr_multipliers)} "
            f"learning rates) need at least {len(schedule) * contenders} race steps, but budget {init.budget} × "
            f"{total_steps(config)} training steps gives {budget_steps}. Raise train.max_steps to {needed} or more, "
            "raise adapter.init.budget, or list fewer candidates / lr_multipliers."
        )
    return schedule


def run_race(config, base_ref, run_dir: Path, cache_root: Path | None, train_md5: str | None = None) -> dict:
    """Race the contenders; returns the winner's init outcome, its LR and the race table."""
    from adapterflow.tasks.init_adapter import initialize_adapter

    schedule = race_plan(config)
    init = config.adapter.init
    outcomes, contenders = {}, []
    for candidate in init.candidates:
        for multiplier in init.lr_multipliers:
            contender = Contender(candidate.method, config.train.learning_rate * multiplier, candidate)
            arm_dir = run_dir / "race" / contender.label
            outcome = initialize_adapter(_arm_config(config, contender), base_ref, arm_dir, cache_root, train_md5)
            outcomes[contender.label], contender.init_seconds = outcome, outcome.seconds
            contenders.append(contender)
    alive = contenders
    for round_index, (_, steps) in enumerate(schedule):
        for contender in alive:
            _advance(config, base_ref, contender, steps, outcomes[contender.label].init_dir, run_dir / "race")
        alive = sorted(alive, key=lambda c: c.last_loss)
        _say_round(round_index, len(schedule), alive, steps)
        if round_index < len(schedule) - 1:
            alive = alive[: schedule[round_index + 1][0]]
    winner = alive[0]
    table = [dict(asdict(c), init=None, rounds=len(c.eval_losses), won=c is winner) for c in contenders]
    (run_dir / "race.json").write_text(json.dumps(table, indent=1))
    return {"winner": winner, "outcome": outcomes[winner.label], "table": table, "schedule": schedule}


def _say_round(round_index: int, rounds: int, ranked: list[Contender], steps: int) -> None:
    from adapterflow.flows.progress import say

    standings = ", ".join(f"{c.label} {c.last_loss:.4f}" for c in ranked)
    say(f"{'init race':<10} round {round_index + 1}/{rounds}: {len(ranked)} contenders × {steps} steps; validation loss {standings}")


def _with_init(config, init):
    return config.model_copy(update={"adapter": config.adapter.model_copy(update={"init": init})})


def _arm_config(config, contender: Contender, steps: int = 1):
    """The contender's run: its init, its LR, held constant (LoRA-SB's init follows that LR)."""
    train = config.train.model_copy(update={
        "learning_rate": contender.learning_rate, "lr_scheduler": "constant", "warmup_ratio": 0.0,
        "max_steps": steps, "epochs": None, "eval_every": None, "checkpoint_every": steps,
    })
    return _with_init(config, contender.init).model_copy(update={"train": train})


def _advance(config, base_ref, contender: Contender, steps: int, init_dir: str, race_dir: Path) -> None:
    """Train `steps` more steps (resuming the contender's checkpoint), then score it on validation loss."""
    from adapterflow.tasks.train import train_more

    contender.steps += steps
    arm_config = _arm_config(config, contender, contender.steps)
    contender.eval_losses.append(train_more(arm_config, base_ref, Path(init_dir), race_dir / contender.label))


def race_markdown(table: list[dict]) -> str:
    lines = ["| contender | init s | steps | eval loss by round | |", "|---|---|---|---|---|"]
    for row in sorted(table, key=lambda r: (-r["rounds"], r["eval_losses"][-1] if r["eval_losses"] else math.inf)):
        losses = " → ".join(f"{v:.4f}" for v in row["eval_losses"])
        contender, verdict = f"{row['method']} @ lr {row['learning_rate']:g}", "winner" if row["won"] else ""
        lines.append(f"| {contender} | {row['init_seconds']:.2f} | {row['steps']} | {losses} | {verdict} |")
    return "\n".join(lines) + "\n"
