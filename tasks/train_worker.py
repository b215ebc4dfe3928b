"""One training process started by `accelerate launch` (see tasks/launch.py): `python -m tasks.train_worker JOB`.

Every rank trains; rank 0 alone saves the adapter and writes the result, or the error a user can
act on, for the flow to read. The job file holds the tracking URI redacted; the real one comes in
the environment (launch.TRACKING_URI_ENV). What this process writes (its error file, its log) is redacted.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from dataclasses import asdict
from pathlib import Path


def main(job_path: str) -> int:
    from adapterflow.redact import redact_text
    from adapterflow.tasks.die_with_parent import die_with_parent

    die_with_parent()  # the launcher dies with the flow; the workers die with the launcher
    job = json.loads(Path(job_path).read_text())
    run_dir = Path(job["run_dir"])
    try:
        result = _train(job)
    except Exception as err:
        if _is_user_error(err):
            message = redact_text(str(err))
            _write_if_rank_zero(run_dir / "train_error.json", {"type": type(err).__name__, "message": message})
            print(f"error: {message}", file=sys.stderr)
            return 3
        # A bug: its traceback goes to the training log (the flow shows its last lines), credentials masked.
        print(redact_text(traceback.format_exc()), file=sys.stderr, end="")
        return 1
    _write_if_rank_zero(run_dir / "train_result.json", asdict(result))
    return 0


def _train(job: dict):
    from adapterflow.tasks.config import RunConfig
    from adapterflow.tasks.model_io import BaseModelRef
    from adapterflow.tasks.state import quiet_library_noise
    from adapterflow.tasks.train import train_adapter

    quiet_library_noise()
    tracking = _tracking(job)
    _redact_logs(tracking)
    config = RunConfig.model_validate(job["config"])
    base_ref = BaseModelRef(**job["base_ref"])
    return train_adapter(config, base_ref, Path(job["init_dir"]), Path(job["run_dir"]), tracking, job["resume_from"])


def _tracking(job: dict) -> dict | None:
    """{"uri", "run_id"} with the real URI from the environment (the job file's is redacted)."""
    from adapterflow.tasks.launch import TRACKING_URI_ENV

    tracking = job["tracking"]
    if not tracking:
        return None
    return {**tracking, "uri": os.environ.get(TRACKING_URI_ENV) or tracking["uri"]}


def _redact_logs(tracking: dict | None) -> None:
    """MLflow's warnings (a retried request names its URL) reach the training log masked."""
    from adapterflow.flows.console import redact_every_log_handler

    if tracking:
        import mlflow  # noqa: F401  (it sets up its own log handler, which must get the filter too)

    redact_every_log_handler()


def _is_user_error(err: Exception) -> bool:
    from adapterflow.errors import AdapterflowError

    return isinstance(err, AdapterflowError)


def _write_if_rank_zero(path: Path, payload: dict) -> None:
    if int(os.environ.get("RANK", "0")) == 0:
        path.write_text(json.dumps(payload, indent=1))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
