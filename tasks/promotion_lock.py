"""One promotion or rollback per registered model at a time, across processes on this machine."""

from __future__ import annotations

import fcntl
import hashlib
from contextlib import contextmanager
from pathlib import Path

from adapterflow.errors import RegistryError


@contextmanager
def promotion_lock(lock_dir: Path, uri: str, name: str):
    """A second promotion fails at once with a clear message instead of racing the first."""
    lock_dir.mkdir(parents=True, exist_ok=True)
    path = lock_dir / f"promote-{hashlib.sha256(f'{uri}|{name}'.encode()).hexdigest()[:16]}.lock"
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            message = f"another promotion or rollback of {name} is in progress; run it again when that one has finished."
            raise RegistryError(message) from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
