"""`python -m tasks.die_with_parent CMD...`: run CMD so that it gets SIGTERM when its parent dies.

Linux's PR_SET_PDEATHSIG survives exec, so the accelerate launcher started this way dies even when
the flow process is SIGKILLed (no chance to clean up); the training workers set it for themselves.
Kept free of heavy imports: it only sets the flag and execs.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


if __name__ == "__main__":
    die_with_parent()
    os.execvp(sys.argv[1], sys.argv[1:])
