"""The sweep flow: a grid of (or Optuna's TPE samples from) `--set` overrides, each trial a retrain child flow run and
an MLflow child run under one parent run; the trial best on the validation split is registered (alias staging),
the others are not.

Trials run as Prefect tasks, each calling the retrain flow (a subflow), `max_parallel` at a time on the flow's
thread pool. A failing trial is reported and recorded; the others go on. The winner is picked on the validation
split, never the test split the promotion gate judges on: picking on test would leak it into the choice.
"""

from __future__ import annotations

import threading
import time
import uuid
from contextlib import nullcontext
from pathlib import Path

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.task_runners import ThreadPoolTaskRunner

from adapterflow.errors import AdapterflowError, ConfigError
from adapterflow.flows.progress import LINE_PREFIX, notice, say
from adapterflow.redact import redact_text
from adapterflow.tasks.journal import STOP_FILE
from adapterflow.tasks.sweep_plan import SweepPlan, TrialResult, best_trial, check_trials, overrides_for, parse_plan, trial_label

SELECTION_SPLIT = "validation"
PRUNE_POLL_SECONDS = 1.0


@flow(name="adapterflow-sweep", log_prints=False, validate_parameters=False)
def sweep(config_path: str, grids: list[str], ranges: list[str] | None = None, trials: int | None = None,
          overrides: list[str] | None = None, metric: str | None = None, max_parallel: int = 1) -> dict:
    """Run the trials, `max_parallel` at a time; register the best."""
    from adapterflow.tasks.config import LOWER_IS_BETTER
    from adapterflow.tasks.server_health import check_reachable
    from adapterflow.tasks.state import state_dirs
    from adapterflow.tasks.sweep_tracking import close_sweep_run, open_sweep_run

    plan = parse_plan(grids, ranges or [], trials)
    config = check_trials(config_path, overrides or [], plan)
    metric = metric or config.gate_metric()
    dirs = state_dirs()
    uri = config.tracking.mlflow_uri or dirs.default_mlflow_uri()
    check_reachable(uri)
    name = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:4]}"
    settings = {"config": config_path, "metric": metric, "selection_split": SELECTION_SPLIT,
                "overrides": " ".join(overrides or [])}
    parent = open_sweep_run(config, uri, dirs.mlflow_artifacts, plan, name, settings)
    say(f"{'sweep':<10} {name}: {plan.size()} trials over {', '.join(plan.keys)}; best {SELECTION_SPLIT} {metric} is registered")
    context = {"config_path": config_path, "overrides": list(overrides or []), "parent_run_id": parent.run_id,
               "folder": f"{config.name}-sweep-{name}", "metric": metric, "runs": str(dirs.runs)}
    lower = metric in LOWER_IS_BETTER
    if max_parallel < 1:
        raise ConfigError(f"sweep: --max-parallel must be at least 1, got {max_parallel}.")
    with ThreadPoolTaskRunner(max_workers=max_parallel) as runner:
        if plan.trials is None:
            results = _run_grid(runner, plan, context)
        else:
            results = _run_optuna(runner, max_parallel, plan, context, lower, config.train.seed)
    winner = best_trial(results, metric, lower)
    version = _register_winner(winner, uri, results) if winner else None
    close_sweep_run(parent, results, metric, winner, version)
    summary = {"name": name, "model_name": config.registry.model_name, "metric": metric, "parent_run_id": parent.run_id,
               "trials": [_trial_dict(r) for r in results], "winner": _trial_dict(winner) if winner else None,
               "version": version, "alias": config.registry.staging_alias, "tracking_uri": uri}
    if winner is None:
        raise AdapterflowError(f"sweep {name}: no trial finished ({_failures(results)}); nothing was registered. "
                               f"MLflow run {parent.run_id} holds the trials.")
    return summary


def _run_grid(runner, plan: SweepPlan, context: dict) -> list[TrialResult]:
    futures = [runner.submit(run_trial, {"context": context, "number": number, "params": params})
               for number, params in enumerate(plan.grid(), start=1)]
    return [future.result() for future in futures]


def _run_optuna(runner, width: int, plan: SweepPlan, context: dict, lower: bool, seed: int) -> list[TrialResult]:
    """TPE over the ranges (and the grid keys as categorical choices), Optuna's successive-halving pruner on the
    metric the training journal logs at each evaluation (train.eval_every); asked in batches of the runner's width."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="minimize" if lower else "maximize", sampler=optuna.samplers.TPESampler(seed=seed),
                                pruner=optuna.pruners.SuccessiveHalvingPruner())
    results: list[TrialResult] = []
    while len(results) < plan.trials:
        batch = [study.ask() for _ in range(min(width, plan.trials - len(results)))]
        futures = [runner.submit(run_trial, {"context": context, "number": len(results) + i + 1, "params": _suggest(t, plan),
                                             "optuna_trial": t}) for i, t in enumerate(batch)]
        for optuna_trial, future in zip(batch, futures):
            result = future.result()
            results.append(result)
            _tell(study, optuna_trial, result, context["metric"])
    return results


def _suggest(optuna_trial, plan: SweepPlan) -> dict:
    params = {}
    for axis in plan.axes:  # Optuna's choices must be plain scalars: index the values, keep the values themselves
        params[axis.key] = axis.values[optuna_trial.suggest_categorical(axis.key, list(range(len(axis.values))))]
    for span in plan.spans:
        if span.scale == "int":
            params[span.key] = optuna_trial.suggest_int(span.key, int(span.low), int(span.high))
        else:
            params[span.key] = optuna_trial.suggest_float(span.key, span.low, span.high, log=span.scale == "log")
    return params


def _tell(study, optuna_trial, result: TrialResult, metric: str) -> None:
    from optuna.trial import TrialState

    if result.pruned:
        study.tell(optuna_trial, state=TrialState.PRUNED)
    elif result.ok and metric in result.metrics:
        study.tell(optuna_trial, result.metrics[metric])
    else:
        study.tell(optuna_trial, state=TrialState.FAIL)


@task(name="sweep-trial", retries=0, cache_policy=NO_CACHE, persist_result=False)
def run_trial(context: dict, number: int, params: dict, optuna_trial=None) -> TrialResult:
    """One retrain as a child flow run; its failure is recorded, never raised."""
    from adapterflow.flows.retrain import retrain

    label = trial_label(params)
    result = TrialResult(number, params, label)
    run_folder = f"{context['folder']}-t{number:02d}"
    result.run_dir = str(Path(context["runs"]) / run_folder)
    LINE_PREFIX.set(f"[trial {number}] ")
    say(f"{'sweep':<10} starts {label}")
    start = time.perf_counter()
    trial = {"parent_run_id": context["parent_run_id"], "run_folder": run_folder, "label": label}
    child = retrain.with_options(flow_run_name=run_folder)
    pruning = _PruneWatcher(Path(result.run_dir), optuna_trial, context["metric"]) if optuna_trial else nullcontext()
    try:
        with pruning:
            summary = child(context["config_path"], force=True, overrides=[*context["overrides"], *overrides_for(params)], trial=trial)
        result.run_id = summary["run_id"]
        result.pruned = (Path(result.run_dir) / STOP_FILE).exists()
        result.metrics = _selection_metrics(summary, context)
    except Exception as err:  # noqa: BLE001  (a trial's failure, whatever it is, must not stop the others)
        result.error = redact_text(str(err) if isinstance(err, AdapterflowError) else f"unexpected {type(err).__name__}: {err}")
        notice(f"{'sweep':<10} failed: {result.error.splitlines()[0]}")
    result.seconds = time.perf_counter() - start
    if result.ok:
        say(f"{'sweep':<10} done: {SELECTION_SPLIT} {context['metric']} {result.metrics[context['metric']]:.4f}")
    return result


def _selection_metrics(summary: dict, context: dict) -> dict[str, float]:
    """The trial's metrics on the validation split (the run itself evaluated on evaluate.split), logged to its run."""
    from adapterflow.flows.retrain import _IN_PROCESS_STAGES
    from adapterflow.tasks.config import load_config
    from adapterflow.tasks.evaluate import evaluate_adapter
    from adapterflow.tasks.model_io import resolve_base
    from adapterflow.tasks.registration import RegistrationRequest
    from adapterflow.tasks.tracking import RunRef, log_metrics

    if summary["eval_split"] == SELECTION_SPLIT:
        return dict(summary["metrics"])
    request = RegistrationRequest.load(Path(summary["run_dir"]))
    config = load_config(context["config_path"], context["overrides"])
    with _IN_PROCESS_STAGES:
        metrics = evaluate_adapter(config, resolve_base(config.model), Path(request.adapter_dir), SELECTION_SPLIT)
    log_metrics(RunRef(summary["tracking_uri"], summary["run_id"], summary["run_dir"], 0), metrics, prefix=f"{SELECTION_SPLIT}/")
    return metrics


class _PruneWatcher:
    """Reports the trial's evaluations from its training journal to Optuna; asks training to stop when Optuna prunes.

    The journal logs eval/<metric> when the Trainer computes it (accuracy for classification) and eval/loss always;
    Optuna compares intermediate values in the study's direction, so a loss reported to a maximizing study is negated.
    """

    def __init__(self, run_dir: Path, optuna_trial, metric: str):
        self.run_dir, self.trial, self.metric = run_dir, optuna_trial, metric
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._watch, name="adapterflow-prune-watcher", daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.done.set()
        self.thread.join()

    def _watch(self) -> None:
        from adapterflow.tasks.journal import JOURNAL_FILE

        seen = 0
        while not self.done.wait(PRUNE_POLL_SECONDS):
            try:
                lines = (self.run_dir / JOURNAL_FILE).read_text().splitlines()
            except FileNotFoundError:
                continue
            for line in lines[seen:]:
                self._report(line)
            seen = len(lines)

    def _report(self, line: str) -> None:
        import json

        try:
            record = json.loads(line)
        except ValueError:
            return  # a line still being written: read whole on the next poll
        value = self._intermediate(record.get("metrics", {})) if record.get("event") == "log" else None
        if value is None:
            return
        self.trial.report(value, record["step"])
        if self.trial.should_prune():
            (self.run_dir / STOP_FILE).touch()

    def _intermediate(self, metrics: dict) -> float | None:
        from optuna.study import StudyDirection

        if f"eval/{self.metric}" in metrics:
            return metrics[f"eval/{self.metric}"]
        if "eval/loss" not in metrics:
            return None
        maximizing = self.trial.study.direction == StudyDirection.MAXIMIZE
        return -metrics["eval/loss"] if maximizing else metrics["eval/loss"]


def _register_winner(winner: TrialResult, uri: str, results: list[TrialResult]) -> str | None:
    """The winner's held registration, made exactly as `adapterflow register` makes a deferred one."""
    import json

    from adapterflow.tasks.deferred import finish_deferred

    for result in results:
        if result.run_dir and Path(result.run_dir).is_dir():
            (Path(result.run_dir) / "sweep_trial.json").write_text(json.dumps({"trial": result.number, "label": result.label,
                                                                                "won": result is winner}))
    done = finish_deferred(Path(winner.run_dir), uri)
    say(f"{'sweep':<10} winner trial {winner.number} ({winner.label}) registered as version {done.version}")
    return done.version


def _trial_dict(result: TrialResult) -> dict:
    return {"number": result.number, "label": result.label, "params": result.params, "metrics": result.metrics,
            "run_id": result.run_id, "run_dir": result.run_dir, "seconds": round(result.seconds, 1), "error": result.error,
            "pruned": result.pruned}


def _failures(results: list[TrialResult]) -> str:
    failed = [r for r in results if r.error]
    if not failed:
        return "every trial was pruned"
    return "; ".join(f"trial {r.number}: {r.error.splitlines()[0][:200]}" for r in failed[:3])
