"""The registry's tag schema: names and values byte-identical to what earlier versions wrote, and read back."""

from __future__ import annotations

import json

from adapterflow.tasks.registry_tags import (
    EVENT_PREFIX,
    HISTORY_TAG,
    REGISTRATION_TAG,
    ModelTags,
    VersionTags,
    event_tag,
    read_events,
    read_history,
)

# A version's tags exactly as adapterflow wrote them before the schema had a module of its own.
STORED = {
    "task": "sequence_classification", "lora_r": "8", "lora_alpha": "16", "target_modules": "query, value",
    "train_steps": "100", "learning_rate": "0.0002", "data_md5": "73a8b7594b0da5341c122a301458025b",
    "git_commit": "5e2edac+dirty", "config_hash": "c0ffee", "init_method": "pissa", "base_model": "local:abc",
    "base_revision": "n/a (local files; identity is a content hash)", "eval_split": "test",
    "metric.eval_loss": "0.680712", "metric.accuracy": "0.808824", "metric.tiny": "1e-06",
    "data.train_md5": "aa", "data.validation_md5": "bb", "data.test_md5": "cc",
    "intruder_dimensions": "6", "checkpoint_merge": "merged (accuracy on validation: merged 0.8100, final 0.8000)",
}


def test_stored_tags_read_back_and_write_out_byte_identical():
    tags = VersionTags.from_tags({**STORED, REGISTRATION_TAG: "complete"})
    assert tags.lora_r == 8 and tags.lora_alpha == 16.0 and tags.learning_rate == 2e-4 and tags.train_steps == 100
    assert tags.target_modules == ("query", "value") and tags.intruder_dimensions == 6
    assert tags.metrics == {"eval_loss": 0.680712, "accuracy": 0.808824, "tiny": 1e-06}
    assert tags.split_md5s == {"train": "aa", "validation": "bb", "test": "cc"}
    assert tags.to_tags() == STORED


def test_fresh_values_format_as_before():
    tags = VersionTags(
        task="causal_lm", lora_r=4, lora_alpha=8.0, target_modules=("q_proj", "v_proj"), train_steps=3, learning_rate=0.01,
        data_md5="d", git_commit="g", config_hash="h", init_method="lora", base_model="b", base_revision="main", eval_split="validation",
        metrics={"perplexity": 123.456789, "exact_match": 0.25}, split_md5s={"train": "t"},
    )
    written = tags.to_tags()
    assert written["lora_alpha"] == "8" and written["learning_rate"] == "0.01" and written["target_modules"] == "q_proj, v_proj"
    assert written["metric.perplexity"] == "123.457" and written["metric.exact_match"] == "0.25" and written["data.train_md5"] == "t"
    assert "intruder_dimensions" not in written and "checkpoint_merge" not in written


def test_a_version_from_an_older_adapterflow_reads_with_its_gaps_as_none():
    tags = VersionTags.from_tags({"init_method": "lora", "data_md5": "d", "metric.accuracy": "0.5"})
    assert (tags.eval_split, tags.base_revision, tags.lora_r, tags.target_modules) == (None, None, None, None)
    assert tags.to_tags() == {"init_method": "lora", "data_md5": "d", "metric.accuracy": "0.5"}


def test_skip_check_needs_the_config_hash_and_every_split_digest():
    tags = VersionTags.from_tags(STORED)
    assert tags.trained_on("c0ffee", {"train": "aa", "validation": "bb", "test": "cc"})
    assert not tags.trained_on("c0ffee", {"train": "aa", "validation": "bb", "test": "changed"})
    assert not tags.trained_on("other", {"train": "aa"})


def test_events_and_history_keep_their_names_and_json():
    event = {"action": "promoted", "from": None, "to": "1", "when": "20250101T000000.000000001Z"}
    name, value = event_tag(event)
    assert name == "adapterflow.event.20250101T000000.000000001Z" == EVENT_PREFIX + event["when"]
    assert json.loads(value) == event
    assert read_events({name: value, "task": "x"}) == {event["when"]: event}
    assert HISTORY_TAG == "adapterflow.production_history" and read_history({HISTORY_TAG: '["1", "3"]'}) == ["1", "3"]
    assert read_history({}) == []


def test_model_tags():
    expected = {"task": "t", "base_model": "b", "gate_metric": "accuracy", "labels": "a, b"}
    assert ModelTags("t", "b", "accuracy", ("a", "b")).to_tags() == expected
    assert "labels" not in ModelTags("t", "b", "perplexity").to_tags()


SENTINEL = "Tags-S3ntinel-pw"


def test_text_tags_and_events_are_masked_and_fingerprints_and_numbers_kept_byte_for_byte(monkeypatch):
    monkeypatch.setenv("PGPASSWORD", "73a8b759")  # a secret that happens to be part of an md5: the md5 tag must not change
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "808824")  # ... or of a metric
    stored = {**STORED, "base_model": f"http://u:{SENTINEL}@hub.internal/m", "checkpoint_merge": "chose merged 73a8b759"}
    tags = VersionTags.from_tags(stored).to_tags()
    assert tags["data_md5"] == STORED["data_md5"] and tags["data.train_md5"] == "aa" and tags["config_hash"] == "c0ffee"
    assert tags["metric.accuracy"] == "0.808824"
    assert tags["base_model"] == "http://u:***@hub.internal/m" and tags["checkpoint_merge"] == "chose merged ***"
    assert ModelTags("t", f"http://u:{SENTINEL}@h/m", "accuracy").to_tags()["base_model"] == "http://u:***@h/m"
    event = {"action": "refused", "to": "2", "when": "20250101T000000.1Z", "reason": f"cannot read http://u:{SENTINEL}@h/x"}
    name, value = event_tag(event)
    assert SENTINEL not in value and json.loads(value)["reason"] == "cannot read http://u:***@h/x"
