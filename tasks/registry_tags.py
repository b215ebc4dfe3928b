"""The registry's tag schema: what a registered version, its model and its events say, as MLflow tags.

Every writer and reader goes through here. Names and value formats are a stored contract: versions
registered earlier must still read, so a change here needs a migration, never a rename. Text values
are written through adapterflow.redact (a tag is readable by everyone who can read the registry);
fingerprints (md5s, hashes, the commit) and numbers are written as they are: they are compared and read back.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field

from adapterflow.redact import redact_text

REGISTRATION_TAG = "adapterflow.registration"
INCOMPLETE, COMPLETE = "incomplete", "complete"  # the version's registration state
EVENT_PREFIX = "adapterflow.event."  # + the event's time stamp; the value is the event as JSON
HISTORY_TAG = "adapterflow.production_history"  # on the model: earlier production versions, JSON list
METRIC_PREFIX = "metric."
SPLIT_PREFIX, SPLIT_SUFFIX = "data.", "_md5"  # data.<split>_md5: md5 of the split file as trained on
# Written exactly, never through redact (with data.<split>_md5 and metric.*): fingerprints that are compared, and numbers.
EXACT_TAGS = ("data_md5", "git_commit", "config_hash", "lora_r", "lora_alpha", "train_steps", "learning_rate", "intruder_dimensions")


def split_tag(split: str) -> str:
    return f"{SPLIT_PREFIX}{split}{SPLIT_SUFFIX}"


def metric_text(value: float) -> str:
    """Six significant digits: reading the text back and formatting it again gives the same text."""
    return f"{value:.6g}"


@dataclass(frozen=True)
class VersionTags:
    """A version's lineage. Fields an older adapterflow did not write read back as None."""

    task: str | None
    lora_r: int | None
    lora_alpha: float | None
    target_modules: tuple[str, ...] | None
    train_steps: int | None
    learning_rate: float | None
    data_md5: str | None  # DVC md5 of the whole snapshot
    git_commit: str | None
    config_hash: str | None
    init_method: str | None
    base_model: str | None
    base_revision: str | None
    eval_split: str | None
    metrics: Mapping[str, float] = field(default_factory=dict)
    split_md5s: Mapping[str, str] = field(default_factory=dict)  # lets promote prove the split is unchanged
    intruder_dimensions: int | None = None
    checkpoint_merge: str | None = None  # the merge choice, one readable line
    variant: str | None = None  # adapter.variant: lora, dora or rslora (older versions: None, and they were lora)

    def to_tags(self) -> dict[str, str]:
        tags = {
            "task": self.task, "lora_r": _text(self.lora_r), "lora_alpha": _number(self.lora_alpha),
            "target_modules": ", ".join(self.target_modules) if self.target_modules is not None else None,
            "train_steps": _text(self.train_steps), "learning_rate": _number(self.learning_rate), "data_md5": self.data_md5,
            "git_commit": self.git_commit, "config_hash": self.config_hash, "init_method": self.init_method,
            "base_model": self.base_model, "base_revision": self.base_revision, "eval_split": self.eval_split,
            **{METRIC_PREFIX + k: metric_text(v) for k, v in self.metrics.items()},
            **{split_tag(s): md5 for s, md5 in self.split_md5s.items()},
            "intruder_dimensions": _text(self.intruder_dimensions), "checkpoint_merge": self.checkpoint_merge,
            "variant": self.variant,
        }
        return {k: v if _is_exact(k) else redact_text(v) for k, v in tags.items() if v is not None}

    @classmethod
    def from_tags(cls, tags: Mapping[str, str]) -> VersionTags:
        modules = tags.get("target_modules")
        return cls(
            task=tags.get("task"), lora_r=_parsed(tags, "lora_r", int), lora_alpha=_parsed(tags, "lora_alpha", float),
            target_modules=tuple(modules.split(", ")) if modules is not None else None,
            train_steps=_parsed(tags, "train_steps", int), learning_rate=_parsed(tags, "learning_rate", float),
            data_md5=tags.get("data_md5"), git_commit=tags.get("git_commit"), config_hash=tags.get("config_hash"),
            init_method=tags.get("init_method"), base_model=tags.get("base_model"), base_revision=tags.get("base_revision"),
            eval_split=tags.get("eval_split"),
            metrics={k.removeprefix(METRIC_PREFIX): float(v) for k, v in tags.items() if k.startswith(METRIC_PREFIX)},
            split_md5s={_split_of(k): v for k, v in tags.items() if _split_of(k)},
            intruder_dimensions=_parsed(tags, "intruder_dimensions", int), checkpoint_merge=tags.get("checkpoint_merge"),
            variant=tags.get("variant"),
        )

    def trained_on(self, config_hash: str, split_md5s: Mapping[str, str]) -> bool:
        """This exact config and every one of these split files (the retrain skip check)."""
        return self.config_hash == config_hash and all(self.split_md5s.get(s) == md5 for s, md5 in split_md5s.items())


def registration_state(tags: Mapping[str, str]) -> str | None:
    """INCOMPLETE while a version is being registered (or was cut short), then COMPLETE."""
    return tags.get(REGISTRATION_TAG)


def event_tag(event: dict) -> tuple[str, str]:
    """(name, value) of the tag recording one promotion, refusal or rollback; `event['when']` names it.

    The reason is free text (a registry error may name a URL): masked like every other text value."""
    return EVENT_PREFIX + event["when"], redact_text(json.dumps(event))


def read_events(tags: Mapping[str, str]) -> dict[str, dict]:
    """The events tagged on a version, by time stamp (one event is tagged on every version it involved)."""
    return {k.removeprefix(EVENT_PREFIX): json.loads(v) for k, v in tags.items() if k.startswith(EVENT_PREFIX)}


def read_history(model_tags: Mapping[str, str]) -> list[str]:
    """The production versions before the current one, oldest first (what rollback returns to)."""
    return json.loads(model_tags.get(HISTORY_TAG, "[]"))


def history_value(history: list[str]) -> str:
    return json.dumps(history)


@dataclass(frozen=True)
class ModelTags:
    """Tags on the registered model itself; they follow the latest config."""

    task: str
    base_model: str
    gate_metric: str
    labels: tuple[str, ...] | None = None

    def to_tags(self) -> dict[str, str]:
        tags = {"task": self.task, "base_model": self.base_model, "gate_metric": self.gate_metric}
        if self.labels:
            tags["labels"] = ", ".join(map(str, self.labels))
        return {key: redact_text(value) for key, value in tags.items()}


def _is_exact(tag: str) -> bool:
    return tag in EXACT_TAGS or tag.startswith(METRIC_PREFIX) or _split_of(tag) is not None


def _split_of(tag: str) -> str | None:
    if tag.startswith(SPLIT_PREFIX) and tag.endswith(SPLIT_SUFFIX):
        return tag.removeprefix(SPLIT_PREFIX).removesuffix(SPLIT_SUFFIX)
    return None


def _text(value) -> str | None:
    return None if value is None else str(value)


def _number(value: float | None) -> str | None:
    return None if value is None else f"{value:g}"


def _parsed(tags: Mapping[str, str], name: str, kind):
    value = tags.get(name)
    return None if value is None else kind(value)
