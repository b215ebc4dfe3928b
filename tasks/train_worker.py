"""One training process started by `accelerate launch` (see tasks/launch.py): `python -m tasks.train_worker JOB`.

Every rank trains; rank 0 alone saves the adapter and writes the result, or the error a user can
act on, for the flow to read. Progress and metrics go to the run's journal (tasks/journal.py), which the
flow follows and ships: this process never talks to a tracking server. What it writes (its error file,
its log) is redacted.
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
    from adapterflow.flows.console import redact_every_log_handler
    from adapterflow.tasks.config import RunConfig
    from adapterflow.tasks.model_io import BaseModelRef
    from adapterflow.tasks.state import quiet_library_noise
    from adapterflow.tasks.train import train_adapter

    quiet_library_noise()
    redact_every_log_handler()  # a library's warning quoting a URL reaches the training log masked
    config = RunConfig.model_validate(job["config"])
    base_ref = BaseModelRef(**job["base_ref"])
    return train_adapter(config, base_ref, Path(job["init_dir"]), Path(job["run_dir"]), job["resume_from"])


def _is_user_error(err: Exception) -> bool:
    from adapterflow.errors import AdapterflowError

    return isinstance(err, AdapterflowError)


def _write_if_rank_zero(path: Path, payload: dict) -> None:
    if int(os.environ.get("RANK", "0")) == 0:
        path.write_text(json.dumps(payload, indent=1))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
