"""The retraining flow, one stage per line: the body of `_retrain` below is the pipeline's diagram."""

from __future__ import annotations

import shutil
import threading
import time
import uuid
from contextlib import contextmanager, nullcontext, suppress
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_link_artifact, create_markdown_artifact
from prefect.runtime import flow_run

from adapterflow.errors import AdapterflowError
from adapterflow.flows import render, warm
from adapterflow.flows.console import keep_traceback, quiet_failures_in_prefect_logs
from adapterflow.flows.progress import apply_verbosity, notice, say
from adapterflow.flows.stages import (
    Candidate,
    close_run_stage,
    evaluate_stage,
    init_stage,
    merge_choice_stage,
    mitigation_stage,
    open_run_stage,
    promote_stage,
    register_stage,
    spectral_stage,
    train_stage,
    training_config,
    validate_stage,
    version_stage,
)
from adapterflow.redact import redact_text, redact_uri
from adapterflow.tasks.config import load_config
from adapterflow.tasks.deferred import pending_work
from adapterflow.tasks.hardware import check_hardware
from adapterflow.tasks.model_io import resolve_base
from adapterflow.tasks.outages import OUTAGES, watching
from adapterflow.tasks.registry_queries import unchanged_version
from adapterflow.tasks.resume import alive_while, resume_key
from adapterflow.tasks.server_health import check_reachable, check_servers
from adapterflow.tasks.state import check_state_folder, quiet_library_noise, state_dirs
from adapterflow.tasks.tracking import end_run, system_metrics
from adapterflow.tasks.version_data import snapshot_splits


@flow(name="adapterflow-retrain", log_prints=False, validate_parameters=False)
def retrain(config_path: str, force: bool = False, overrides: list[str] | None = None, trial: dict | None = None) -> dict:
    """`force` retrains even when staging or production already holds this exact config and data; `overrides` are
    `key.path=value` settings applied over the config (`--set`), so a deployment run can change them. `trial` is set
    by a sweep (flows/sweep.py): {"parent_run_id", "run_folder", "label"}; the run is then a child of the sweep's
    MLflow run and leaves its registration for the sweep, which registers the best trial only."""
    config, dirs, uri = _prepare(config_path, overrides or [])
    OUTAGES.reset(notice)  # a served deployment runs many flows in one process: each reports its own outages
    settings = "".join(f" --set {override}" for override in overrides or [])
    say(redact_text(f"adapterflow: {config.name} from {config_path}{settings}; Prefect flow run '{flow_run.name}'"))
    run_dir = _new_run_dir(dirs.runs, config.name, trial["run_folder"] if trial else None)
    with alive_while(run_dir), _watching_prefect_api():  # the lock: released when this flow ends, or by the OS
        return _retrain(config, dirs, uri, run_dir, force or trial is not None, trial)


def _watching_prefect_api():
    """A Prefect server's API going away is reported like any outage; Prefect's client retries meanwhile and the
    run's states reach the server when it is back. The embedded server lives in this process: nothing to watch."""
    from prefect.settings import PREFECT_API_URL

    api = PREFECT_API_URL.value()
    if not api:
        return nullcontext()
    return watching(api.rstrip("/") + "/health", f"the Prefect API at {redact_uri(api)}",
                    "training goes on; the run's state reaches Prefect when it is back")


def _retrain(config, dirs, uri: str, run_dir: Path, force: bool, trial: dict | None = None) -> dict:
    """The stages. `config` is the user's: its digest, data paths and params are what the run records. Every stage
    that reads data gets `run_config`, the same config reading the run's own copy of the split files."""
    snapshot, unchanged = _snapshot_unless_unchanged(config, uri, run_dir, force)
    if unchanged:
        return _skipped(config, uri, *unchanged)
    warm.import_before_threads()
    run_config, split_md5s, base_ref = snapshot.config, snapshot.md5s, resolve_base(config.model)
    clock = _StageClock(_one_at_a_time(config) if trial else set())
    validation = clock("validate", validate_stage, snapshot, run_dir)
    parent = {"parent_run_id": trial["parent_run_id"], "label": trial["label"]} if trial else None
    run = clock("track", open_run_stage, config, uri, dirs.mlflow_artifacts, validation, base_ref, run_dir, parent)
    _announce_run(run, config.name)
    versioning = version_stage.submit(snapshot, dirs.dvc_repo, dirs.dvc_remote, run_dir, run)  # beside init and training
    with _failure_marks_run(run, versioning, config.tracking.system_metrics_seconds, run_dir):
        init = clock("initialize", init_stage, run_config, base_ref, run_dir, dirs.init_cache, run, split_md5s)
        train_config, recorded_config = training_config(run_config, init), training_config(config, init)
        key = resume_key(recorded_config, base_ref, split_md5s)
        trained = clock("train", train_stage, train_config, base_ref, init.init_dir, run_dir, run, key)
        merge = clock("merge", merge_choice_stage, run_config, base_ref, trained, run_dir, run) if trained.merged_adapter_dir else None
        adapter_dir = merge.adapter_dir if merge else trained.adapter_dir
        mitigation = clock("mitigate", mitigation_stage, run_config, base_ref, adapter_dir, run_dir, run) if _mitigates(config) else None
        adapter_dir = mitigation.adapter_dir if mitigation else adapter_dir
        evaluation = clock("evaluate", evaluate_stage, run_config, base_ref, adapter_dir, run_dir, run)
        spectral = clock("spectral", spectral_stage, run_config, base_ref, adapter_dir, run_dir, run) if config.evaluate.intruders else None
        candidate = Candidate(adapter_dir, init, trained, evaluation, spectral, merge, mitigation)
        data_version = versioning.result()
        say(f"{'version':<10} data md5 {data_version.digest} (DVC)")
        lock_dir = dirs.root / "locks"
        registered = clock("register", register_stage, recorded_config, base_ref, run, candidate, data_version, split_md5s,
                           run_dir, lock_dir, trial is not None)
        promotes = config.promotion.promote == "auto" and registered.version is not None
        promotion = clock("promote", promote_stage, config, uri, lock_dir) if promotes else None
        close_run_stage(run, clock.seconds)
    deferred = [work for work in pending_work(run_dir) if not (trial and work == HELD_REGISTRATION)]
    summary = {
        "name": config.name, "run_id": run.run_id, "init": init.to_dict(), "train": trained.to_dict(),
        "metrics": dict(evaluation.metrics), "eval_split": evaluation.split, "spectral": spectral,
        "merge": merge.to_dict() if merge else None, "intruder_mitigation": mitigation.to_dict() if mitigation else None,
        "model_name": registered.model_name, "version": registered.version, "alias": registered.alias, "data_md5": data_version.digest,
        "promotion": promotion.to_dict() if promotion else None, "validation": validation.to_dict(), "run_dir": str(run_dir),
        "tracking_uri": redact_uri(uri), "timings": clock.seconds, "bnb_cpu_path": _bnb_cpu_path(config, trained.device),
        "trust_remote_code": config.model.trust_remote_code, "deferred": deferred, "outages": OUTAGES.report(),
        "held_for_sweep": trial is not None,
    }
    if deferred:
        get_run_logger().warning(render.deferred_message(summary))
    create_markdown_artifact(markdown=_summary_markdown(summary), key="retrain-summary", description=config.name)
    return summary


def _mitigates(config) -> bool:
    return bool(config.evaluate.intruders and config.evaluate.intruders.mitigate)


def _prepare(config_path: str, overrides: list[str]):
    """The checks the CLI's preflight also makes, again here: a served run executes in its own process without it."""
    warm.wait()
    quiet_library_noise()
    quiet_failures_in_prefect_logs()
    apply_verbosity()
    config = load_config(config_path, overrides)
    check_hardware(config)
    dirs = state_dirs()
    check_state_folder(dirs)
    uri = config.tracking.mlflow_uri or dirs.default_mlflow_uri()
    check_reachable(uri)  # creates a fresh SQLite store once, under a lock: a concurrent run waits for it
    check_servers(config)
    return config, dirs, uri


def _snapshot_unless_unchanged(config, uri: str, run_dir: Path, force: bool):
    """(the run's copy of its splits, None), or (None, (alias, version)) when a version holds this exact config and
    data. The split files are hashed once, as they are copied: the skip check, init cache key, resume key and version
    tags share those md5s. A skipped run, or one whose files cannot be copied, leaves no run folder."""
    try:
        snapshot = snapshot_splits(config, run_dir)
        unchanged = None if force else unchanged_version(config, uri, snapshot.md5s)
    except BaseException:
        shutil.rmtree(run_dir, ignore_errors=True)
        raise
    if unchanged:
        shutil.rmtree(run_dir)
        return None, unchanged
    return snapshot, None


def _bnb_cpu_path(config, device: str) -> str | None:
    """Which bitsandbytes CPU kernel path a 4-bit run took: it differs by CPU, so the summary says it once."""
    from adapterflow.tasks.bnb_cpu import cpu_path

    path = cpu_path(config.model.quantization, device)
    return f"{'packed' if path.packed else 'unpacked'} ({path.reason})" if path else None


def _skipped(config, uri: str, alias: str, version: str) -> dict:
    get_run_logger().info(f"skipped: {config.registry.model_name} version {version} (@{alias}) was trained on this exact config and data")
    return {"skipped": True, "name": config.name, "model_name": config.registry.model_name, "alias": alias, "version": version,
            "tracking_uri": redact_uri(uri)}


class _StageClock:
    """Runs a stage and keeps its wall seconds under a name, in the order the stages ran. The stages named in
    `one_at_a_time` hold a lock shared by every flow of this process (a sweep's trials run in threads)."""

    def __init__(self, one_at_a_time: set[str] = frozenset()):
        self.seconds: dict[str, float] = {}
        self.one_at_a_time = one_at_a_time

    def __call__(self, name: str, stage, *args):
        with _IN_PROCESS_STAGES if name in self.one_at_a_time else nullcontext():
            say(render.stage_start_line(name))
            start = time.perf_counter()
            result = stage(*args)
            self.seconds[name] = round(time.perf_counter() - start, 2)
            say(render.stage_end_line(name, self.seconds[name], result))
        return result


# A sweep's trials are flows in threads of one process. torch's RNG and thread count are process-wide, so the stages
# that compute in this process take turns (each then seeds and computes exactly as in a run of its own); training
# launched as its own process (train.launch.mode accelerate, the default) runs beside them.
_IN_PROCESS_STAGES = threading.Lock()
HELD_REGISTRATION = "the registration"  # what pending_work says of a request a sweep's trial leaves for the sweep


def _one_at_a_time(config) -> set[str]:
    stages = {"validate", "track", "initialize", "merge", "mitigate", "evaluate", "spectral", "register"}
    return stages | ({"train"} if config.train.launch.mode == "in_process" else set())


def _announce_run(run, name: str) -> None:
    """The MLflow run's page, on stderr and as a Prefect link artifact, as soon as the run exists."""
    from adapterflow.tasks.tracking import client

    experiment_id = client(run.uri).get_run(run.run_id).info.experiment_id
    url, how = render.mlflow_run_link(run.uri, experiment_id, run.run_id)
    say(f"{'mlflow':<10} run {run.run_id}: {how}")
    create_link_artifact(link=url, link_text=f"MLflow run {run.run_id}", key=MLFLOW_LINK_ARTIFACT_KEY,
                         description=f"{name}: metrics, params and artifacts of this run in MLflow")


MLFLOW_LINK_ARTIFACT_KEY = "mlflow-run"


@contextmanager
def _failure_marks_run(run, versioning, system_metrics_seconds: float, run_dir: Path):
    """System metrics sampled throughout; on any failure the run is marked FAILED once versioning has settled.

    A bug (not a user's error) leaves its full traceback in the run folder, beside the training log.
    """
    try:
        with system_metrics(run, system_metrics_seconds):
            yield
    except BaseException as err:
        if isinstance(err, Exception) and not isinstance(err, AdapterflowError):
            keep_traceback(err, run_dir)
        versioning.wait()
        # A plain call, not a task: the flow may be cancelling, and a new task run could hide the original error.
        # While MLflow is down the status waits in the run's outbox; a refusal must not hide the error either.
        with suppress(Exception):
            end_run(run, "FAILED")
        raise


def _new_run_dir(root: Path, name: str, folder: str | None = None) -> Path:
    run_dir = root / (folder or f"{name}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}")
    run_dir.mkdir(parents=True)
    return run_dir


def _summary_markdown(summary: dict) -> str:
    metrics = ", ".join(f"{k}={v:.4f}" for k, v in summary["metrics"].items())
    return (
        f"# {summary['name']}\n\n- data md5: `{summary['data_md5']}`\n- init: {summary['init']['method']} "
        f"({summary['init']['seconds']:.2f} s)\n- metrics ({summary['eval_split']}): {metrics}\n"
        + (f"- intruder mitigation: {summary['intruder_mitigation']['chosen']} registered "
           f"({summary['intruder_mitigation']['reason']})\n" if summary.get("intruder_mitigation") else "")
        + (f"- registered: {summary['model_name']} v{summary['version']} @{summary['alias']}\n" if summary["version"] else
           "- a sweep's trial: the sweep registers its best trial\n" if summary["held_for_sweep"] else
           f"- **not registered yet**: {'; '.join(summary['deferred'])} left for `adapterflow register {summary['run_dir']}`\n")
    )
