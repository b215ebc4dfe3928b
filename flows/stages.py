"""The retrain's stages as Prefect tasks: typed inputs and results, each logging what it produces to MLflow.

Stages pass paths, URIs, digests and small frozen records, never models or data frames. Retry
policy: deterministic failures (bad data, bad config, divergence) are never retried; only steps
that talk to storage retry, and registration never does (a retry could register twice).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from prefect import task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE

from adapterflow.flows.progress import say
from adapterflow.tasks.tracking import RunRef, log_files, log_metrics

if TYPE_CHECKING:  # their modules import torch/pandas, which flows/warm.py imports on its thread first
    from adapterflow.tasks.checkpoint_merge import MergeChoice
    from adapterflow.tasks.init_adapter import InitOutcome
    from adapterflow.tasks.intruders import MitigationChoice
    from adapterflow.tasks.registry_tags import VersionTags
    from adapterflow.tasks.train import TrainResult
    from adapterflow.tasks.version_data import DataVersion, Snapshot

STAGE = dict(cache_policy=NO_CACHE, persist_result=False)
STORAGE_RETRIES = dict(retries=2, retry_delay_seconds=2)


@dataclass(frozen=True)
class Validation:
    files: Mapping[str, str]  # report format -> file
    row_counts: Mapping[str, int]
    checks: int

    def to_dict(self) -> dict:
        return {"files": dict(self.files), "row_counts": dict(self.row_counts), "checks": self.checks}


@dataclass(frozen=True)
class Evaluation:
    split: str
    metrics: Mapping[str, float]


@dataclass(frozen=True)
class Candidate:
    """The adapter about to be registered and what produced it."""

    adapter_dir: str
    init: InitOutcome
    trained: TrainResult
    evaluation: Evaluation
    spectral: Mapping[str, float] | None = None
    merge: MergeChoice | None = None
    mitigation: MitigationChoice | None = None


@dataclass(frozen=True)
class Registration:
    model_name: str
    version: str | None  # None: MLflow stayed down past tracking.wait_for_server_seconds; `adapterflow register` makes it
    alias: str
    held: bool = False  # a sweep's trial: the sweep registers its best trial


@dataclass(frozen=True)
class Promotion:
    promoted: bool
    reason: str

    def to_dict(self) -> dict:
        return asdict(self)


@task(name="validate-data", retries=0, **STAGE)
def validate_stage(snapshot: Snapshot, run_dir: Path) -> Validation:
    """The run's copy of the splits (the bytes it trains on), reported by the names of the files the config gave."""
    from adapterflow.errors import DataError
    from adapterflow.tasks.validate_data import validate_data

    config = snapshot.config
    try:
        report = validate_data(config)
    except DataError as err:
        raise DataError(snapshot.naming_sources(str(err))) from None
    files = report.write(run_dir / "validation")
    create_table_artifact(table=report.as_table(), key="data-validation", description=f"Data validation for {config.name}: passed")
    return Validation({k: str(v) for k, v in files.items()}, dict(report.row_counts), len(report.rows))


@task(name="open-tracking-run", **STORAGE_RETRIES, **STAGE)
def open_run_stage(config, uri: str, artifacts_root: Path, validation: Validation, base_ref, run_dir: Path,
                   parent: Mapping[str, str] | None = None) -> RunRef:
    """The MLflow run, and its id in the run folder: what the run cannot write while MLflow is down waits there.
    `parent`: a sweep's trial is a child run of the sweep's run ({"parent_run_id", "label"})."""
    from adapterflow.tasks.deferred import save_run
    from adapterflow.tasks.tracking import open_run

    tags = {"mlflow.parentRunId": parent["parent_run_id"], "adapterflow.sweep.trial": parent["label"]} if parent else {}
    run = open_run(config, uri, artifacts_root, dict(validation.files), base_ref, run_dir, tags)
    save_run(run, run_dir)
    return run


@task(name="version-data", **STORAGE_RETRIES, **STAGE)
def version_stage(snapshot: Snapshot, repo: Path, default_remote: Path, run_dir: Path, run: RunRef) -> DataVersion:
    """DVC add + push of the run's copy of the splits; the run gets the digest, the .dvc file and the dataset input.
    A push the remote refuses is retried while the run trains, then left for `adapterflow register`."""
    from adapterflow.tasks.deferred import push_with_retries
    from adapterflow.tasks.tracking import log_data_version
    from adapterflow.tasks.version_data import version_data

    data_version = version_data(snapshot, repo, default_remote, run_dir)
    if data_version.push_error:
        push_with_retries(data_version, repo, run_dir, snapshot.config.tracking.wait_for_server_seconds)
    log_data_version(snapshot.config, run, data_version)
    return data_version


@task(name="initialize-adapter", retries=0, **STAGE)
def init_stage(config, base_ref, run_dir: Path, cache_root: Path, run: RunRef, split_md5s: Mapping[str, str]) -> InitOutcome:
    from adapterflow.tasks.init_adapter import initialize_adapter

    init = initialize_adapter(config, base_ref, run_dir, cache_root, split_md5s["train"])
    metrics = {"seconds": init.seconds, "cache_hit": float(init.cache == "hit"), **init.checks}
    if init.learning_rate is not None:
        metrics["chosen_learning_rate"] = init.learning_rate
    race_table = Path(init.race_path).with_suffix(".json") if init.race_path else None  # each round: steps, loss ± noise, why cut
    if race_table:
        metrics["race_extra_steps"] = json.loads(race_table.read_text())["extra_steps"]
    log_metrics(run, metrics, prefix="init/")
    log_files(run, [Path(p) for p in (init.report_path, init.plot_path, init.race_path, race_table) if p], "init")
    return init


def training_config(config, init: InitOutcome):
    """A race's winner trains at its own learning rate; every other method at the configured one."""
    if init.learning_rate is None:
        return config
    return config.model_copy(update={"train": config.train.model_copy(update={"learning_rate": init.learning_rate})})


@task(name="train", retries=0, **STAGE)
def train_stage(config, base_ref, init_dir: str, run_dir: Path, run: RunRef, key: dict) -> TrainResult:
    """Resumes an interrupted run with the same resume `key` (config, data, base); shows and ships the training's
    journal while it runs; logs the loss curves. A failure names the run folder and the MLflow run."""
    from adapterflow.errors import AdapterflowError
    from adapterflow.tasks.launch import launch_training
    from adapterflow.tasks.resume import interrupted_checkpoint, mark_finished
    from adapterflow.tasks.run_plots import plot_loss_curves
    from adapterflow.tasks.train import train_adapter

    resume_from = interrupted_checkpoint(run_dir, key, config.name)
    if resume_from:
        say(f"train      resuming the interrupted run's training from {resume_from}")
    try:
        with _following_training(run_dir, run, config.name):
            if config.train.launch.mode == "accelerate":
                result = launch_training(config, base_ref, Path(init_dir), run_dir, resume_from)
            else:  # in this process: the journal draws the progress, not the Trainer's own bar
                result = train_adapter(config, base_ref, Path(init_dir), run_dir, resume_from, quiet=True)
    except AdapterflowError as err:
        raise type(err)(f"{err}\nRun folder: {run_dir}  MLflow run: {run.run_id}") from None
    mark_finished(run_dir, result.to_dict())
    (run_dir / "plots").mkdir(exist_ok=True)
    curves = plot_loss_curves(run_dir / "train_log.json", run_dir / "plots" / "loss_curves.png")
    if curves:
        log_files(run, [curves], "plots")
    return result


SHIP_DRAIN_SECONDS = 5.0  # at the end of training; what is still unsent stays in the journal for `adapterflow register`


@contextmanager
def _following_training(run_dir: Path, run: RunRef, name: str):
    """While training runs: the journal shipped to MLflow, drawn on the terminal (or as log lines) and as a Prefect
    progress artifact, all from a thread of this process; the training itself never waits on any of them."""
    from adapterflow.flows.progress import PrefectProgressArtifact, display_sink, notice
    from adapterflow.tasks.journal import JOURNAL_FILE, JournalFollower
    from adapterflow.tasks.metrics_shipper import MetricsShipper, ShipperSink

    shipper = ShipperSink(MetricsShipper(run_dir, run.uri, run.run_id), SHIP_DRAIN_SECONDS)  # outages: one report per run
    display = display_sink()
    artifact = PrefectProgressArtifact(PROGRESS_ARTIFACT_KEY, f"Training {name}")
    sinks = [shipper, *([display] if display else []), artifact]
    with JournalFollower(run_dir / JOURNAL_FILE, sinks, say=notice):
        yield


PROGRESS_ARTIFACT_KEY = "training-progress"


@task(name="choose-merged-or-final", retries=0, **STAGE)
def merge_choice_stage(config, base_ref, trained: TrainResult, run_dir: Path, run: RunRef) -> MergeChoice:
    from adapterflow.tasks.checkpoint_merge import choose_adapter, merge_markdown

    choice = choose_adapter(config, base_ref, trained.adapter_dir, trained.merged_adapter_dir, trained.merge)
    (run_dir / "checkpoint_merge.md").write_text(merge_markdown(choice))
    (run_dir / "checkpoint_merge.json").write_text(json.dumps(choice.to_dict(), indent=1))
    log_files(run, [run_dir / "checkpoint_merge.md", run_dir / "checkpoint_merge.json"], "merge")
    metric = choice.metric
    scores = {f"final_{metric}": choice.final, f"merged_{metric}": choice.merged, "chose_merged": float(choice.chosen == "merged")}
    log_metrics(run, scores, prefix="merge/")
    return choice


MITIGATION_TAG = "adapterflow.intruder_mitigation"  # on the run: the choice, one readable line


@task(name="mitigate-intruders", retries=0, **STAGE)
def mitigation_stage(config, base_ref, adapter_dir: str, run_dir: Path, run: RunRef) -> MitigationChoice:
    """peft's intruder mitigation on the trained (or merged) adapter; the better of the two on validation goes on."""
    from adapterflow.tasks.intruders import choose_adapter, mitigate_adapter, mitigation_markdown
    from adapterflow.tasks.outbox import tag_op
    from adapterflow.tasks.tracking import deliver

    mitigated = mitigate_adapter(config, base_ref, Path(adapter_dir), run_dir / "adapter_mitigated")
    choice = choose_adapter(config, base_ref, adapter_dir, str(mitigated))
    (run_dir / "intruder_mitigation.md").write_text(mitigation_markdown(choice))
    (run_dir / "intruder_mitigation.json").write_text(json.dumps(choice.to_dict(), indent=1))
    log_files(run, [run_dir / "intruder_mitigation.md", run_dir / "intruder_mitigation.json"], "mitigation")
    log_metrics(run, choice.metrics(), prefix="mitigation/")
    deliver(run, [tag_op(MITIGATION_TAG, choice.tag_text())])
    return choice


@task(name="evaluate", retries=0, **STAGE)
def evaluate_stage(config, base_ref, adapter_dir: str, run_dir: Path, run: RunRef) -> Evaluation:
    """The evaluation split's metrics, and a confusion matrix for classification."""
    from adapterflow.tasks.evaluate import evaluate_adapter

    plots = run_dir / "plots"
    plots.mkdir(exist_ok=True)
    drawn = set(plots.glob("*.png"))  # the loss curves, logged by the train stage
    split = config.evaluate.split
    metrics = evaluate_adapter(config, base_ref, Path(adapter_dir), split, plots)
    log_metrics(run, metrics, prefix=f"{split}/")
    log_files(run, sorted(set(plots.glob("*.png")) - drawn), "plots")
    return Evaluation(split, metrics)


@task(name="spectral-report", retries=0, **STAGE)
def spectral_stage(config, base_ref, adapter_dir: str, run_dir: Path, run: RunRef) -> dict[str, float]:
    """Intruder dimensions of the adapter on its base: table and plot, totals as metrics."""
    from adapterflow.tasks.spectral_report import write_spectral_report

    report = write_spectral_report(config, base_ref, Path(adapter_dir), run_dir / "spectral")
    log_files(run, [Path(p) for p in report["files"]], "spectral")
    log_metrics(run, report["summary"], prefix="spectral/")
    return report["summary"]


@task(name="register", retries=0, **STAGE)
def register_stage(
    config, base_ref, run: RunRef, candidate: Candidate, data_version: DataVersion, split_md5s: Mapping[str, str], run_dir: Path,
    lock_dir: Path, hold: bool = False,
) -> Registration:
    """The version with its lineage tags and description, then alias staging. The request is written to the run
    folder first; while MLflow does not answer the stage waits up to tracking.wait_for_server_seconds, then
    leaves it there for `adapterflow register RUN_DIR`, which makes exactly this registration. `hold`: a sweep's
    trial leaves it there at once; the sweep registers its best trial the same way."""
    from adapterflow.tasks.deferred import PROMOTE_FILE, wait_for_server
    from adapterflow.tasks.metrics_shipper import MetricsShipper
    from adapterflow.tasks.registration import register_adapter, registration_request, version_description
    from adapterflow.tasks.tracking import flush_outbox

    tags = _version_tags(config, base_ref, candidate, data_version, split_md5s)
    request = registration_request(config, base_ref, Path(candidate.adapter_dir), tags,
                                   version_description(tags, candidate.trained.train_loss), run.started_ms)
    request.save(run_dir)
    registry = config.registry
    if hold or not wait_for_server(run, config.tracking.wait_for_server_seconds, say):
        if config.promotion.promote == "auto":
            promotion = {"model_name": registry.model_name, "lock_dir": str(lock_dir),
                         "staging_alias": registry.staging_alias, "production_alias": registry.production_alias}
            (run_dir / PROMOTE_FILE).write_text(json.dumps(promotion))
        return Registration(registry.model_name, None, registry.staging_alias, held=hold)
    flush_outbox(run)
    MetricsShipper(run_dir, run.uri, run.run_id).ship()  # what the training's drain left: the version's run is complete
    return Registration(registry.model_name, register_adapter(request, run, run_dir), registry.staging_alias)


def _version_tags(config, base_ref, candidate: Candidate, data_version: DataVersion, split_md5s: Mapping[str, str]) -> VersionTags:
    from adapterflow.tasks.registry_tags import VersionTags
    from adapterflow.tasks.tracking import git_commit

    adapter, spectral = config.adapter, candidate.spectral
    return VersionTags(
        task=config.task, lora_r=adapter.r, lora_alpha=adapter.alpha, target_modules=tuple(adapter.target_modules),
        train_steps=candidate.trained.steps, learning_rate=config.train.learning_rate, data_md5=data_version.digest,
        git_commit=git_commit(), config_hash=config.digest(), init_method=candidate.init.method, base_model=base_ref.identity,
        base_revision=base_ref.revision or "n/a (local files; identity is a content hash)", eval_split=candidate.evaluation.split,
        metrics=dict(candidate.evaluation.metrics), split_md5s=dict(split_md5s),
        intruder_dimensions=round(float(spectral["intruders_total"])) if spectral else None,
        checkpoint_merge=candidate.merge.tag_text() if candidate.merge else None, variant=adapter.variant,
    )


@task(name="promote", retries=0, **STAGE)
def promote_stage(config, uri: str, lock_dir: Path) -> Promotion:
    """promotion.promote auto: the gate after registration; a refusal or a registry conflict leaves the version at staging."""
    from adapterflow.errors import RegistryError
    from adapterflow.tasks.promote import promote

    registry = config.registry
    try:
        decision = promote(registry.model_name, uri, lock_dir, registry.staging_alias, registry.production_alias)
    except RegistryError as err:
        return Promotion(False, str(err))
    return Promotion(decision.promoted, decision.reason)


@task(name="close-tracking-run", **STORAGE_RETRIES, **STAGE)
def close_run_stage(run: RunRef, stage_seconds: Mapping[str, float]) -> None:
    from adapterflow.tasks.tracking import end_run

    log_metrics(run, stage_seconds, prefix="stage_seconds/")
    end_run(run, "FINISHED")
