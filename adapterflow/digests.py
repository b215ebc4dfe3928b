"""File digests, one helper for the whole package: DVC's md5 for data lineage, sha256 for the init cache."""

from __future__ import annotations

import hashlib
from pathlib import Path


def file_digest(path: str | Path, algorithm: str) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, algorithm).hexdigest()


def file_md5(path: str | Path) -> str:
    """The digest DVC records for a file."""
    return file_digest(path, "md5")
