"""Work a run leaves for later when a service stays down, and `adapterflow register RUN_DIR`, which does it.

A run that trained never dies for tracking. What it could not finish waits in its run folder:
  tracking.outbox.jsonl   MLflow writes (metrics, artifacts, tags, the final status), tasks/outbox.py
  progress.jsonl          the training's metrics past progress.shipped, tasks/metrics_shipper.py
  registration.json       the registration, exactly as it would have been made, tasks/registration.py
  dvc_push.json           the DVC push of the run's data to its remote
`finish_deferred` does all of it, in that order of need: data pushed, tracking shipped, version
registered (once per run however often it is called), alias moved, promotion gate when the config
asks for it, run marked FINISHED.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from adapterflow.errors import ConfigError, DataError, RegistryError
from adapterflow.redact import redact_text, redact_uri
from adapterflow.tasks.outages import OUTAGES, mlflow_answers
from adapterflow.tasks.outbox import Outbox
from adapterflow.tasks.tracking import RunRef, client, flush_outbox

RUN_FILE = "tracking.run.json"
PUSH_FILE = "dvc_push.json"
PROMOTE_FILE = "promotion.json"  # present when the config promotes on registration (promotion.promote: auto)
POLL_SECONDS = 2.0


def save_run(run: RunRef, run_dir: Path) -> None:
    """The MLflow run of this folder, its URI without credentials (the command asks for them again)."""
    (run_dir / RUN_FILE).write_text(json.dumps({"uri": redact_uri(run.uri), "run_id": run.run_id, "started_ms": run.started_ms}))


def load_run(run_dir: Path, uri: str | None = None) -> RunRef:
    try:
        saved = json.loads((run_dir / RUN_FILE).read_text())
    except FileNotFoundError:
        raise ConfigError(f"{run_dir} is not the folder of a run that opened an MLflow run (no {RUN_FILE}). "
                          "Give a folder the run summary named (runs/<name>-<date>-<time>-<id> in the state folder).") from None
    uri = uri or saved["uri"]
    if redact_uri(uri) != uri or "***" in uri:
        raise ConfigError(f"the run's tracking URI {saved['uri']} had a credential, which adapterflow never writes to disk. "
                          "Pass it again with --mlflow-uri, or put the login in MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD.")
    return RunRef(uri, saved["run_id"], str(run_dir), saved.get("started_ms", 0))


def wait_for_server(run: RunRef, seconds: float, say: Callable[[str], None]) -> bool:
    """True as soon as MLflow answers, False after `seconds` of silence."""
    if mlflow_answers(run.uri):
        return True
    OUTAGES.down(run.service(), "the run goes on; what it logs waits in its folder")
    say(f"register   waiting up to {seconds:.0f} s for {run.service()} (tracking.wait_for_server_seconds)")
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(min(POLL_SECONDS, max(deadline - time.monotonic(), 0.0)))
        if mlflow_answers(run.uri):
            OUTAGES.up(run.service())
            return True
    return False


def push_with_retries(data_version, repo: Path, run_dir: Path, budget_seconds: float) -> bool:
    """A failed push is retried with backoff for up to `budget_seconds` (the versioning runs beside training, so
    the wait costs training nothing); then deferred to `adapterflow register`. True when pushed."""
    from adapterflow.tasks.version_data import push_pinned

    service = f"the DVC remote {redact_uri(data_version.remote)}"
    error, delay, deadline = data_version.push_error, 2.0, time.monotonic() + budget_seconds
    OUTAGES.down(service, "the run goes on; its data push is retried")
    while error and time.monotonic() + delay < deadline:
        time.sleep(delay)
        delay = min(2 * delay, 60.0)
        error = push_pinned(repo, Path(data_version.dvc_file), data_version.remote)
    if error:
        (run_dir / PUSH_FILE).write_text(json.dumps({"repo": str(repo), "dvc_file": data_version.dvc_file,
                                                     "remote": data_version.remote, "error": error}))
        return False
    OUTAGES.up(service)
    return True


def pending_work(run_dir: Path) -> list[str]:
    """What is left for `adapterflow register`, in words; empty when the run is complete."""
    from adapterflow.tasks.metrics_shipper import MetricsShipper
    from adapterflow.tasks.registration import REQUEST_FILE, registered_version

    left = []
    if (run_dir / PUSH_FILE).exists():
        left.append(f"the DVC push to {redact_uri(json.loads((run_dir / PUSH_FILE).read_text())['remote'])}")
    if (run_dir / REQUEST_FILE).exists() and registered_version(run_dir) is None:
        left.append("the registration")
    writes = len(Outbox(run_dir).pending())
    if writes:
        left.append(f"{writes} MLflow write(s)")
    if (run_dir / RUN_FILE).exists() and MetricsShipper(run_dir, "unused", "unused", say=lambda _: None).pending():
        left.append("training metrics not yet shipped")
    return left


@dataclass
class Finished:
    pushed: bool = False
    writes: int = 0
    version: str | None = None
    already: bool = False
    promotion: str | None = None
    notes: list[str] = field(default_factory=list)


def finish_deferred(run_dir: Path, uri: str | None = None) -> Finished:
    """Everything the run left for later, now; refuses while the run is still going or its server is down."""
    from adapterflow.tasks.resume import alive_while, is_alive

    run_dir = Path(run_dir).resolve()
    run = load_run(run_dir, uri)
    if is_alive(run_dir):
        raise ConfigError(f"the run in {run_dir} is still going (its process holds run.lock); it registers itself when it ends.")
    if not mlflow_answers(run.uri):
        raise RegistryError(f"{run.service()} still does not answer; nothing was registered. Run this again once it is up.")
    _check_run_exists(run)
    with alive_while(run_dir):  # one `register` at a time per run folder: never two versions for one run
        return _finish(run_dir, run)


def _finish(run_dir: Path, run: RunRef) -> Finished:
    from adapterflow.tasks.metrics_shipper import MetricsShipper
    from adapterflow.tasks.registration import RegistrationRequest, register_adapter, registered_version

    done = Finished(pushed=_push_deferred(run_dir))
    done.writes = _replay_except_end(run, run_dir)
    if not MetricsShipper(run_dir, run.uri, run.run_id).ship():
        raise RegistryError(f"{run.service()} stopped answering while the training metrics were sent; run this again.")
    request = RegistrationRequest.load(run_dir)
    done.version = registered_version(run_dir)
    if request is None:
        done.notes.append("the run did not get as far as registration (it failed or was stopped): its tracking is complete")
    elif done.version is not None:
        done.already = True
    else:
        done.version = register_adapter(request, run, run_dir)
        done.promotion = _promote_if_asked(run_dir, run)
    done.writes += _replay(run)
    return done


def _replay_except_end(run: RunRef, run_dir: Path) -> int:
    """The deferred writes up to the run's final status, which is written after the registration it reports."""
    outbox = Outbox(run_dir)
    ops = outbox.pending()
    cut = next((i for i, op in enumerate(ops) if op["op"] == "terminate"), len(ops))
    if cut == len(ops):
        return _replay(run)
    outbox.path.unlink()
    outbox.add(ops[:cut])
    applied = _replay(run)
    outbox.add(ops[cut:])
    return applied


def _replay(run: RunRef) -> int:
    count = len(Outbox(run.run_dir).pending())
    if not flush_outbox(run):
        raise RegistryError(f"{run.service()} stopped answering while the run's writes were sent; run this again.")
    return count


def _push_deferred(run_dir: Path) -> bool:
    from adapterflow.tasks.version_data import push_pinned

    push_file = run_dir / PUSH_FILE
    if not push_file.exists():
        return False
    push = json.loads(push_file.read_text())
    error = push_pinned(Path(push["repo"]), Path(push["dvc_file"]), push["remote"])
    if error:
        raise DataError(f"the deferred DVC push to {redact_uri(push['remote'])} failed again: {error}. Nothing was registered; "
                        "run this again once the remote answers.")
    push_file.unlink()
    return True


def _promote_if_asked(run_dir: Path, run: RunRef) -> str | None:
    from adapterflow.tasks.promote import promote

    try:
        asked = json.loads((run_dir / PROMOTE_FILE).read_text())
    except FileNotFoundError:
        return None
    try:
        decision = promote(asked["model_name"], run.uri, Path(asked["lock_dir"]), asked["staging_alias"], asked["production_alias"])
    except RegistryError as err:
        return f"not promoted: {err}"
    return f"{'promoted' if decision.promoted else 'not promoted'}: {decision.reason}"


def _check_run_exists(run: RunRef) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client(run.uri).get_run(run.run_id)
    except MlflowException as err:
        raise RegistryError(f"{run.service()} has no run {run.run_id} ({redact_text(str(err).splitlines()[0])}): is it the server this run "
                            "tracked to? Give that one with --mlflow-uri.") from None
