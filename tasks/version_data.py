"""Dataset versioning with DVC: the exact split files used are added to a DVC repo and pushed.

The repo lives in the state folder (the user's git tree is never touched); its remote is the
local default or `tracking.dvc_remote`. The DVC md5 of the snapshot is the run's data digest.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from adapterflow.errors import DataError
from adapterflow.tasks.data_io import split_files

REMOTE_NAME = "adapterflow"


@dataclass(frozen=True)
class DataVersion:
    digest: str  # DVC md5 of the snapshot folder
    files: dict[str, str]  # split -> DVC md5 of that file
    paths: dict[str, str]  # split -> the file the config named
    dvc_file: str  # the .dvc file that pins this version (restore with dvc checkout / pull)
    remote: str

    def to_dict(self) -> dict:
        return asdict(self)


def version_data(config, repo: Path, default_remote: Path) -> DataVersion:
    remote = config.tracking.dvc_remote or str(default_remote)
    _ensure_repo(repo, remote)
    snapshot = repo / "datasets" / config.name
    _replace_snapshot(snapshot, split_files(config.data))
    _dvc(repo, "add", str(snapshot.relative_to(repo)))
    _dvc(repo, "push", "-r", REMOTE_NAME)
    dvc_file = snapshot.with_name(snapshot.name + ".dvc")
    digest = yaml.safe_load(dvc_file.read_text())["outs"][0]["md5"]
    return DataVersion(
        digest=digest.removesuffix(".dir"), files=_file_md5s(repo, digest, config), paths=split_files(config.data),
        dvc_file=str(dvc_file), remote=remote,
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
        raise DataError(f"dvc {' '.join(args)} failed in {repo}: {message[-1] if message else 'no output'}")
    return result.stdout
