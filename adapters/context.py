"""What an initializer may use besides the model: a probe batch for invariants, calibration data, a progress hook."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Optional

# Called by a data-driven method after each calibration forward (and backward) pass: (passes done, total).
# Total None: open-ended (EVA cycles its batches until its components converge); such a method ends with
# one call (done, done). The caller draws it; this library never prints and never imports the flow.
CalibrationProgress = Callable[[int, Optional[int]], None]


def no_progress(done: int, total: int | None) -> None:
    """The default hook: nobody is watching."""


def reported(items: Iterable, progress: CalibrationProgress) -> Iterator:
    """`items`, reporting each one to `progress` once the loop body that used it is done."""
    total = len(items) if hasattr(items, "__len__") else None
    done = 0
    for item in items:
        yield item
        done += 1
        progress(done, total)
    if total is None:
        progress(done, done)


@dataclass
class InitContext:
    probe: dict[str, Any]  # model inputs used to check that outputs are preserved
    calibration: Any = None  # an iterable of batches, for methods that need data
    extras: dict[str, Any] = field(default_factory=dict)
    progress: CalibrationProgress = no_progress
