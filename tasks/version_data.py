"""The run's data snapshot, and its versioning with DVC.

At its start a run copies every split file into its own folder, hashing the bytes as it copies them
(`snapshot_splits`). From then on it reads only that copy: validation, init, training, evaluation,
DVC and the version's md5 tags all see exactly the bytes that were hashed, whatever happens to the
original files (or to another run of the same config) meanwhile.

The DVC repo lives in the state folder (the user's git tree is never touched) and is shared by
every run: each run's add + push happens under an exclusive lock beside it, and DVC's per-file md5s
must equal the snapshot's. Its remote is the local default or `tracking.dvc_remote`. The DVC md5 of
the snapshot folder is the run's data digest.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from adapterflow.errors import DataError
from adapterflow.redact import redact_text
from adapterflow.tasks.data_io import split_files
from adapterflow.tasks.embedded_store import exclusive_lock

if TYPE_CHECKING:
    from adapterflow.tasks.config import RunConfig

REMOTE_NAME = "adapterflow"
SNAPSHOT_FOLDER = "data"  # in the run folder: <split><suffix> per split
_CHUNK = 1 << 20


@dataclass(frozen=True)
class Snapshot:
    """The run's own copy of its split files."""

    config: RunConfig  # the run's config, its data.train/validation/test pointing at the copies
    md5s: dict[str, str]  # split -> md5 of the copied bytes (what DVC records for the file)
    sources: dict[str, str]  # copy -> the file the config named

    def naming_sources(self, message: str) -> str:
        """A message about a copy, naming the file the user knows instead (the bytes are the same)."""
        for copy, source in self.sources.items():
            message = message.replace(copy, source)
        return message


def snapshot_splits(config, run_dir: Path) -> Snapshot:
    """Copy each split file into `run_dir/data/`, hashing it in the same single read."""
    folder = run_dir / SNAPSHOT_FOLDER
    folder.mkdir()
    if config.data.dataset is not None:
        return _materialized(config, folder)
    copies, md5s, sources = {}, {}, {}
    for split, path in split_files(config.data).items():
        copy = folder / (split + Path(path).suffix)
        md5s[split] = _copy_hashing(Path(path), copy, split)
        copies[split], sources[str(copy)] = str(copy), path
    run_config = config.model_copy(update={"data": config.data.model_copy(update=copies)})
    return Snapshot(run_config, md5s, sources)


def _materialized(config, folder: Path) -> Snapshot:
    """A data.dataset source's splits written into the run folder; from here on a run reads them as split files."""
    from adapterflow.tasks.data_sources import materialize

    source = config.data.dataset
    files = materialize(source, folder)
    md5s = {split: hashlib.md5(path.read_bytes()).hexdigest() for split, path in files.items()}
    data = config.data.model_copy(update={"dataset": None, **{split: str(path) for split, path in files.items()}})
    sources = {str(path): f"{source.path} (split {source.splits[split]})" for split, path in files.items()}
    return Snapshot(config.model_copy(update={"data": data}), md5s, sources)


def _copy_hashing(source: Path, copy: Path, split: str) -> str:
    if not source.is_file():
        raise DataError(f"data.{split}: file not found: {source}. Check the path (relative paths are read from the config's folder).")
    digest = hashlib.md5()
    try:
        with open(source, "rb") as reader, open(copy, "xb") as writer:
            while chunk := reader.read(_CHUNK):
                digest.update(chunk)
                writer.write(chunk)
    except OSError as err:
        raise DataError(
            f"data.{split}: cannot copy {source} into the run folder ({err.strerror or err}). "
            f"Check that the file is readable and the state folder {copy.parents[2]} is writable and has free space."
        ) from None
    return digest.hexdigest()


@dataclass(frozen=True)
class DataVersion:
    digest: str  # DVC md5 of the snapshot folder
    files: dict[str, str]  # split -> DVC md5 of that file
    paths: dict[str, str]  # split -> the run's copy of the file the config named (the bytes versioned)
    dvc_file: str  # the .dvc file that pins this version (restore with dvc checkout / pull)
    remote: str
    push_error: str | None = None  # the push failed (an outage of the remote): DVC's message, redacted

    def to_dict(self) -> dict:
        return asdict(self)


def version_data(snapshot: Snapshot, repo: Path, default_remote: Path, run_dir: Path) -> DataVersion:
    """DVC add + push of the run's snapshot; DVC's per-file md5s must be the snapshot's.

    The repo's folder for this config name is replaced on every run: another run of the same name
    waits for the lock instead of swapping its files in between the copy and the add. The .dvc file
    this version pins is copied into the run folder under the lock, for the same reason.
    """
    config, split_md5s = snapshot.config, snapshot.md5s
    remote = config.tracking.dvc_remote or str(default_remote)
    folder = repo / "datasets" / config.name
    with exclusive_lock(repo.parent / (repo.name + ".lock")):  # one run at a time in the shared repo and its cache
        _ensure_repo(repo, remote)
        _replace_snapshot(folder, split_files(config.data))
        _dvc(repo, "add", str(folder.relative_to(repo)))
        push_error = _try(_dvc, repo, "push", "-r", REMOTE_NAME)
        dvc_file = folder.with_name(folder.name + ".dvc")
        digest = yaml.safe_load(dvc_file.read_text())["outs"][0]["md5"]
        files = _file_md5s(repo, digest, config)
        dvc_text = dvc_file.read_text()
    _check_integrity(files, split_md5s, config.name)
    pinned = run_dir / SNAPSHOT_FOLDER / dvc_file.name  # the repo's copy is replaced by the next run of this name
    pinned.write_text(dvc_text)
    return DataVersion(
        digest=digest.removesuffix(".dir"), files=files, paths=split_files(config.data), dvc_file=str(pinned), remote=remote,
        push_error=push_error,
    )


def push_pinned(repo: Path, dvc_file: Path, remote: str) -> str | None:
    """Push the data a run's own .dvc file pins (the repo's folder for that name may hold a later run's data
    by now): the file is placed in the repo for the push only. None when pushed, else DVC's error."""
    pending = repo / "pending" / dvc_file.parent.parent.name
    with exclusive_lock(repo.parent / (repo.name + ".lock")):
        _ensure_repo(repo, remote)
        pending.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(dvc_file, pending / dvc_file.name)
        try:
            return _try(_dvc, repo, "push", "-r", REMOTE_NAME, str((pending / dvc_file.name).relative_to(repo)))
        finally:
            shutil.rmtree(pending, ignore_errors=True)


def _try(step, *args) -> str | None:
    try:
        step(*args)
    except DataError as err:
        return str(err)
    return None


def _check_integrity(dvc_md5s: Mapping[str, str], split_md5s: Mapping[str, str], name: str) -> None:
    wrong = {split: (dvc_md5s.get(split), md5) for split, md5 in split_md5s.items() if dvc_md5s.get(split) != md5}
    if wrong:
        detail = "; ".join(f"{split}: DVC {recorded}, run {md5}" for split, (recorded, md5) in wrong.items())
        raise DataError(
            f"data integrity check failed for {name}: DVC versioned other bytes than this run read ({detail}). "
            "Nothing was registered. Another process changed the run's data snapshot or the DVC repo; rerun the config."
        )


def _ensure_repo(repo: Path, remote: str) -> None:
    if not (repo / ".dvc").is_dir():
        repo.mkdir(parents=True, exist_ok=True)
        _dvc(repo, "init", "--no-scm", "-q")
        _dvc(repo, "config", "core.analytics", "false")
        _dvc(repo, "config", "core.check_update", "false")
    if "://" not in remote:
        Path(remote).mkdir(parents=True, exist_ok=True)
    if f"url = {remote}\n" not in (repo / ".dvc" / "config").read_text():  # skip a 1 s dvc call when set
        _dvc(repo, "remote", "add", "-f", "-d", REMOTE_NAME, remote)


def _replace_snapshot(snapshot: Path, files: dict[str, str]) -> None:
    if snapshot.exists():
        shutil.rmtree(snapshot)
    snapshot.mkdir(parents=True)
    for split, path in files.items():
        shutil.copyfile(path, snapshot / (split + Path(path).suffix))


def _file_md5s(repo: Path, dir_md5: str, config) -> dict[str, str]:
    """Per-file md5s from DVC's own manifest of the folder (the .dir object in its cache)."""
    manifest = repo / ".dvc" / "cache" / "files" / "md5" / dir_md5[:2] / dir_md5[2:]
    entries = {Path(e["relpath"]).stem: e["md5"] for e in json.loads(manifest.read_text())}
    return {split: entries[split] for split in split_files(config.data)}


def _dvc(repo: Path, *args: str) -> str:
    result = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=repo, capture_output=True, text=True)
    if result.returncode != 0:
        message = (result.stderr or result.stdout).strip().splitlines()
        # The command line and DVC's words may hold a remote URI with credentials.
        raise DataError(redact_text(f"dvc {' '.join(args)} failed in {repo}: {message[-1] if message else 'no output'}"))
    return result.stdout
