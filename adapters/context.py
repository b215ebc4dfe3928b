"""What an initializer may use besides the model: a probe batch for invariants, later calibration data."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class InitContext:
    probe: dict[str, Any]  # model inputs used to check that outputs are preserved
    calibration: Any = None  # an iterable of batches, for methods that need data
    extras: dict[str, Any] = field(default_factory=dict)
