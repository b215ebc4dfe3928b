"""The Great Expectations suite: each kind of bad data is caught and named; good data passes."""

from __future__ import annotations

import pytest
from conftest import classification_rows, cls_config, write_csv, write_jsonl

from adapterflow.errors import DataError
from adapterflow.tasks.config import RunConfig
from adapterflow.tasks.validate_data import validate_data


def _config(model, data, **overrides) -> RunConfig:
    return RunConfig.model_validate(cls_config(model, data, **overrides))


def test_good_data_passes_every_check(tiny_bert, cls_data, tmp_path):
    report = validate_data(_config(tiny_bert, cls_data))
    assert report.success and report.row_counts == {"train": 48, "validation": 18, "test": 18}
    kinds = {row.expectation for row in report.rows}
    assert {"table_row_count_to_be_between", "column_values_to_not_be_null", "column_values_to_be_in_set",
            "column_value_lengths_to_be_between", "column_proportion_of_unique_values_to_be_between"} <= kinds
    paths = report.write(tmp_path / "report")
    assert "| train |" in paths["markdown"].read_text()


def _broken(cls_data, split: str, rows: list[dict]) -> dict:
    write_csv(cls_data[split], rows)
    return cls_data


@pytest.mark.parametrize(
    "edit, expected",
    [
        (lambda rows: [dict(r, text="   ") if i < 3 else r for i, r in enumerate(rows)],
         "column_values_to_not_match_regex on 'text': 3 of 48"),
        (lambda rows: [dict(r, label="cooking") if i == 0 else r for i, r in enumerate(rows)], "column_values_to_be_in_set on 'label'"),
        (lambda rows: rows[:5], "table_row_count_to_be_between"),
        (lambda rows: rows + rows[:10], "duplicate rate"),
        (lambda rows: [dict(r, text="x" * 5000) if i == 1 else r for i, r in enumerate(rows)], "column_value_lengths_to_be_between"),
        (lambda rows: [{"body": r["text"], "label": r["label"]} for r in rows], "column_exists on 'text': missing"),
    ],
    ids=["blank-text", "unknown-label", "too-few-rows", "duplicates", "too-long", "missing-column"],
)
def test_bad_data_is_named(tiny_bert, cls_data, edit, expected):
    data = _broken(cls_data, "train", edit(classification_rows(48, 1)))
    with pytest.raises(DataError) as info:
        validate_data(_config(tiny_bert, data, **{"data.checks": {"min_rows": 10, "max_text_chars": 1000}}))
    assert "nothing was trained" in str(info.value) and expected in str(info.value)


def test_null_text_in_jsonl_is_caught(tiny_bert, cls_data, tmp_path):
    rows = classification_rows(48, 1)
    rows[4]["text"] = None
    cls_data["train"] = write_jsonl(tmp_path / "train.jsonl", rows)
    with pytest.raises(DataError, match="column_values_to_not_be_null on 'text': 1 of 48"):
        validate_data(_config(tiny_bert, cls_data))


def test_empty_file_is_refused(tiny_bert, cls_data):
    cls_data["test"].write_text("")
    with pytest.raises(DataError, match="data.test: file is empty"):
        validate_data(_config(tiny_bert, cls_data))


def test_header_only_file_is_refused(tiny_bert, cls_data):
    cls_data["test"].write_text("text,label\n")
    with pytest.raises(DataError, match="has no rows"):
        validate_data(_config(tiny_bert, cls_data))


def test_chat_rows_are_checked_through_their_contents(tiny_llama, tmp_path):
    chat = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]} for i in range(12)]
    chat[3]["messages"] = []
    paths = {s: write_jsonl(tmp_path / f"{s}.jsonl", chat) for s in ("train", "validation")}
    config = RunConfig.model_validate({
        "name": "chat", "task": "causal_lm", "model": {"path": str(tiny_llama)},
        "data": {"train": str(paths["train"]), "validation": str(paths["validation"]), "messages_field": "messages",
                 "checks": {"min_rows": 5}},
        "train": {"max_steps": 1}, "evaluate": {"split": "validation"}, "registry": {"model_name": "m"},
    })
    with pytest.raises(DataError, match="column_values_to_not_be_null on '_messages_text': 1 of 12"):
        validate_data(config)
