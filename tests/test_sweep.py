"""`adapterflow sweep`: the plan (grid, ranges, overrides), and whole sweeps on the tiny model through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import cls_config, write_config

from adapterflow.errors import ConfigError
from adapterflow.flows.cli import main
from adapterflow.tasks.config import load_config
from adapterflow.tasks.sweep_plan import TrialResult, best_trial, overrides_for, parse_plan, trial_label

MODEL_NAME = "tiny-cls-adapter"


def test_a_grid_is_every_combination_in_order():
    plan = parse_plan(["train.learning_rate=1e-4,3e-4", "adapter.init.method=lora,pissa"], [], None)
    assert plan.size() == 4 and plan.keys == ["train.learning_rate", "adapter.init.method"]
    assert [list(p.values()) for p in plan.grid()] == [["1e-4", "lora"], ["1e-4", "pissa"], ["3e-4", "lora"], ["3e-4", "pissa"]]


def test_trial_overrides_are_read_by_the_schema_like_set(tmp_path, tiny_bert, cls_data):
    config = write_config(tmp_path / "run.yaml", cls_config(tiny_bert, cls_data))
    params = parse_plan(["train.learning_rate=1e-4", "adapter.r=16", "adapter.target_modules=[query]"], [], None).grid()[0]
    params["train.warmup_ratio"] = 0.25
    resolved = load_config(config, overrides_for(params))
    assert resolved.train.learning_rate == 1e-4 and resolved.adapter.r == 16 and resolved.adapter.target_modules == ["query"]
    assert resolved.train.warmup_ratio == 0.25
    assert trial_label({"train.learning_rate": 0.000123456, "adapter.r": 8}) == "learning_rate=0.000123,r=8"


@pytest.mark.parametrize(("grids", "ranges", "trials", "message"), [
    ([], [], None, "nothing to vary"),
    (["train.learning_rate"], [], None, "write --grid key.path=v1,v2"),
    (["adapter.r=8,8"], [], None, "lists a value twice"),
    (["adapter.r=!!bool x,1"], [], None, "not a comma list of YAML values .the value does not fit its explicit tag"),
    (["adapter.r=8,16", "adapter.r=4"], [], None, "more than once"),
    ([], ["train.learning_rate=1e-5:1e-3:log"], None, "needs --trials N"),
    ([], ["train.learning_rate=1e-3:1e-5"], 4, "needs low < high"),
    ([], ["train.learning_rate=0:1e-3:log"], 4, "low > 0 on a log scale"),
    ([], ["train.learning_rate=a:b"], 4, "must be numbers"),
    ([], ["train.learning_rate=1:2:cubic"], 4, "low:high:log"),
    (["adapter.r=8,16"], [], 0, "at least 1"),
    ([f"a.k{i}=1,2" for i in range(9)], [], None, "sample it with --trials"),
])
def test_a_bad_plan_is_one_clear_error(grids, ranges, trials, message):
    with pytest.raises(ConfigError, match=message):
        parse_plan(grids, ranges, trials)


def test_the_winner_is_the_best_finished_trial_and_ties_go_to_the_first():
    results = [TrialResult(1, {}, "a", metrics={"accuracy": 0.5}), TrialResult(2, {}, "b", metrics={"accuracy": 0.7}),
               TrialResult(3, {}, "c", metrics={"accuracy": 0.7}), TrialResult(4, {}, "d", error="diverged"),
               TrialResult(5, {}, "e", metrics={"accuracy": 0.9}, pruned=True)]
    assert best_trial(results, "accuracy", lower_is_better=False).number == 2
    assert best_trial(results, "accuracy", lower_is_better=True).number == 1
    assert best_trial(results[3:], "accuracy", lower_is_better=False) is None


@pytest.fixture
def state(tmp_path, monkeypatch) -> Path:
    home = tmp_path / "state"
    monkeypatch.setenv("ADAPTERFLOW_HOME", str(home))
    return home


def _client(state: Path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{state / 'mlflow' / 'mlflow.db'}"
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _sweep_runs(client):
    experiment = client.get_experiment_by_name(client.search_experiments()[0].name)
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if "adapterflow.sweep" in r.data.tags]
    assert len(parents) == 1
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    return parents[0], children


@pytest.mark.e2e
def test_a_two_by_two_grid_registers_only_the_best_trial(prefect_server, state, tmp_path, tiny_bert, cls_data, capsys):
    config = write_config(tmp_path / "run.yaml", cls_config(tiny_bert, cls_data, **{"evaluate.intruders": None}))
    code = main(["sweep", str(config), "--grid", "train.learning_rate=0.001,0.02", "--grid", "adapter.r=2,4",
                 "--max-parallel", "2"])
    out = capsys.readouterr().out
    assert code == 0, out

    client = _client(state)
    parent, children = _sweep_runs(client)
    assert len(children) == 4 and all(c.info.status == "FINISHED" for c in children)
    tried = {(c.data.params["train.learning_rate"], c.data.params["adapter.r"]) for c in children}
    assert tried == {("0.001", "2"), ("0.001", "4"), ("0.02", "2"), ("0.02", "4")}
    scores = {c.info.run_id: c.data.metrics["validation/accuracy"] for c in children}
    best = max(scores.values())
    versions = client.search_model_versions(f"name='{MODEL_NAME}'")
    assert len(versions) == 1 and versions[0].run_id == parent.data.tags["adapterflow.sweep.winner_run_id"]
    assert scores[versions[0].run_id] == best  # the first of the best in grid order wins a tie
    assert client.get_model_version_by_alias(MODEL_NAME, "staging").version == versions[0].version
    winner = next(c for c in children if c.info.run_id == versions[0].run_id)
    assert versions[0].tags["lora_r"] == winner.data.params["adapter.r"]
    assert parent.data.tags["adapterflow.sweep.winner"] == winner.data.tags["adapterflow.sweep.trial"]
    assert parent.info.status == "FINISHED" and parent.data.metrics["sweep/trials_finished"] == 4
    table = json.loads(Path(client.download_artifacts(parent.info.run_id, "sweep/trials.json")).read_text())
    assert [row["state"] for row in table].count("winner") == 1 and len(table) == 4
    assert {"sweep/trials.md", "sweep/parallel_coordinates.png"} <= {f.path for f in client.list_artifacts(parent.info.run_id, "sweep")}
    assert "winner           trial " in out and f"registered       {MODEL_NAME} version 1  alias @staging" in out
    assert out.count("<- winner") == 1


@pytest.mark.e2e
def test_a_failing_trial_is_reported_and_the_others_go_on(prefect_server, state, tmp_path, tiny_bert, cls_data, capsys,
                                                           monkeypatch):
    from adapterflow.errors import TrainingError
    from adapterflow.tasks import train

    real = train.train_adapter

    def dies_on_seed_7(config, *args, **kwargs):
        if config.train.seed == 7:
            raise TrainingError("the loss became NaN at step 2 (this test's injected failure)")
        return real(config, *args, **kwargs)

    monkeypatch.setattr(train, "train_adapter", dies_on_seed_7)
    config = write_config(tmp_path / "run.yaml", cls_config(tiny_bert, cls_data, **{"evaluate.intruders": None}))
    code = main(["sweep", str(config), "--grid", "train.seed=7,8", "--max-parallel", "2"])
    captured = capsys.readouterr()
    assert code == 0, captured.out + captured.err
    assert "seed=7: failed: the loss became NaN at step 2" in captured.out and "Traceback" not in captured.err

    client = _client(state)
    parent, children = _sweep_runs(client)
    assert sorted(c.info.status for c in children) == ["FAILED", "FINISHED"]
    versions = client.search_model_versions(f"name='{MODEL_NAME}'")
    assert len(versions) == 1 and client.get_run(versions[0].run_id).data.params["train.seed"] == "8"
    assert parent.data.metrics["sweep/trials_failed"] == 1 and parent.data.tags["adapterflow.sweep.winner"] == "seed=8"


@pytest.mark.e2e
def test_optuna_samples_the_ranges_and_registers_the_best(prefect_server, state, tmp_path, tiny_bert, cls_data, capsys):
    config = write_config(tmp_path / "run.yaml", cls_config(tiny_bert, cls_data, **{"evaluate.intruders": None,
                                                                                     "train.eval_every": 2}))
    code = main(["sweep", str(config), "--range", "train.learning_rate=1e-3:1e-2:log", "--grid", "adapter.r=2,4",
                 "--trials", "3", "--metric", "eval_loss"])
    out = capsys.readouterr().out
    assert code == 0, out
    client = _client(state)
    parent, children = _sweep_runs(client)
    assert len(children) == 3
    assert all(1e-3 <= float(c.data.params["train.learning_rate"]) <= 1e-2 for c in children)
    losses = {c.info.run_id: c.data.metrics["validation/eval_loss"] for c in children}
    versions = client.search_model_versions(f"name='{MODEL_NAME}'")
    assert len(versions) == 1 and losses[versions[0].run_id] == min(losses.values())
    assert parent.data.params["sweep.range.train.learning_rate"] == "0.001:0.01:log"


def test_a_pruned_trial_stops_training_at_the_next_step(tmp_path):
    """Optuna's verdict reaches training through a file beside the journal (the training may be another process)."""
    from types import SimpleNamespace

    from adapterflow.flows.sweep import _PruneWatcher
    from adapterflow.tasks.journal import JOURNAL_FILE, STOP_FILE, TrainingJournal

    class Trial:
        study = SimpleNamespace(direction=None)
        reported: list = []

        def report(self, value, step):
            self.reported.append((value, step))

        def should_prune(self):
            return len(self.reported) >= 2

    (tmp_path / JOURNAL_FILE).write_text(
        json.dumps({"event": "log", "step": 2, "metrics": {"eval/accuracy": 0.5}}) + "\n"
        + json.dumps({"event": "log", "step": 3, "metrics": {"train/loss": 0.7}}) + "\n"
        + json.dumps({"event": "log", "step": 4, "metrics": {"eval/accuracy": 0.4}}) + "\n")
    watcher = _PruneWatcher(tmp_path, Trial(), "accuracy")
    for line in (tmp_path / JOURNAL_FILE).read_text().splitlines():
        watcher._report(line)
    assert Trial.reported == [(0.5, 2), (0.4, 4)] and (tmp_path / STOP_FILE).exists()
    control = SimpleNamespace(should_training_stop=False)
    state = SimpleNamespace(global_step=5, max_steps=10, is_world_process_zero=True)
    TrainingJournal(tmp_path / JOURNAL_FILE).on_step_end(None, state, control)
    assert control.should_training_stop


def test_a_sweep_with_a_bad_trial_value_trains_nothing(state, tmp_path, tiny_bert, cls_data, capsys):
    config = write_config(tmp_path / "run.yaml", cls_config(tiny_bert, cls_data))
    assert main(["sweep", str(config), "--grid", "adapter.r=4,-1"]) == 2
    err = capsys.readouterr().err
    assert "sweep trial r=-1: " in err and "adapter.r" in err
    assert not (state / "runs").exists() or not any((state / "runs").iterdir())
