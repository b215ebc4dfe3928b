"""init.method auto: successive halving among candidates × learning rates within the step budget."""

from __future__ import annotations

import json

import pytest
from conftest import cls_config, run_cli, write_config

from adapterflow.tasks.config import RunConfig
from adapterflow.tasks.race import halving_schedule


def test_halving_schedule_spends_the_budget_evenly_and_halves():
    schedule = halving_schedule(12, 120)
    assert [alive for alive, _ in schedule] == [12, 6, 3, 2]
    assert [steps for _, steps in schedule] == [2, 5, 10, 15]
    assert sum(alive * steps for alive, steps in schedule) <= 120


def _auto(tiny_bert, cls_data, **init):
    overrides = {"adapter.init": {"method": "auto", **init}, "train.max_steps": 40}
    return cls_config(tiny_bert, cls_data, **overrides)


def test_race_trains_the_winner_at_its_learning_rate_and_logs_every_contender(tiny_bert, cls_data, tmp_path):
    from adapterflow.tasks.init_adapter import initialize_adapter
    from adapterflow.tasks.model_io import resolve_base

    config = RunConfig.model_validate(_auto(tiny_bert, cls_data, candidates=["lora", "pissa"], lr_multipliers=[0.1, 1.0], budget=0.5))
    outcome = initialize_adapter(config, resolve_base(config.model), tmp_path / "run", tmp_path / "cache")
    report = json.loads(open(outcome.report_path).read())
    race = report["race"]
    assert len(race) == 4 and sum(row["won"] for row in race) == 1
    assert sum(row["steps"] for row in race) <= 0.5 * 40
    winner = next(row for row in race if row["won"])
    finalists = [row for row in race if row["rounds"] == 2]
    assert len(finalists) == 2 and winner in finalists
    assert winner["eval_losses"][-1] == min(row["eval_losses"][-1] for row in finalists)
    first_round = sorted(race, key=lambda row: row["eval_losses"][0])
    run_id = lambda row: row["method"] + str(row["learning_rate"])
    assert {run_id(row) for row in first_round[:2]} == {run_id(row) for row in finalists}
    assert (outcome.method, outcome.learning_rate) == (winner["method"], winner["learning_rate"])
    assert "won a race of 4 contenders" in report["notes"][-1]
    assert "winner" in open(outcome.race_path).read()


@pytest.mark.slow  # starts a fresh interpreter
def test_race_budget_too_small_is_refused_before_any_compute(tiny_bert, cls_data, tmp_path):
    config = write_config(tmp_path / "c.yaml", _auto(tiny_bert, cls_data, budget=0.05))
    result = run_cli("check", str(config), home=tmp_path / "state")
    assert result.returncode == 2
    assert "12 contenders" in result.stderr and "Raise train.max_steps to" in result.stderr


@pytest.mark.parametrize("init, expected", [
    ({"candidates": ["lora", "lora"]}, "lists a method twice"),
    ({"candidates": ["lora"]}, "adapter.init.auto.candidates"),
    ({"lr_multipliers": [1.0, -1.0]}, "distinct and positive"),
    ({"candidates": ["lora", "fancy"]}, "unknown init method 'fancy'"),
])
@pytest.mark.slow  # starts a fresh interpreter
def test_bad_race_settings_get_one_clear_error(tiny_bert, cls_data, tmp_path, init, expected):
    result = run_cli("check", str(write_config(tmp_path / "c.yaml", _auto(tiny_bert, cls_data, **init))), home=tmp_path / "state")
    assert result.returncode == 2 and expected in result.stderr
