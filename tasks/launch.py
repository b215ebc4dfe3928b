"""Training as a subprocess through `accelerate launch`, one process or several (DDP/FSDP).

Why a subprocess: CUDA memory is released when it ends, an OOM kills it and not the flow, and a
cancelled flow kills its whole process group. The init products are computed once by the flow and
read by every rank from the init folder; no rank recomputes a data-driven init.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from adapterflow import errors
from adapterflow.errors import TrainingError
from adapterflow.redact import redact_text
from adapterflow.tasks.resume import complete_checkpoints

JOB_FILE, RESULT_FILE, ERROR_FILE = "train_job.json", "train_result.json", "train_error.json"
LOG_FILE, PID_FILE = "train_process.log", "train.pid"
KILL_GRACE_SECONDS = 10.0
STARTUP_NOTE_SECONDS = 5.0  # while the workers start: a line this often until their first journal record
STARTUP_POLL_SECONDS = 0.5


def launch_training(config, base_ref, init_dir: Path, run_dir: Path, resume_from: str | None = None, say=None):
    """The workers report through the run's journal only (tasks/journal.py): they need no tracking server.

    Until their first journal record (~10 s of imports and model loading) `say` (flows/progress.py's by default)
    tells that they are starting, then every few seconds that they still are (WorkerStartup).
    """
    from adapterflow.tasks.journal import JOURNAL_FILE
    from adapterflow.tasks.train import TrainResult

    job = _write_job(config, base_ref, init_dir, run_dir, resume_from)
    startup = WorkerStartup(run_dir / JOURNAL_FILE, config.train.launch.processes, say or _say)
    with open(run_dir / LOG_FILE, "ab") as log:
        process = subprocess.Popen(
            accelerate_command(config, job), stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=run_dir,
        )
    (run_dir / PID_FILE).write_text(str(process.pid))
    with _group_killed_on_exit(process):
        code = wait_reporting_startup(process, startup)
    if code != 0:
        raise _failure(code, run_dir)
    return TrainResult(**json.loads((run_dir / RESULT_FILE).read_text()))


class WorkerStartup:
    """The workers' startup, until their first journal record: one line as they start, then one every
    `every_seconds` while they still are. A resumed run's journal has old records: only lines after
    `offset` (its size at launch) count."""

    def __init__(self, journal: Path, processes: int, say, every_seconds: float = STARTUP_NOTE_SECONDS, clock=time.monotonic):
        self.journal, self.processes, self.say, self.every_seconds, self.clock = Path(journal), processes, say, every_seconds, clock
        self.offset = self.journal.stat().st_size if self.journal.exists() else 0
        self.start = clock()
        self.next_note = self.start + every_seconds
        self.started = False
        say(f"{'train':<10} starting {self._workers()}…")

    def poll(self) -> bool:
        """True once the workers have written to the journal; until then, a line every `every_seconds`."""
        from adapterflow.tasks.journal import read_records

        if not self.started:
            self.started = bool(read_records(self.journal, self.offset)[0])
        now = self.clock()
        if not self.started and now >= self.next_note:
            self.say(f"{'train':<10} still starting {self._workers()} ({now - self.start:.0f} s so far)")
            self.next_note += self.every_seconds
        return self.started

    def _workers(self) -> str:
        return f"{self.processes} accelerate worker{'s' if self.processes != 1 else ''}"


def wait_reporting_startup(process: subprocess.Popen, startup: WorkerStartup, interval: float = STARTUP_POLL_SECONDS) -> int:
    """`process.wait()`, polling `startup` until the workers are up."""
    while not startup.poll():
        try:
            return process.wait(interval)
        except subprocess.TimeoutExpired:
            continue
    return process.wait()


def _say(text: str) -> None:
    from adapterflow.flows.progress import say

    say(text)


def accelerate_command(config, job: Path) -> list[str]:
    """`accelerate launch` with every setting on the command line: no accelerate config file is read."""
    from adapterflow.tasks.train import pick_device, resolve_precision

    launch, device = config.train.launch, pick_device(config.train.device)
    precision = resolve_precision(config.train.precision, device)
    precision = "no" if precision == "fp32" else precision  # accelerate's name for full precision
    command = [
        sys.executable, "-m", "adapterflow.tasks.die_with_parent", sys.executable, "-m", "accelerate.commands.launch",
        "--num_machines", "1", "--num_processes", str(launch.processes), "--mixed_precision", precision, "--dynamo_backend", "no",
    ]
    if launch.strategy == "fsdp" and launch.processes > 1:
        command += ["--use_fsdp", "--fsdp_use_orig_params", "true", "--fsdp_sharding_strategy", "FULL_SHARD"]
    elif launch.processes > 1:
        # torchrun under accelerate's "multi_gpu" launcher; on CPU the Trainer's use_cpu picks gloo
        # (accelerate's --cpu with several processes means mpirun, which is not installed).
        command.append("--multi_gpu")
    elif device == "cpu":
        command.append("--cpu")
    if launch.processes > 1:
        command += ["--main_process_port", str(launch.main_port or _free_port())]
    return command + ["-m", "adapterflow.tasks.train_worker", str(job)]


def _write_job(config, base_ref, init_dir: Path, run_dir: Path, resume_from: str | None) -> Path:
    """The job for every rank: no credentials in it (the config is masked), and readable by this user only."""
    from dataclasses import asdict

    from adapterflow.tasks.tracking import public_config

    job = run_dir / JOB_FILE
    for stale in (RESULT_FILE, ERROR_FILE, JOB_FILE):
        (run_dir / stale).unlink(missing_ok=True)
    text = json.dumps({
        "config": public_config(config), "base_ref": asdict(base_ref), "init_dir": str(init_dir),
        "run_dir": str(run_dir), "resume_from": resume_from,
    }, indent=1)
    # Created 0600 (not chmod-ed afterwards: no moment where another user could open it).
    with os.fdopen(os.open(job, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as handle:
        handle.write(text)
    return job


@contextmanager
def _group_killed_on_exit(process: subprocess.Popen):
    """Ctrl-C, a cancel (SIGTERM to the flow) or any error here kills every training process."""
    previous = _raise_on_sigterm()
    try:
        yield
    except BaseException:
        _kill_group(process)
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _raise_on_sigterm():
    if threading.current_thread() is not threading.main_thread():
        return None  # signals reach only the main thread; die_with_parent still covers a killed flow

    def cancelled(signum, frame):
        raise TrainingError("training was cancelled (SIGTERM); the training processes were stopped and nothing was registered.")

    return signal.signal(signal.SIGTERM, cancelled)


def _kill_group(process: subprocess.Popen) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(KILL_GRACE_SECONDS)
            return
        except subprocess.TimeoutExpired:
            continue


def _failure(code: int, run_dir: Path) -> Exception:
    """The worker's own error when it wrote one; otherwise how the process ended and its last lines.

    The worker's error (divergence, a bad config) is deterministic: a rerun would fail the same way, so
    it never promises a resume.
    """
    error_file = run_dir / ERROR_FILE
    if error_file.exists():
        error = json.loads(error_file.read_text())
        kind = getattr(errors, error["type"], None)
        known = isinstance(kind, type) and issubclass(kind, errors.AdapterflowError)
        return (kind if known else TrainingError)(redact_text(error["message"]))
    how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
    if code in (-signal.SIGKILL, 137):
        how += " (out of memory? the kernel's OOM killer sends SIGKILL)"
    tail = redact_text("\n".join(_read_log(run_dir / LOG_FILE).splitlines()[-15:]))
    return TrainingError(
        f"the training process {how}. Nothing was registered. {_rerun_note(run_dir)} "
        f"Log: {run_dir / LOG_FILE}; its last lines:\n{tail}"
    )


def _rerun_note(run_dir: Path) -> str:
    """What a rerun of the same config does: resume only where a complete checkpoint exists to resume from."""
    if complete_checkpoints(run_dir / "checkpoints"):
        return "A rerun of the same config resumes from the last checkpoint."
    return "No checkpoint was saved, so a rerun of the same config starts training over."


def _read_log(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
