"""Sample packing (data.packing): a batch's samples in one row, attention kept within each sample, the same loss."""

from __future__ import annotations

import pytest
from conftest import sft_config, write_jsonl

from adapterflow.errors import ConfigError
from adapterflow.tasks.encode import collator, encode_split

ROWS = [{"prompt": "what is the section of gimp", "response": "graphics"},
        {"prompt": "mutt", "response": "mail reader for the terminal"},
        {"prompt": "which section holds a synth with a long description of its many voices", "response": "sound"}]


def _loss(model, batch) -> float:
    import torch

    with torch.no_grad():
        return float(model(**batch).loss)


def test_a_packed_batch_has_the_padded_batchs_loss_because_attention_stays_within_each_sample(tiny_llama, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_llama))
    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama)).eval()
    config = sft_config(tiny_llama, write_jsonl(tmp_path / "t.jsonl", ROWS), packing=True)
    rows = list(encode_split(config, tokenizer, "train"))
    padded = collator(config, tokenizer, packed=False)(rows)
    packed = collator(config, tokenizer)(rows)
    assert packed["input_ids"].shape[0] == 1 and "attention_mask" not in packed  # one row, no padding
    assert packed["input_ids"].shape[1] == sum(len(r["input_ids"]) for r in rows) < padded["input_ids"].numel()
    assert _loss(model, packed) == pytest.approx(_loss(model, padded), rel=1e-5)
    # The control: the same row without the restarting positions lets attention cross samples, and the loss moves.
    crossing = {key: value for key, value in packed.items() if key not in ("position_ids", "use_cache")}
    assert abs(_loss(model, crossing) - _loss(model, padded)) > 1e-4


def test_packing_trains_an_adapter_and_is_refused_for_classification(tiny_llama, tiny_bert, tmp_path):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_llama))
    config = sft_config(tiny_llama, write_jsonl(tmp_path / "t.jsonl", ROWS), packing=True)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(tiny_llama)),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights="gaussian"))
    loss = model(**collator(config, tokenizer)(list(encode_split(config, tokenizer, "train")))).loss
    loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_" in n]
    assert torch.isfinite(loss) and grads and all(g is not None and torch.isfinite(g).all() for g in grads)

    from conftest import cls_config, write_config

    from adapterflow.tasks.config import load_config

    data = {split: tmp_path / f"{split}.csv" for split in ("train", "validation", "test")}
    path = write_config(tmp_path / "cls.yaml", cls_config(tiny_bert, data, **{"data.packing": True}))
    with pytest.raises(ConfigError, match="data.packing applies only to task causal_lm"):
        load_config(path)
