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


def _chat_rows(count: int) -> list[dict]:
    return [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]} for i in range(count)]


def _chat_config(chat: list[dict], tiny_llama, tmp_path) -> RunConfig:
    """A causal-LM config whose train and validation splits are `chat`, as JSONL."""
    paths = {s: write_jsonl(tmp_path / f"{s}.jsonl", chat) for s in ("train", "validation")}
    return RunConfig.model_validate({
        "name": "chat", "task": "causal_lm", "model": {"path": str(tiny_llama)},
        "data": {"train": str(paths["train"]), "validation": str(paths["validation"]), "messages_field": "messages",
                 "checks": {"min_rows": 5}},
        "train": {"max_steps": 1}, "evaluate": {"split": "validation"}, "registry": {"model_name": "m"},
    })


def test_chat_rows_are_checked_through_their_contents(tiny_llama, tmp_path):
    chat = _chat_rows(12)
    chat[3]["messages"] = []
    config = _chat_config(chat, tiny_llama, tmp_path)
    with pytest.raises(DataError, match="column_values_to_not_be_null on '_messages_text': 1 of 12"):
        validate_data(config)


def _int_labelled(config: RunConfig, labels=(0, 1, 2)) -> RunConfig:
    """The same config with integer data.labels, through the schema."""
    raw = config.model_dump(mode="json")
    return RunConfig.model_validate({**raw, "data": {**raw["data"], "labels": list(labels)}})


def _int_rows(count: int, seed: int) -> list[dict]:
    from conftest import LABELS

    return [dict(row, label=LABELS.index(row["label"])) for row in classification_rows(count, seed)]


def test_a_null_label_is_refused_before_training(tiny_bert, cls_data, tmp_path):
    rows = classification_rows(48, 1)
    rows[7]["label"] = None  # passed every check before, then crashed the label lookup in training
    cls_data["train"] = write_jsonl(tmp_path / "train.jsonl", rows)
    with pytest.raises(DataError, match="column_values_to_not_be_null on 'label': 1 of 48"):
        validate_data(_config(tiny_bert, cls_data))


def test_a_blank_label_cell_in_a_csv_is_a_missing_label(tiny_bert, cls_data):
    rows = classification_rows(48, 1)
    rows[2]["label"] = ""
    write_csv(cls_data["train"], rows)
    with pytest.raises(DataError, match="column_values_to_not_be_null on 'label': 1 of 48"):
        validate_data(_config(tiny_bert, cls_data))


@pytest.mark.parametrize("suffix", ["jsonl", "csv", "parquet"])
def test_integer_labels_validate_in_every_format(tiny_bert, cls_data, tmp_path, suffix):
    import pandas as pd

    for split, count, seed in (("train", 48, 1), ("validation", 18, 2), ("test", 18, 3)):
        path = tmp_path / f"{split}.{suffix}"
        frame = pd.DataFrame(_int_rows(count, seed))
        if suffix == "jsonl":
            frame.to_json(path, orient="records", lines=True)
        elif suffix == "csv":
            frame.to_csv(path, index=False)
        else:
            frame.to_parquet(path)
        cls_data[split] = path
    report = validate_data(_int_labelled(_config(tiny_bert, cls_data)))
    assert report.success and "column_values_to_be_in_set" in {row.expectation for row in report.rows}


def test_labels_of_the_other_type_are_a_type_mismatch_with_the_fix(tiny_bert, cls_data, tmp_path):
    files = {split: write_jsonl(tmp_path / f"{split}.jsonl", _int_rows(n, seed)) for split, n, seed in
             (("train", 48, 1), ("validation", 18, 2), ("test", 18, 3))}
    with pytest.raises(DataError) as info:  # ints in the file, strings in the config
        validate_data(_config(tiny_bert, files))
    message = str(info.value)
    assert "type mismatch: data.labels lists strings ['games', 'science', 'sound'] but column 'label' holds integers (e.g. 0)" in message
    assert "write data.labels as integers, without quotes (e.g. [0, 1, 2])" in message
    assert "column_values_to_be_in_set" not in message  # the mismatch is the one finding, not 48 unknown labels
    assert message.count("type mismatch") == 1 and "test: column_values_to_match_labels_type on 'label': the same as in train" in message

    with pytest.raises(DataError) as info:  # strings in the file, ints in the config
        validate_data(_int_labelled(_config(tiny_bert, cls_data)))
    assert "type mismatch: data.labels lists integers [0, 1, 2] but column 'label' holds strings (e.g. 'games')" in str(info.value)
    assert "list the file's label names in data.labels (e.g. ['games', ...])" in str(info.value)


def test_null_chat_rows_are_refused_on_their_own_column(tiny_llama, tmp_path):
    chat = _chat_rows(12)
    chat[5]["messages"] = None
    config = _chat_config(chat, tiny_llama, tmp_path)
    with pytest.raises(DataError, match="column_values_to_not_be_null on 'messages': 1 of 12"):
        validate_data(config)


def test_unreadable_files_are_one_data_error_naming_the_file_and_the_fix(tiny_bert, cls_data, tmp_path):
    import pandas as pd

    from adapterflow.tasks.data_io import read_split

    folder = tmp_path / "folder.csv"
    folder.mkdir()
    with pytest.raises(DataError, match=f"data.train: {folder} is a folder, not a file. Point data.train at one data file"):
        read_split(str(folder), "train")

    damaged = tmp_path / "damaged.parquet"  # intact PAR1 markers, a broken body: found when the rows are read
    pd.DataFrame(classification_rows(20, 1)).to_parquet(damaged)
    body = damaged.read_bytes()
    damaged.write_bytes(body[:4] + b"\0" * (len(body) - 8) + body[-4:])
    with pytest.raises(DataError) as info:
        read_split(str(damaged), "validation")
    assert str(info.value).startswith(f"data.validation: cannot parse {damaged}: ") and "write it again" in str(info.value)
    assert len(str(info.value)) < 600

    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes('{"text": "caf\xe9 au lait", "label": "games"}\n'.encode("latin-1"))
    with pytest.raises(DataError, match=r"evaluate.generation.file: .*latin1.jsonl is not UTF-8 text \(byte 13: invalid continuation"):
        read_split(str(latin1), "evaluate.generation.file")
