"""Alpaca and ShareGPT rows train as they are, through the prompt/response and chat paths, and validate by their own columns."""

from __future__ import annotations

import pytest
from conftest import sft_config, write_jsonl

from adapterflow.errors import ConfigError, DataError
from adapterflow.tasks.encode import IGNORE, encode_split

ALPACA = [
    {"instruction": "Name the archive section of this package.", "input": "gimp: an image editor", "output": "graphics"},
    {"instruction": "Which section holds a mail reader?", "input": "", "output": "mail", "system": "Answer with one word."},
]
SHAREGPT = [{"conversations": [{"from": "system", "value": "be brief"}, {"from": "human", "value": "gimp?"},
                               {"from": "gpt", "value": "graphics"}, {"from": "human", "value": "mutt?"},
                               {"from": "gpt", "value": "mail"}]}]


def _config(tiny_llama, train, **data):
    return sft_config(tiny_llama, train, max_length=96, **data)


def _tokenizer(tiny_llama):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_llama))


def _trained_text(row, tokenizer) -> str:
    return tokenizer.decode([t for t, label in zip(row["input_ids"], row["labels"]) if label != IGNORE])


def test_alpaca_rows_train_on_the_output_after_a_prompt_of_system_instruction_and_input(tiny_llama, tmp_path):
    tokenizer = _tokenizer(tiny_llama)
    rows = encode_split(_config(tiny_llama, write_jsonl(tmp_path / "a.jsonl", ALPACA), format="alpaca"), tokenizer, "train")
    assert [_trained_text(row, tokenizer) for row in rows] == ["graphics [SEP]", "mail [SEP]"]
    prompt = tokenizer.decode([t for t, label in zip(rows[1]["input_ids"], rows[1]["labels"]) if label == IGNORE])
    assert prompt.startswith("answer with one word.") and "which section holds a mail reader?" in prompt  # tiny vocab: lower case


def test_sharegpt_rows_train_on_every_gpt_turn_only(tiny_llama, tmp_path):
    tokenizer = _tokenizer(tiny_llama)
    row = encode_split(_config(tiny_llama, write_jsonl(tmp_path / "s.jsonl", SHAREGPT), format="sharegpt"), tokenizer, "train")[0]
    assert _trained_text(row, tokenizer).split() == ["graphics", "[SEP]", "mail", "[SEP]"]


def test_a_tokenizer_without_a_template_needs_data_chat_template_and_chatml_is_named(tiny_llama, tmp_path):
    train = write_jsonl(tmp_path / "s.jsonl", SHAREGPT)
    tokenizer = _tokenizer(tiny_llama)
    tokenizer.chat_template = None
    with pytest.raises(DataError, match="has no chat template.*data.chat_template: chatml"):
        encode_split(_config(tiny_llama, train, format="sharegpt"), tokenizer, "train")
    row = encode_split(_config(tiny_llama, train, format="sharegpt", chat_template="chatml"), tokenizer, "train")[0]
    assert "<|im_start|>" in tokenizer.chat_template and _trained_text(row, tokenizer).count("graphics") == 1


def test_alpaca_and_sharegpt_are_validated_by_their_own_columns(tiny_llama, tmp_path):
    from adapterflow.tasks.validate_data import validate_data

    no_instruction = [*ALPACA, {"instruction": None, "input": "x", "output": "text"}] * 5
    config = _config(tiny_llama, write_jsonl(tmp_path / "a.jsonl", no_instruction), format="alpaca", checks={"min_rows": 2})
    with pytest.raises(DataError, match=r"instruction\+input"):
        validate_data(config)
    config = _config(tiny_llama, write_jsonl(tmp_path / "ok.jsonl", ALPACA * 3), format="alpaca",
                     checks={"min_rows": 2, "max_duplicate_rate": 1.0})
    assert validate_data(config).success


@pytest.mark.parametrize(("rows", "data_format", "problem"), [
    ([{"prompt": "p", "response": "r"}], "alpaca", "needs the columns instruction and output"),
    ([{"messages": []}], "sharegpt", "needs a column conversations"),
    ([{"conversations": [{"from": "function_call", "value": "{}"}]}], "sharegpt", "a turn from 'function_call'"),
])
def test_a_file_not_in_its_declared_format_is_one_data_error(tiny_llama, tmp_path, rows, data_format, problem):
    config = _config(tiny_llama, write_jsonl(tmp_path / "x.jsonl", rows), format=data_format)
    with pytest.raises(DataError, match=problem):
        encode_split(config, _tokenizer(tiny_llama), "train")


def test_a_format_with_its_own_field_names_is_refused(tiny_llama, tmp_path):
    from adapterflow.tasks.config import load_config

    config = tmp_path / "c.yaml"
    config.write_text(f"name: sft\ntask: causal_lm\nmodel: {{path: {tiny_llama}}}\ndata: {{train: {tmp_path}/t.jsonl, "
                      f"validation: {tmp_path}/t.jsonl, format: alpaca, prompt_field: question}}\nregistry: {{model_name: m}}\n")
    with pytest.raises(ConfigError, match="data.format alpaca names the columns itself; remove data.prompt_field"):
        load_config(config)
