"""Token encoding: SFT loss is on response tokens only, for prompt/response and chat rows."""

from __future__ import annotations

from conftest import sft_config, write_jsonl

from adapterflow.tasks.config import RunConfig
from adapterflow.tasks.encode import IGNORE, encode_split


def _tokenizer(tiny_llama):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_llama))


def test_prompt_tokens_are_masked_and_response_tokens_trained(tiny_llama, tmp_path):
    train = write_jsonl(tmp_path / "t.jsonl", [{"prompt": "what is the section of gimp", "response": "graphics"}])
    tokenizer = _tokenizer(tiny_llama)
    row = encode_split(sft_config(tiny_llama, train), tokenizer, "train")[0]
    trained = [t for t, label in zip(row["input_ids"], row["labels"]) if label != IGNORE]
    assert tokenizer.decode(trained) == "graphics [SEP]"
    prompt_len = len(tokenizer("what is the section of gimp", add_special_tokens=False)["input_ids"])
    assert row["labels"][:prompt_len] == [IGNORE] * prompt_len


def test_chat_rows_train_on_every_assistant_turn_only(tiny_llama, tmp_path):
    messages = [
        {"role": "system", "content": "be brief"}, {"role": "user", "content": "gimp?"},
        {"role": "assistant", "content": "graphics"}, {"role": "user", "content": "mutt?"},
        {"role": "assistant", "content": "mail"},
    ]
    train = write_jsonl(tmp_path / "t.jsonl", [{"messages": messages}])
    tokenizer = _tokenizer(tiny_llama)
    row = encode_split(sft_config(tiny_llama, train, messages_field="messages"), tokenizer, "train")[0]
    trained = tokenizer.decode([t for t, label in zip(row["input_ids"], row["labels"]) if label != IGNORE])
    assert trained.split() == ["graphics", "[SEP]", "mail", "[SEP]"]


def test_rows_truncated_before_their_response_are_refused(tiny_llama, tmp_path):
    import pytest

    from adapterflow.errors import DataError

    train = write_jsonl(tmp_path / "t.jsonl", [{"prompt": "word " * 80, "response": "graphics"}])
    with pytest.raises(DataError, match="no response tokens left within data.max_length=64"):
        encode_split(sft_config(tiny_llama, train), _tokenizer(tiny_llama), "train")


def _classification(tiny_bert, train, labels):
    return RunConfig.model_validate({
        "name": "cls", "task": "sequence_classification", "model": {"path": str(tiny_bert)},
        "data": {"train": str(train), "validation": str(train), "labels": labels},
        "train": {"max_steps": 1}, "evaluate": {"split": "validation"}, "registry": {"model_name": "m"},
    })


def test_integer_labels_encode_from_typed_and_untyped_files(tiny_bert, tmp_path):
    from conftest import write_csv
    from transformers import AutoTokenizer

    rows = [{"text": "audio mixer", "label": 7}, {"text": "chess board", "label": 3}, {"text": "synth volume", "label": 7}]
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_bert))
    for train in (write_jsonl(tmp_path / "t.jsonl", rows), write_csv(tmp_path / "t.csv", rows)):  # a CSV holds the digits as text
        encoded = encode_split(_classification(tiny_bert, train, [3, 7]), tokenizer, "train")
        assert encoded["labels"] == [1, 0, 1]


def test_a_label_of_the_wrong_type_is_a_data_error_not_a_key_error(tiny_bert, tmp_path):
    import pytest
    from transformers import AutoTokenizer

    from adapterflow.errors import DataError

    train = write_jsonl(tmp_path / "t.jsonl", [{"text": "audio mixer", "label": True}, {"text": "chess", "label": 0}])
    with pytest.raises(DataError, match="data.train: type mismatch: data.labels lists integers"):
        encode_split(_classification(tiny_bert, train, [0, 1]), AutoTokenizer.from_pretrained(str(tiny_bert)), "train")
