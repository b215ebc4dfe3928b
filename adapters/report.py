"""What an initializer reports; the flow logs it to MLflow and prints it in the summary."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class InitReport:
    method: str
    seconds: float = 0.0  # the method itself
    check_seconds: float = 0.0  # its run-time invariant checks
    ranks: dict[str, int] = field(default_factory=dict)
    spectra: dict[str, list[float]] = field(default_factory=dict)  # top singular values per layer
    checks: dict[str, float] = field(default_factory=dict)  # invariant name -> measured value
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)
