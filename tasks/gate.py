"""The promotion gate: staging vs production (or the bare base), both re-evaluated now on the frozen split.

Adapters are never compared by logged numbers: both are evaluated on the staging run's evaluation
file, checked first against the md5 recorded at registration.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

from adapterflow.errors import RegistryError
from adapterflow.tasks.registry_queries import download_adapter
from adapterflow.tasks.registry_tags import VersionTags, split_tag


@dataclass(frozen=True)
class Decision:
    promoted: bool
    candidate: str
    incumbent: str | None  # None: compared with the bare base model
    metric: str
    candidate_value: float
    incumbent_value: float
    reason: str
    forgetting: dict | None = None
    tie_break: dict | None = None  # intruder dimensions of both, when the metric tied


def judge(mlflow_client, name: str, config, candidate, incumbent: str | None) -> Decision:
    """Both adapters evaluated now with the candidate run's gate; nothing in the registry changes here."""
    from adapterflow.tasks.model_io import resolve_base

    gate = config.promotion
    _check_frozen_split(config, name, candidate)
    base_ref = resolve_base(config.model)
    with tempfile.TemporaryDirectory() as tmp:
        challenger = download_adapter(mlflow_client, name, candidate.version, Path(tmp) / "candidate")
        champion = download_adapter(mlflow_client, name, incumbent, Path(tmp) / "incumbent") if incumbent else None
        ours, theirs = _scores(config, base_ref, challenger, champion, config.evaluate.split)
        forgetting = _forgetting(config, base_ref, challenger, champion) if gate.forgetting else None
        metric = config.gate_metric()
        improvement = oriented(metric, ours[metric] - theirs[metric])
        tie = _intruder_tie_break(config, base_ref, challenger, champion, improvement) if champion else None
    promoted, reason = _verdict(config, improvement, ours[metric], theirs[metric], incumbent, forgetting, tie)
    return Decision(promoted, candidate.version, incumbent, metric, ours[metric], theirs[metric], reason, forgetting, tie)


def _verdict(config, improvement: float, ours: float, theirs: float, incumbent, forgetting, tie) -> tuple[bool, str]:
    gate, metric = config.promotion, config.gate_metric()
    against = f"version {incumbent}" if incumbent else "the base model without adapter"
    if incumbent is None and improvement <= 0:
        return False, f"{metric} {ours:.4f} does not beat {against} ({theirs:.4f})"
    if forgetting and forgetting["drop"] > gate.forgetting.tolerance:
        drop, tolerance = forgetting["drop"], gate.forgetting.tolerance
        return False, f"forgetting set: {metric} drops by {drop:.4f} vs {against}, more than tolerance {tolerance}"
    if tie is not None:
        fewer = tie["candidate"] < tie["incumbent"]
        return fewer, (
            f"{metric} {ours:.4f} vs {theirs:.4f} ({against}) is a tie (within promotion.tie_margin {gate.tie_margin}); "
            f"intruder dimensions {tie['candidate']} vs {tie['incumbent']}: {'fewer, promoted' if fewer else 'not fewer, production stays'}"
        )
    if improvement < gate.min_improvement:
        return False, f"{metric} improves by {improvement:+.4f} over {against}, less than promotion.min_improvement {gate.min_improvement}"
    return True, f"{metric} {ours:.4f} vs {theirs:.4f} ({against}): improvement {improvement:+.4f} >= {gate.min_improvement}"


def _intruder_tie_break(config, base_ref, challenger: Path, champion: Path, improvement: float) -> dict | None:
    """On a metric tie, count both adapters' intruder dimensions now (the incumbent may predate the report)."""
    gate = config.promotion
    if gate.tie_breaker != "intruder_dimensions" or abs(improvement) > gate.tie_margin:
        return None
    from adapterflow.tasks.spectral_report import intruders_total

    return {"candidate": intruders_total(config, base_ref, challenger), "incumbent": intruders_total(config, base_ref, champion)}


def oriented(metric: str, difference: float) -> float:
    from adapterflow.tasks.config import LOWER_IS_BETTER

    return -difference if metric in LOWER_IS_BETTER else difference


def _scores(config, base_ref, challenger: Path, champion: Path | None, split: str) -> tuple[dict, dict]:
    from adapterflow.tasks.evaluate import evaluate_adapter

    return evaluate_adapter(config, base_ref, challenger, split), evaluate_adapter(config, base_ref, champion, split)


def _forgetting(config, base_ref, challenger: Path, champion: Path | None) -> dict:
    """Both adapters on the forgetting file, evaluated as if it were the test split."""
    check = config.promotion.forgetting
    probe = config.model_copy(update={"data": config.data.model_copy(update={"test": check.file})})
    ours, theirs = _scores(probe, base_ref, challenger, champion, "test")
    metric = config.gate_metric()
    drop = -oriented(metric, ours[metric] - theirs[metric])
    return {"file": check.file, "candidate": ours[metric], "incumbent": theirs[metric], "drop": drop}


def _check_frozen_split(config, name: str, candidate) -> None:
    """The evaluation split is the file the version was registered with, or the gate refuses: never skipped."""
    from adapterflow.digests import file_md5

    split = config.evaluate.split
    recorded = VersionTags.from_tags(candidate.tags).split_md5s.get(split)
    path = Path(getattr(config.data, split))
    if not recorded:
        raise RegistryError(
            f"{name} version {candidate.version} has no tag {split_tag(split)} (the md5 of its {split} split at registration), "
            f"so the gate cannot prove it compares on the frozen split; nothing was promoted. Retrain to register a version "
            f"that records it (adapterflow run CONFIG), or, if {path} is certainly the file it was evaluated on, set the tag "
            f"to that file's md5 (md5sum {path}) in the MLflow UI and promote again."
        )
    if not path.is_file():
        raise RegistryError(
            f"the evaluation split of version {candidate.version} is gone: {path}. Restore it (dvc pull) and promote again."
        )
    if file_md5(path) != recorded:  # re-hashed on purpose: the file may have changed since registration
        raise RegistryError(
            f"the evaluation split {path} changed since version {candidate.version} was registered (md5 {recorded}); "
            "the comparison would not be on the frozen split. Restore it (dvc checkout) or retrain."
        )
