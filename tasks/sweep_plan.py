"""What a sweep tries: `--grid key=v1,v2` axes (every combination) and `--range key=low:high[:log|int]` (sampled by
Optuna's TPE over `--trials N`), each trial a list of `--set` overrides; and how the winner is picked.

Values are read as YAML, exactly as `--set` reads them, and every trial's config is checked by the schema
before the first one trains, so a typo in a key or a value fails the sweep at once, naming the trial.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Any

import yaml

from adapterflow.errors import ConfigError
from adapterflow.tasks.config_sources import parse_yaml_value

MAX_GRID_TRIALS = 256  # a grid past this is almost always a typo in a list; --trials samples it instead


@dataclass(frozen=True)
class Axis:
    key: str
    values: tuple[Any, ...]


@dataclass(frozen=True)
class Span:
    """A numeric range for Optuna: float (uniform or log-uniform) or int."""

    key: str
    low: float
    high: float
    scale: str = "linear"  # linear | log | int


@dataclass(frozen=True)
class SweepPlan:
    axes: tuple[Axis, ...] = ()
    spans: tuple[Span, ...] = ()
    trials: int | None = None  # None: the whole grid

    @property
    def keys(self) -> list[str]:
        return [a.key for a in self.axes] + [s.key for s in self.spans]

    def grid(self) -> list[dict[str, Any]]:
        """Every combination of the grid axes, in the order given (the last axis varies fastest)."""
        return [dict(zip([a.key for a in self.axes], combo)) for combo in itertools.product(*(a.values for a in self.axes))]

    def size(self) -> int:
        return self.trials if self.trials is not None else math.prod(len(a.values) for a in self.axes)


@dataclass
class TrialResult:
    number: int
    params: dict[str, Any]
    label: str
    run_id: str | None = None
    run_dir: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    error: str | None = None
    pruned: bool = False

    @property
    def ok(self) -> bool:
        return self.error is None and not self.pruned and bool(self.metrics)


def parse_plan(grids: list[str], ranges: list[str], trials: int | None) -> SweepPlan:
    axes = tuple(_parse_axis(text) for text in grids)
    spans = tuple(_parse_span(text) for text in ranges)
    keys = [a.key for a in axes] + [s.key for s in spans]
    repeated = sorted({k for k in keys if keys.count(k) > 1})
    if repeated:
        raise ConfigError(f"sweep: {', '.join(repeated)} is given more than once; give each key one --grid or --range.")
    if not keys:
        raise ConfigError("sweep: nothing to vary. Give --grid key=v1,v2 (e.g. --grid train.learning_rate=1e-4,3e-4) "
                          "or --range key=low:high with --trials N.")
    if spans and trials is None:
        raise ConfigError(f"sweep: --range {spans[0].key} needs --trials N (how many trials Optuna samples from the ranges); "
                          "or list values with --grid.")
    if trials is not None and trials < 1:
        raise ConfigError(f"sweep: --trials must be at least 1, got {trials}.")
    plan = SweepPlan(axes, spans, trials)
    if trials is None and plan.size() > MAX_GRID_TRIALS:
        raise ConfigError(f"sweep: the grid has {plan.size()} combinations (more than {MAX_GRID_TRIALS}); shorten the lists, "
                          "or sample it with --trials N.")
    return plan


def _split_key(text: str, option: str, example: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip() or not value.strip() or any(not part.strip() for part in key.split(".")):
        raise ConfigError(f"sweep: {option} {text!r}: write {option} key.path={example}.")
    return key.strip(), value.strip()


def _parse_axis(text: str) -> Axis:
    key, listed = _split_key(text, "--grid", "v1,v2 (e.g. --grid adapter.r=8,16)")
    try:
        values = parse_yaml_value(f"[{listed}]")  # a YAML flow list: 1e-4 is a number, eva a string, "a,b" one string
    except ValueError as err:
        raise ConfigError(f"sweep: --grid {key}: {listed!r} is not a comma list of YAML values ({err}). "
                          "Quote a value that holds a comma.") from None
    if len(values) != len(set(map(repr, values))):
        raise ConfigError(f"sweep: --grid {key} lists a value twice ({listed}); list each value once.")
    return Axis(key, tuple(values))


def _parse_span(text: str) -> Span:
    key, spec = _split_key(text, "--range", "low:high[:log|int] (e.g. --range train.learning_rate=1e-5:1e-3:log)")
    parts = spec.split(":")
    scale = parts.pop() if len(parts) == 3 else "linear"
    try:
        low, high = (float(p) for p in parts)
    except ValueError:
        raise ConfigError(f"sweep: --range {key}={spec}: low and high must be numbers, as in {key}=1e-5:1e-3:log.") from None
    if scale not in ("linear", "log", "int") or len(parts) != 2:
        raise ConfigError(f"sweep: --range {key}={spec}: write low:high, low:high:log or low:high:int.")
    if not low < high or (scale == "log" and low <= 0):
        raise ConfigError(f"sweep: --range {key}={spec}: needs low < high" + (" and low > 0 on a log scale." if scale == "log" else "."))
    return Span(key, low, high, scale)


def overrides_for(params: dict[str, Any]) -> list[str]:
    """A trial's settings as `--set` overrides, values written back as YAML."""
    return [f"{key}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}" for key, value in params.items()]


def trial_label(params: dict[str, Any]) -> str:
    return ",".join(f"{key.rsplit('.', 1)[-1]}={_short(value)}" for key, value in params.items())


def _short(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def best_trial(results: list[TrialResult], metric: str, lower_is_better: bool) -> TrialResult | None:
    """The best finished trial on `metric`; ties go to the earlier trial (the first grid point listed)."""
    finished = [r for r in results if r.ok and metric in r.metrics and math.isfinite(r.metrics[metric])]
    if not finished:
        return None
    return min(finished, key=lambda r: (r.metrics[metric] if lower_is_better else -r.metrics[metric], r.number))


def check_trials(config_path: str, overrides: list[str], plan: SweepPlan):
    """Every trial's config through the schema before anything trains; returns the base config."""
    from adapterflow.tasks.config import load_config

    base = load_config(config_path, overrides)
    points = plan.grid() if not plan.spans else [{**point, **edge} for point in plan.grid() for edge in _span_edges(plan)]
    for point in points:
        try:
            load_config(config_path, [*overrides, *overrides_for(point)])
        except ConfigError as err:
            raise ConfigError(f"sweep trial {trial_label(point)}: {err}") from None
    return base


def _span_edges(plan: SweepPlan) -> list[dict]:
    """The corners of the ranges: if both ends of every range validate, every sampled value does."""
    return [{s.key: (int(s.low) if s.scale == "int" else s.low) for s in plan.spans},
            {s.key: (int(s.high) if s.scale == "int" else s.high) for s in plan.spans}]
