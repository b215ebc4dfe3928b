"""Thin Prefect tasks over the plain stage functions in tasks/, each with its retry policy.

Deterministic failures (bad data, bad config, divergence) are never retried; only the steps
that talk to storage retry, and registration never does (a retry could register twice).
"""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE

STAGE = dict(cache_policy=NO_CACHE, persist_result=False)


@task(name="validate-data", retries=0, **STAGE)
def validate_stage(config, run_dir: Path) -> dict:
    from adapterflow.tasks.validate_data import validate_data

    report = validate_data(config)
    files = report.write(run_dir / "validation")
    create_table_artifact(table=report.as_table(), key="data-validation", description=f"Data validation for {config.name}: passed")
    return {"files": {k: str(v) for k, v in files.items()}, "row_counts": report.row_counts, "checks": len(report.rows)}


@task(name="version-data", retries=2, retry_delay_seconds=2, **STAGE)
def version_stage(config, repo: Path, default_remote: Path):
    from adapterflow.tasks.version_data import version_data

    return version_data(config, repo, default_remote)


@task(name="open-tracking-run", retries=2, retry_delay_seconds=2, **STAGE)
def open_run_stage(config, uri: str, artifacts_root: Path, validation_files: dict, base_ref) -> str:
    from adapterflow.tasks.track import open_run

    return open_run(config, uri, artifacts_root, validation_files, base_ref)


@task(name="initialize-adapter", retries=0, **STAGE)
def init_stage(config, base_ref, run_dir: Path, cache_root: Path):
    from adapterflow.tasks.init_adapter import initialize_adapter

    return initialize_adapter(config, base_ref, run_dir, cache_root)


@task(name="train", retries=0, **STAGE)
def train_stage(config, base_ref, init_dir: str, run_dir: Path, tracking: dict):
    from adapterflow.tasks.launch import launch_training
    from adapterflow.tasks.resume import interrupted_checkpoint, mark_finished, resume_key
    from adapterflow.tasks.train import train_adapter

    resume_from = interrupted_checkpoint(run_dir, resume_key(config, base_ref), config.name)
    if resume_from:
        get_run_logger().info(f"resuming the interrupted run's training from {resume_from}")
    train = launch_training if config.train.launch.mode == "accelerate" else train_adapter
    result = train(config, base_ref, Path(init_dir), run_dir, tracking, resume_from)
    mark_finished(run_dir, result.to_dict())
    return result


@task(name="choose-merged-or-final", retries=0, **STAGE)
def merge_choice_stage(config, base_ref, trained) -> dict:
    from adapterflow.tasks.checkpoint_merge import choose_adapter

    return choose_adapter(config, base_ref, trained.adapter_dir, trained.merged_adapter_dir, trained.merge)


@task(name="evaluate", retries=0, **STAGE)
def evaluate_stage(config, base_ref, adapter_dir: str, plots_dir: Path) -> dict:
    from adapterflow.tasks.evaluate import evaluate_adapter

    plots_dir.mkdir(parents=True, exist_ok=True)
    return evaluate_adapter(config, base_ref, Path(adapter_dir), config.evaluate.split, plots_dir)


@task(name="spectral-report", retries=0, **STAGE)
def spectral_stage(config, base_ref, adapter_dir: str, out_dir: Path) -> dict:
    from adapterflow.tasks.spectral_report import write_spectral_report

    return write_spectral_report(config, base_ref, Path(adapter_dir), out_dir)


@task(name="register", retries=0, **STAGE)
def register_stage(config, uri: str, run_id: str, adapter_dir: str, base_ref, tags: dict, description: str) -> str:
    from adapterflow.tasks.track import register_adapter

    return register_adapter(config, uri, run_id, Path(adapter_dir), base_ref, tags, description)


@task(name="promote", retries=0, **STAGE)
def promote_stage(config, uri: str, lock_dir: Path):
    from adapterflow.tasks.promote import promote

    registry = config.registry
    return promote(registry.model_name, uri, lock_dir, registry.staging_alias, registry.production_alias)
