"""init.method auto: a race among candidates × learning rates that cuts only on signal, inside the run's own steps."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import cls_config, run_cli, write_config

from adapterflow.errors import TrainingError
from adapterflow.tasks import race
from adapterflow.tasks.config import RunConfig
from adapterflow.tasks.race import Contender, Score, judge, plan_race, score


def _contender(method: str, multiplier: float, simplicity: tuple) -> Contender:
    return Contender(method, multiplier, 0.01 * multiplier, None, simplicity)


def _field(*specs) -> list[Contender]:
    """(method, multiplier) pairs; simplicity as the race derives it for lora (random family) and pissa (svd)."""
    families = {"lora": (0, False), "gaussian": (0, True), "pissa": (1, True)}
    places = {method: place for place, method in enumerate(dict.fromkeys(method for method, _ in specs))}
    return [_contender(method, m, (*families[method], places[method])) for method, m in specs]


def _race_with(monkeypatch, contenders, plan, losses_at, epochs: float = 1.0):
    """The race's rounds with training replaced by `losses_at(contender, step) -> per-example losses`, on a run of
    `epochs` passes over the train split."""
    monkeypatch.setattr(race, "_advance", lambda config, ref, c, target, race_dir: _trained(c, target, losses_at, epochs))
    config = SimpleNamespace(adapter=SimpleNamespace(init=SimpleNamespace(sigmas=2.0)))
    return race._run_rounds(config, None, contenders, plan, Path("unused"))


def _trained(contender: Contender, target: int, losses_at, epochs: float = 1.0) -> Score:
    contender.steps, contender.run_epochs = target, epochs
    return score(losses_at(contender, target))


SPREAD = torch.linspace(0.2, 1.8, 200)  # per-example losses with a spread: each mean's noise is about 0.033


def test_a_difference_within_the_noise_is_no_cut_and_a_large_one_is():
    noisy = torch.linspace(0.0, 2.0, 100)
    scores = {"a": score(noisy), "b": score(noisy + 0.05), "c": score(noisy + 1.0)}
    verdicts = judge(scores, sigmas=2.0)
    assert verdicts["a"] == (False, "leads")
    assert verdicts["b"][0] is False and verdicts["b"][1].startswith("behind a by paired Δ 0.0500") and "kept" in verdicts["b"][1]
    assert verdicts["c"][0] is True and verdicts["c"][1].startswith("worse than a by Δ 1.0000 > 2σ")
    diverged = judge({"a": score(noisy), "d": score(torch.tensor([1.0, math.nan]))}, 2.0)
    assert diverged["d"] == (True, "diverged (non-finite loss)")
    with pytest.raises(TrainingError, match="every contender"):
        judge({"d": score(None)}, 2.0)


def _offset(gap: float, wobble: float, seed: int = 0) -> torch.Tensor:
    """SPREAD shifted by `gap` give or take `wobble` per example: a gap far under each mean's noise (≈ 0.033)."""
    noise = torch.randn(len(SPREAD), generator=torch.Generator().manual_seed(seed))
    return SPREAD + gap + wobble * (noise - noise.mean())  # centred: the mean gap is exactly `gap`


def test_a_small_gap_is_cut_only_when_the_paired_gap_holds_over_two_rounds_at_a_slower_rate():
    leader, started = score(SPREAD), {"a": score(SPREAD + 0.02)}  # the leader's loss fell 0.02 since the first round
    first = judge({"a": leader, "b": score(_offset(0.01, 0.005))}, 2.0)
    assert first["b"][0] is False and first["b"][1].startswith("behind a by paired Δ 0.0100")  # one round is not enough
    before = {"a": leader, "b": score(_offset(0.01, 0.005))}
    held = judge({"a": leader, "b": score(_offset(0.012, 0.005, seed=1))}, 2.0, before, started)
    assert held["b"][0] is True and held["b"][1].startswith("consistently worse than a: paired Δ 0.0120")
    assert held["b"][1].endswith("60% of the leader's progress")
    head_start = judge({"a": leader, "b": score(_offset(0.012, 0.005, seed=1))}, 2.0, before, {"a": score(SPREAD + 0.05)})
    assert head_start["b"][0] is False and "24% of the leader's progress (0.0500), under 40%: a head start" in head_start["b"][1]
    closing = judge({"a": leader, "b": score(_offset(0.006, 0.005, seed=1))}, 2.0, before, started)
    assert closing["b"][0] is False and "kept" in closing["b"][1]  # still behind, but the gap shrank: it may catch up
    lost_in_noise = judge({"a": leader, "b": score(_offset(0.01, 0.3, seed=1))}, 2.0, before, started)
    assert lost_in_noise["b"][0] is False and lost_in_noise["b"][1].startswith("tied with a")


def test_a_consistently_better_contender_wins_the_race_though_its_lead_is_under_each_losss_noise(monkeypatch):
    contenders = _field(("lora", 1.0), ("pissa", 1.0))
    simpler, better = contenders
    plan = plan_race(len(contenders), 100, 0.1)  # 10 extra steps: rounds of 3 and 6 steps
    gap = lambda c, step: 0.0 if c is better else 0.02 * min(1.0, step / 5)  # noqa: E731 - grows, then holds
    losses = lambda c, step: _offset(gap(c, step) - 0.005 * step, 0.005, seed=2 * step + (c is better))  # noqa: E731 - all learn
    winner = _race_with(monkeypatch, contenders, plan, losses)
    assert winner is better and simpler.result == "cut" and simpler.why.startswith("round 2 (step 9): consistently worse than pissa@0.01")
    first, second = (r["verdict"] for r in simpler.rounds)
    assert first.startswith("behind pissa@0.01 by paired Δ 0.0120") and "0.0120 > 0.0010 a round before" in second
    assert second.endswith("67% of the leader's progress")  # it fell 0.03 from step 3 to 9; the gap is 0.02
    assert math.hypot(*(r["noise"] for r in (simpler.rounds[0], better.rounds[0]))) > 0.02  # unpaired, the gap is noise


def test_a_causal_lm_examples_loss_is_the_mean_over_its_own_answer_tokens():
    from torch.nn.functional import cross_entropy

    logits = torch.randn(2, 6, 11, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([[-100, -100, 3, 4, 5, -100], [-100, 7, 8, 9, 1, 2]])
    losses = race._example_losses(logits, labels, "causal_lm")
    for row in range(2):  # the logits at position t predict the label at t + 1
        kept = labels[row, 1:] != -100
        assert losses[row] == pytest.approx(cross_entropy(logits[row, :-1][kept], labels[row, 1:][kept]).item(), rel=1e-6)


def test_identical_contenders_are_never_cut_and_the_tie_goes_to_the_simplest_at_the_users_lr(monkeypatch):
    contenders = _field(("pissa", 1.0), ("lora", 0.5), ("lora", 2.0), ("lora", 1.0), ("gaussian", 1.0))
    plan = plan_race(len(contenders), 400, 0.1)
    winner = _race_with(monkeypatch, contenders, plan, lambda c, step: SPREAD / (1 + step / 100))
    assert [c.result for c in contenders].count("cut") == 0
    assert len(contenders[0].rounds) >= 2  # more steps were given to separate them, as far as the budget went
    assert all("tied with" in r["verdict"] and "Δ 0.0000" in r["verdict"] for c in contenders for r in c.rounds if r["verdict"] != "leads")
    assert winner.label == "lora@0.01" and winner.result == "winner"
    assert sum(c.steps for c in contenders) - winner.steps <= plan.extra_steps


def test_a_clearly_better_contender_wins_even_against_simpler_ones(monkeypatch):
    contenders = _field(("lora", 1.0), ("lora", 4.0), ("pissa", 1.0))
    better = contenders[2]
    plan = plan_race(len(contenders), 300, 0.1)
    winner = _race_with(monkeypatch, contenders, plan, lambda c, step: SPREAD + (0.0 if c is better else 0.5))
    assert winner is better
    assert [c.result for c in contenders] == ["cut", "cut", "winner"]
    assert contenders[0].why.startswith("round 1 (step ") and "worse than pissa@0.01 by Δ 0.5000 > 2σ" in contenders[0].why


def test_on_a_run_of_many_epochs_a_lower_lr_is_never_cut_for_trailing_a_larger_one():
    rates = {"lora@2e-3": 2e-3, "lora@4e-3": 4e-3, "lora@8e-3": 8e-3}
    scores = {"lora@2e-3": score(SPREAD + 1.0), "lora@4e-3": score(SPREAD), "lora@8e-3": score(SPREAD + 1.0)}
    short = judge(scores, 2.0, learning_rates=rates, epochs=2.0)
    assert short["lora@2e-3"][0] is True and short["lora@8e-3"][0] is True  # up to 3 epochs the early lead is trusted
    long = judge(scores, 2.0, learning_rates=rates, epochs=6.0)
    assert long["lora@2e-3"] == (False, "behind lora@4e-3 by Δ 1.0000, but at a lower LR (0.002 < 0.004) on a run of 6.0 "
                                        "epochs, over 3: a larger LR's early lead does not show whether it overfits later; kept")
    assert long["lora@8e-3"][0] is True  # a larger LR that trails is cut however long the run
    diverged = judge({**scores, "lora@2e-3": score(torch.tensor([math.inf]))}, 2.0, learning_rates=rates, epochs=6.0)
    assert diverged["lora@2e-3"] == (True, "diverged (non-finite loss)")


@pytest.mark.parametrize("epochs, winner", [(2.0, "lora@0.02"), (6.0, "lora@0.01")])
def test_the_race_raises_the_lr_on_a_short_run_and_leaves_it_on_a_long_one(monkeypatch, epochs, winner):
    contenders = _field(("lora", 1.0), ("lora", 2.0))
    faster = contenders[1]
    plan = plan_race(len(contenders), 300, 0.1)
    losses = lambda c, step: SPREAD - (0.02 if c is faster else 0.01) * step  # noqa: E731 - the larger LR falls faster
    assert _race_with(monkeypatch, contenders, plan, losses, epochs).label == winner
    assert race.race_table(contenders, plan, 2.0)["run_epochs"] == epochs
    assert ("passes over the train split" in race.race_markdown(race.race_table(contenders, plan, 2.0))) is (epochs > 3)


def test_a_runs_epochs_count_its_global_batches_over_the_encoded_train_split():
    args = SimpleNamespace(max_steps=1000, per_device_train_batch_size=8, gradient_accumulation_steps=2, world_size=1)
    assert race.run_epochs(SimpleNamespace(args=args, train_dataset=range(2696))) == pytest.approx(16000 / 2696)
    by_epochs = SimpleNamespace(args=SimpleNamespace(max_steps=-1, num_train_epochs=4.0), train_dataset=range(10))
    assert race.run_epochs(by_epochs) == 4.0


def test_the_losers_get_what_the_race_needs_and_no_more_than_the_budget():
    assert plan_race(4, 971, 0.1).extra_steps == 27  # 9 each for 3 losers, not 97: on a long run a tenth is far more
    assert plan_race(4, 200, 0.1).extra_steps == 20  # the budget caps it
    assert plan_race(20, 3000, 0.1).extra_steps == 171
    assert plan_race(4, 971, 0.1).first_round == 3  # rounds of 3 and 6 steps: both rounds the paired cut needs, by step 9


@pytest.mark.parametrize("seed", range(30))
def test_the_losers_never_spend_more_than_the_budget(monkeypatch, seed):
    rng = random.Random(seed)
    count, max_steps, budget = rng.randint(2, 20), rng.randint(40, 3000), rng.uniform(0.01, 0.1)
    plan = plan_race(count, max_steps, budget)
    if plan is None:
        assert math.floor(budget * max_steps) < count - 1
        return
    contenders = _field(*[("lora", 2.0**i) for i in range(count)])
    gaps = {c.label: rng.choice([0.0, 0.0, 0.02, 0.2]) for c in contenders}
    winner = _race_with(monkeypatch, contenders, plan, lambda c, step: SPREAD + gaps[c.label] * min(1.0, step / 20))
    extra = sum(c.steps for c in contenders) - winner.steps
    assert extra <= plan.extra_steps <= 0.1 * max_steps
    assert winner.steps <= max_steps and plan.max_steps + extra <= 1.1 * max_steps


FORTY_STEPS = {"train.max_steps": 40, "train.log_every": 1, "train.checkpoint_every": 20, "train.eval_every": 10}


def _auto_config(tiny_bert, cls_data, **init):
    return RunConfig.model_validate(cls_config(tiny_bert, cls_data, **{"adapter.init": {"method": "auto", **init}, **FORTY_STEPS}))


def _adapter_weights(folder: str) -> dict:
    from safetensors.torch import load_file

    return load_file(str(Path(folder) / "adapter_model.safetensors"))


def _logits_on_untouched_base(config, ref, adapter_dir: str):
    from peft import PeftModel

    from adapterflow.tasks.model_io import load_model, load_tokenizer

    torch.manual_seed(0)
    model = PeftModel.from_pretrained(load_model(ref, config.task, config.data.labels), adapter_dir).eval()
    probe = load_tokenizer(ref)(["play arcade puzzle", "audio synth midi"], return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**probe).logits


def test_an_absurd_learning_rate_is_cut_and_the_winners_race_run_is_continued_not_restarted(tiny_bert, cls_data, tmp_path, monkeypatch):
    from adapterflow.tasks import init_adapter
    from adapterflow.tasks.init_adapter import initialize_adapter
    from adapterflow.tasks.model_io import resolve_base
    from adapterflow.tasks.train import train_adapter

    computed = []
    compute = init_adapter._compute
    monkeypatch.setattr(init_adapter, "_compute", lambda config, *a: computed.append(config.adapter.init.method) or compute(config, *a))
    config = _auto_config(tiny_bert, cls_data, candidates=["pissa", "milora"], lr_multipliers=[1.0, 1000.0])
    ref = resolve_base(config.model)
    outcome = initialize_adapter(config, ref, tmp_path / "run", None)
    table = json.loads(Path(outcome.report_path).read_text())["race"]
    assert sorted(computed) == ["milora", "pissa"]  # each method's init once, shared by its two LRs
    absurd = [row for row in table["contenders"] if row["lr_multiplier"] == 1000.0]
    assert all(row["result"] == "cut" and row["steps"] == 1 for row in absurd)
    assert all("worse than" in row["why"] or "diverged" in row["why"] for row in absurd)
    assert (outcome.method, outcome.learning_rate) == ("pissa", 0.01)  # tied with milora: the earlier candidate
    assert table["total_steps"] == 40 + table["extra_steps"] <= 1.1 * 40
    assert table["run_epochs"] == round(40 * config.train.batch_size / 48, 2)  # 48 train rows

    train = config.model_copy(update={"train": config.train.model_copy(update={"learning_rate": outcome.learning_rate})})
    raced = train_adapter(train, ref, Path(outcome.init_dir), tmp_path / "run")
    log = json.loads((tmp_path / "run" / "train_log.json").read_text())
    assert raced.steps == 40 and [e["step"] for e in log if "loss" in e] == list(range(1, 41))  # the race's steps too
    # The run's own intervals, not the race checkpoint's (whose contenders were not evaluated by the Trainer).
    assert [e["step"] for e in log if "eval_loss" in e] == [10, 20, 30, 40]
    journal = [json.loads(line) for line in (tmp_path / "run" / "progress.jsonl").read_text().splitlines()]
    assert [r["step"] for r in journal if "train/loss" in r.get("metrics", {})] == list(range(1, 41))  # shipped to MLflow
    begin = next(r for r in journal if r["event"] == "begin")
    assert begin["step"] == table["winner_race_steps"] == 2  # training started at the race checkpoint, not at step 0

    plain_config = RunConfig.model_validate(cls_config(tiny_bert, cls_data, **{"adapter.init": {"method": "pissa"}, **FORTY_STEPS}))
    plain_init = initialize_adapter(plain_config, ref, tmp_path / "plain", None)
    plain = train_adapter(plain_config, ref, Path(plain_init.init_dir), tmp_path / "plain")
    raced_weights, plain_weights = _adapter_weights(raced.adapter_dir), _adapter_weights(plain.adapter_dir)
    assert raced_weights.keys() == plain_weights.keys()
    assert all(torch.allclose(raced_weights[k], plain_weights[k], atol=1e-6) for k in raced_weights)
    assert json.loads((Path(raced.adapter_dir) / "adapter_config.json").read_text())["r"] == 2 * 4  # PiSSA converted
    reloaded = _logits_on_untouched_base(config, ref, raced.adapter_dir)
    assert torch.allclose(reloaded, _logits_on_untouched_base(config, ref, plain.adapter_dir), atol=1e-5)
    assert not list((tmp_path / "run" / "race").glob("*/checkpoints"))  # the losers' checkpoints are gone


@pytest.mark.slow  # starts the accelerate launcher
def test_the_launcher_continues_the_winners_race_run(tiny_bert, cls_data, tmp_path):
    from adapterflow.tasks.init_adapter import initialize_adapter
    from adapterflow.tasks.launch import launch_training
    from adapterflow.tasks.model_io import resolve_base
    from adapterflow.tasks.train import train_adapter

    launched = {**FORTY_STEPS, "adapter.dropout": 0.1, "train.launch": {"mode": "accelerate"}}  # dropout: RNG state resumed too
    config = RunConfig.model_validate(cls_config(tiny_bert, cls_data, **{
        "adapter.init": {"method": "auto", "candidates": ["lora", "gaussian"], "lr_multipliers": [1.0, 1000.0]}, **launched}))
    ref = resolve_base(config.model)
    outcome = initialize_adapter(config, ref, tmp_path / "run", None)
    assert outcome.learning_rate == config.train.learning_rate  # the absurd arms are out
    raced = launch_training(config, ref, Path(outcome.init_dir), tmp_path / "run", say=lambda text: None)
    plain_config = RunConfig.model_validate(cls_config(tiny_bert, cls_data, **{
        "adapter.init": {"method": outcome.method}, **launched, "train.launch": {"mode": "in_process"}}))
    plain_init = initialize_adapter(plain_config, ref, tmp_path / "plain", None)
    plain = train_adapter(plain_config, ref, Path(plain_init.init_dir), tmp_path / "plain")
    raced_weights, plain_weights = _adapter_weights(raced.adapter_dir), _adapter_weights(plain.adapter_dir)
    assert raced.steps == 40 and all(torch.equal(raced_weights[k], plain_weights[k]) for k in plain_weights)


class Twin(Contender):
    """The same method at the same LR under another name: a contender no config can express."""

    @property
    def label(self) -> str:
        return f"twin-{super().label}"


def test_identical_real_contenders_tie_on_every_round_and_the_first_wins(tiny_bert, cls_data, tmp_path, monkeypatch):
    from adapterflow.tasks.init_adapter import initialize_adapter
    from adapterflow.tasks.model_io import resolve_base

    config = _auto_config(tiny_bert, cls_data, candidates=["lora", "gaussian"], lr_multipliers=[1.0])
    lora = config.adapter.init.candidates[0]
    twins = [Contender("lora", 1.0, 0.01, lora, (0, False, 0)), Twin("lora", 1.0, 0.01, lora, (0, False, 1))]
    monkeypatch.setattr(race, "contenders_of", lambda config: twins)
    outcome = initialize_adapter(config, resolve_base(config.model), tmp_path / "run", tmp_path / "cache")
    table = json.loads(Path(outcome.report_path).read_text())["race"]
    first, second = table["contenders"]
    assert (first["result"], second["result"]) == ("winner", "tied") and len(first["rounds"]) >= 2
    for own, other in zip(first["rounds"], second["rounds"]):
        assert own["eval_loss"] == other["eval_loss"] and own["noise"] > 0  # noise estimated, and no cut on it
        assert other["verdict"].startswith(f"tied with lora@0.01 by Δ 0.0000 ≤ 2σ {2 * math.hypot(own['noise'], own['noise']):.4f}")
    assert table["total_steps"] <= 1.1 * 40
    markdown = Path(outcome.race_path).read_text()
    assert "| winner |" in markdown and "tied when the budget ended; the tie went to lora@0.01" in markdown


def test_the_default_grid_is_log_spaced_and_shared_and_the_budget_is_capped(tiny_bert, cls_data):
    config = _auto_config(tiny_bert, cls_data)
    multipliers = config.adapter.init.lr_multipliers
    assert multipliers == [0.25, 0.5, 1.0, 2.0, 4.0]
    assert {b / a for a, b in zip(multipliers, multipliers[1:])} == {2.0}
    assert config.adapter.init.budget == 0.1
    with pytest.raises(ValueError, match="at most 0.1 is allowed"):
        _auto_config(tiny_bert, cls_data, budget=0.3)


@pytest.mark.slow  # starts a fresh interpreter
def test_race_budget_too_small_is_refused_before_any_compute(tiny_bert, cls_data, tmp_path):
    config = write_config(tmp_path / "c.yaml", cls_config(tiny_bert, cls_data, **{"adapter.init": {"method": "auto", "budget": 0.05},
                                                                                  "train.max_steps": 40}))
    result = run_cli("check", str(config), home=tmp_path / "state")
    assert result.returncode == 2
    assert "20 contenders" in result.stderr and "Raise train.max_steps to 380" in result.stderr


def test_a_race_too_short_to_decide_is_a_warning_and_a_long_one_is_not(tiny_bert, cls_data, capsys):
    from adapterflow.tasks.config import RunConfig
    from adapterflow.tasks.init_adapter import check_init_plan

    init = {"method": "auto", "candidates": ["lora", "pissa"], "lr_multipliers": [0.5, 1.0, 2.0]}  # 6 contenders
    short = RunConfig.model_validate(cls_config(tiny_bert, cls_data, **{"adapter.init": init, "train.max_steps": 60}))
    check_init_plan(short)
    warning = capsys.readouterr().err
    assert "each of the 5 losing contenders about 1 step(s)" in warning and "raise train.max_steps to 450" in warning
    assert "race at most" not in warning  # 6 extra steps cannot decide between two
    default_grid = RunConfig.model_validate(cls_config(tiny_bert, cls_data, **{"adapter.init": {"method": "auto"}, "train.max_steps": 600}))
    check_init_plan(default_grid)
    warning = capsys.readouterr().err
    # 60 extra steps decide among 1 + 60 // 9 = 7: the largest grid of the user's lists, more learning rates first.
    assert "or race at most 7 contenders at 600 steps, e.g. candidates [lora, pissa] × lr_multipliers [0.5, 1, 2]" in warning
    suggested = {"method": "auto", "candidates": ["lora", "pissa"], "lr_multipliers": [0.5, 1, 2]}
    check_init_plan(RunConfig.model_validate(cls_config(tiny_bert, cls_data, **{"adapter.init": suggested, "train.max_steps": 600})))
    assert "losing contenders" not in capsys.readouterr().err  # the hint's grid is one the budget decides
    enough = RunConfig.model_validate(cls_config(tiny_bert, cls_data, **{"adapter.init": init, "train.max_steps": 450}))
    check_init_plan(enough)
    assert "losing contenders" not in capsys.readouterr().err


def test_larger_lr_arms_on_a_run_of_many_epochs_are_a_warning_that_names_them(tiny_bert, cls_data, capsys):
    from adapterflow.tasks.init_adapter import check_init_plan

    def warned(max_steps: int, multipliers: list[float], batch_size: int) -> str:
        init = {"method": "auto", "candidates": ["lora", "pissa"], "lr_multipliers": multipliers}
        check_init_plan(RunConfig.model_validate(cls_config(tiny_bert, cls_data, **{"adapter.init": init, "train.max_steps": max_steps,
                                                                                 "train.batch_size": batch_size})))
        return capsys.readouterr().err

    many = warned(120, [0.5, 1.0, 2.0, 4.0], 4)  # 120 × 4 / 48 rows = 10 passes
    assert "this run makes about 10.0 passes over the 48 train rows, more than 3" in many
    assert "lr_multipliers above 1 (2, 4) win only if every arm at or below train.learning_rate diverges" in many
    assert "adapterflow sweep" in many
    assert "passes over" not in warned(120, [0.25, 0.5, 1.0], 4)  # nothing above 1 to waste
    init = {"method": "auto", "candidates": ["lora", "pissa"], "lr_multipliers": [1.0, 2.0]}
    check_init_plan(RunConfig.model_validate(cls_config(tiny_bert, cls_data, **{"adapter.init": init, "train.max_steps": None,
                                                                             "train.epochs": 12})))
    assert "this run makes 12 passes over the train split, more than 3" in capsys.readouterr().err
    assert "passes over" not in warned(60, [0.5, 1.0, 2.0], 2)  # 2.5 passes: the early lead is trusted


@pytest.mark.parametrize("init, expected", [
    ({"candidates": ["lora", "lora"]}, "lists a method twice"),
    ({"candidates": ["lora"]}, "adapter.init.auto.candidates"),
    ({"lr_multipliers": [1.0, -1.0]}, "distinct and positive"),
    ({"candidates": ["lora", "fancy"]}, "unknown init method 'fancy'"),
    ({"budget": 0.5}, "at most 0.1 is allowed"),
])
@pytest.mark.slow  # starts a fresh interpreter
def test_bad_race_settings_get_one_clear_error(tiny_bert, cls_data, tmp_path, init, expected):
    config = cls_config(tiny_bert, cls_data, **{"adapter.init": {"method": "auto", **init}, "train.max_steps": 400})
    result = run_cli("check", str(write_config(tmp_path / "c.yaml", config)), home=tmp_path / "state")
    assert result.returncode == 2 and expected in result.stderr
