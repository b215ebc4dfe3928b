"""Resuming an interrupted training: the rerun of the same config, data and base continues its last checkpoint.

A run folder is interrupted only when its flow is gone. The flow holds an exclusive flock on the
folder's lock file while it runs (`alive_while`); the OS releases it when the process ends, however
it ends (SIGKILL, OOM, a crash). A run whose lock is held is alive, and its checkpoints are never
taken over: it rotates them away as it trains.
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Mapping
from contextlib import contextmanager
from pathlib import Path

KEY_FILE, RESULT_FILE, LOCK_FILE = "resume_key.json", "train_result.json", "run.lock"


@contextmanager
def alive_while(run_dir: Path):
    """Marks the run folder as in use for the block (the flow's life): no other run resumes from it meanwhile."""
    with open(run_dir / LOCK_FILE, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a new folder: nobody else can hold it
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def is_alive(run_dir: Path) -> bool:
    """Whether a process holds the run folder's lock now (tried without waiting, and released at once)."""
    try:
        descriptor = os.open(run_dir / LOCK_FILE, os.O_RDONLY)
    except FileNotFoundError:  # from before the lock existed, or gone with its folder: nobody holds it
        return False
    except OSError:  # another user's run, say: what cannot be checked is not taken over
        return True
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    else:
        fcntl.flock(descriptor, fcntl.LOCK_UN)
        return False
    finally:
        os.close(descriptor)


def resume_key(config, base_ref, split_md5s: Mapping[str, str]) -> dict:
    """What an interrupted run must share with this one to be continued: config, split files, base."""
    return {"config_hash": config.digest(), "data_md5": dict(split_md5s), "base": base_ref.identity}


def interrupted_checkpoint(run_dir: Path, key: dict, name: str) -> str | None:
    """The last complete checkpoint of the newest earlier run with this key that never finished training.

    Runs still alive (another flow running the same config now) are skipped. Of the others, only the
    newest matching run counts: an older interrupted run was already superseded.
    """
    (run_dir / KEY_FILE).write_text(json.dumps(key))
    earlier = [d for d in run_dir.parent.glob(f"{name}-*") if d != run_dir and _same_key(d, key) and not is_alive(d)]
    if not earlier:
        return None
    newest = max(earlier, key=lambda d: d.name)  # run folders are named <name>-<date>-<time>-<id>
    if (newest / RESULT_FILE).exists():
        return None
    return _last_complete_checkpoint(newest / "checkpoints")


def _same_key(run_dir: Path, key: dict) -> bool:
    try:
        return json.loads((run_dir / KEY_FILE).read_text()) == key
    except (OSError, ValueError):
        return False


def _last_complete_checkpoint(folder: Path) -> str | None:
    complete = complete_checkpoints(folder)
    if not complete:
        return None
    return str(max(complete, key=lambda c: int(c.name.split("-")[-1])))


def complete_checkpoints(folder: Path) -> list[Path]:
    """The checkpoints whose save finished.

    trainer_state.json is the Trainer's last write of a checkpoint. A kill during that write leaves it
    empty or cut off, and resuming from it fails, so the file must hold a whole JSON object.
    """
    return [c for c in folder.glob("checkpoint-*") if _holds_json_object(c / "trainer_state.json")]


def _holds_json_object(path: Path) -> bool:
    try:
        return isinstance(json.loads(path.read_text()), dict)
    except (OSError, ValueError):
        return False


def mark_finished(run_dir: Path, result: dict) -> None:
    (run_dir / RESULT_FILE).write_text(json.dumps(result, indent=1))
