"""On-disk cache of init products, so a scheduled retrain on the same base pays for an init once.

An entry is a folder named by the hash of everything the products depend on. It is written under
a temporary name and renamed into place, so a crash mid-write never leaves an entry that looks
complete; each file's sha256 is checked on every read.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path

from adapterflow.digests import file_digest
from adapterflow.errors import InitError

MANIFEST = "manifest.json"
PRODUCTS = "init"


class InitCache:
    def __init__(self, root: Path):
        self.root = Path(root)

    @staticmethod
    def key(parts: dict) -> str:
        return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]

    def fetch(self, key: str, destination: Path) -> dict | None:
        """Copy the entry's products to `destination` and return its stored report; None on a miss."""
        entry = self.root / key
        if not entry.is_dir():
            return None
        manifest = self._verified_manifest(entry)
        shutil.copytree(entry / PRODUCTS, destination)
        return manifest["report"]

    def store(self, key: str, products: Path, report: dict) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        staging = self.root / f".tmp-{key}-{uuid.uuid4().hex[:8]}"
        shutil.copytree(products, staging / PRODUCTS)
        files = {str(p.relative_to(staging)): _sha256(p) for p in sorted((staging / PRODUCTS).rglob("*")) if p.is_file()}
        (staging / MANIFEST).write_text(json.dumps({"key": key, "files": files, "report": report}, indent=1))
        try:
            os.rename(staging, self.root / key)
        except OSError:  # another run stored the same key first: keep theirs
            shutil.rmtree(staging, ignore_errors=True)

    def _verified_manifest(self, entry: Path) -> dict:
        try:
            manifest = json.loads((entry / MANIFEST).read_text())
            bad = [name for name, digest in manifest["files"].items() if _sha256(entry / name) != digest]
        except (OSError, ValueError, KeyError) as err:
            bad = [f"{MANIFEST} ({err.__class__.__name__})"]
        if bad:
            raise InitError(
                f"init cache entry {entry} is corrupt ({', '.join(bad)} do not match what was stored). "
                f"Delete it (rm -r {entry}) and rerun; the init is recomputed."
            )
        return manifest


def _sha256(path: Path) -> str:
    return file_digest(path, "sha256")
