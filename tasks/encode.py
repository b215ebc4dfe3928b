"""Turning validated split files into token ids: classification labels, or SFT with loss on responses only."""

from __future__ import annotations

from adapterflow.errors import DataError
from adapterflow.tasks.data_io import label_type_mismatch, labels_as_declared, read_split
from adapterflow.tasks.sft_formats import as_declared, chat_template

IGNORE = -100  # label id the loss skips (prompt tokens, padding)


def encode_split(config, tokenizer, split: str):
    """A datasets.Dataset of model inputs for one split named in config.data."""
    from datasets import Dataset

    path = getattr(config.data, split)
    frame = as_declared(read_split(path, split), config.data.format, split)
    if config.task == "sequence_classification":
        rows = _classification_rows(frame, config, tokenizer, split, path)
    else:
        _use_chat_template(tokenizer, config.data)
        rows = [_sft_row(record, config, tokenizer) for record in frame.to_dict("records")]
        _require_response_tokens(rows, split, config.data.max_length)
    return Dataset.from_list(rows)


def _use_chat_template(tokenizer, data) -> None:
    """data.chat_template replaces the tokenizer's; chat rows need one from somewhere."""
    if data.chat_template:
        tokenizer.chat_template = chat_template(data.chat_template)
    if data.messages_field and not tokenizer.chat_template:
        raise DataError("the base model's tokenizer has no chat template, which chat rows (data.messages_field, data.format "
                        "sharegpt) are rendered with. Set data.chat_template: chatml, or give the Jinja template itself.")


def _require_response_tokens(rows: list[dict], split: str, max_length: int) -> None:
    empty = [i for i, row in enumerate(rows) if all(label == IGNORE for label in row["labels"])]
    if empty:
        raise DataError(
            f"data.{split}: {len(empty)} row(s) (first: row {empty[0]}) have no response tokens left within "
            f"data.max_length={max_length}, so they would train on nothing. Raise data.max_length or shorten those prompts."
        )


def _classification_rows(frame, config, tokenizer, split: str, path) -> list[dict]:
    texts = frame[config.data.text_field].astype(str).tolist()
    encoded = tokenizer(texts, truncation=True, max_length=config.data.max_length)
    labels = label_ids(frame, config, split, path)
    return [
        {**{key: encoded[key][i] for key in encoded.keys()}, "labels": labels[i]}
        for i in range(len(texts))
    ]


def label_ids(frame, config, split: str, path) -> list[int]:
    """Each row's class index in data.labels, which may list strings or integers; read as validation reads them."""
    data = config.data
    index = {label: i for i, label in enumerate(data.labels)}
    values = labels_as_declared(frame[data.label_field], data.labels, path)
    # Validation refuses all of these first; the messages are for a caller that skipped it.
    mismatch = label_type_mismatch(values, data.labels, data.label_field)  # True would pass as 1 in the lookup below
    if mismatch:
        raise DataError(f"data.{split}: {mismatch}.")
    unknown = [(row, value) for row, value in enumerate(values) if not _hashable(value) or value not in index]
    if unknown:
        row, value = unknown[0]
        raise DataError(f"data.{split}: {len(unknown)} row(s) (first: row {row}, {value!r}) have a label that is not one of data.labels; "
                        "fix the data or the list (adapterflow run validates the labels first).")
    return [index[value] for value in values]


def _hashable(value) -> bool:
    try:
        hash(value)
    except TypeError:
        return False
    return True


def _sft_row(record: dict, config, tokenizer) -> dict:
    if config.data.messages_field:
        segments = _chat_segments(record[config.data.messages_field], tokenizer)
    else:
        prompt, response = str(record[config.data.prompt_field]), str(record[config.data.response_field])
        segments = [(prompt, False), (" " + response + (tokenizer.eos_token or ""), True)]
    return _pack_segments(segments, tokenizer, config.data.max_length)


def _chat_segments(messages: list[dict], tokenizer) -> list[tuple[str, bool]]:
    """Split the rendered chat into (text, is_assistant) pieces by rendering growing prefixes."""
    segments, rendered = [], ""
    for i, message in enumerate(messages):
        is_assistant = message.get("role") == "assistant"
        if is_assistant:
            prefix = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
            segments.append((prefix[len(rendered):], False))
            rendered = prefix
        full = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        segments.append((full[len(rendered):], is_assistant))
        rendered = full
    return [s for s in segments if s[0]]


def _pack_segments(segments: list[tuple[str, bool]], tokenizer, max_length: int) -> dict:
    input_ids: list[int] = []
    labels: list[int] = []
    for text, trained in segments:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        input_ids += ids
        labels += ids if trained else [IGNORE] * len(ids)
    input_ids, labels = input_ids[:max_length], labels[:max_length]
    return {"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels}


def collator(config, tokenizer, packed: bool | None = None):
    """Padded batches; packed ones (data.packing, for training) put a batch's samples in one row without padding.
    `packed=False`: padded whatever the config says (evaluation reads its batches row by row)."""
    if config.task == "sequence_classification":
        from transformers import DataCollatorWithPadding

        return DataCollatorWithPadding(tokenizer)
    if config.data.packing if packed is None else packed:
        return _packed_collator()
    from transformers import DataCollatorForSeq2Seq

    return DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=IGNORE, padding=True)


def _packed_collator():
    """transformers' padding-free collator: position ids restart at each sample, from which transformers builds a
    block-diagonal causal mask, and each sample's first label is ignored (nothing before it in its sample predicts it)."""
    from transformers import DataCollatorWithFlattening

    class PackedBatches(DataCollatorWithFlattening):
        def __call__(self, features, return_tensors=None, separator_id=None):
            batch = super().__call__(features, return_tensors, separator_id)
            # With a KV cache (the default, even in training) transformers skips the packed-sequence mask, and
            # attention silently crosses samples (measured: the loss moved to the unmasked row's).
            batch["use_cache"] = False
            return batch

    return PackedBatches(return_position_ids=True, separator_id=IGNORE)
