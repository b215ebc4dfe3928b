"""Resuming an interrupted training: the rerun of the same config, data and base continues its last checkpoint."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

KEY_FILE, RESULT_FILE = "resume_key.json", "train_result.json"


def resume_key(config, base_ref, split_md5s: Mapping[str, str]) -> dict:
    """What an interrupted run must share with this one to be continued: config, split files, base."""
    return {"config_hash": config.digest(), "data_md5": dict(split_md5s), "base": base_ref.identity}


def interrupted_checkpoint(run_dir: Path, key: dict, name: str) -> str | None:
    """The last complete checkpoint of the newest earlier run with this key that never finished training.

    Only the newest matching run counts: an older interrupted run was already superseded.
    """
    (run_dir / KEY_FILE).write_text(json.dumps(key))
    earlier = [d for d in run_dir.parent.glob(f"{name}-*") if d != run_dir and _same_key(d, key)]
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
    # trainer_state.json is the Trainer's last write of a checkpoint: without it the save was cut short.
    complete = [c for c in folder.glob("checkpoint-*") if (c / "trainer_state.json").exists()]
    if not complete:
        return None
    return str(max(complete, key=lambda c: int(c.name.split("-")[-1])))


def mark_finished(run_dir: Path, result: dict) -> None:
    (run_dir / RESULT_FILE).write_text(json.dumps(result, indent=1))
