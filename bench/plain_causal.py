"""Causal-LM SFT written the plain way: transformers + peft (+ bitsandbytes) Trainer, no pipeline.

Reads the same config as the flow and tokenizes as the flow does (no special tokens, EOS after the
response); for bench/throughput.py --gpu. Prints training speed and peak memory (CUDA allocated, or
resident on CPU) as JSON. Usage: python bench/plain_causal.py CONFIG OUT_DIR
"""

from __future__ import annotations

import json
import sys

import pandas as pd
import torch
import yaml
from datasets import Dataset
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    DataCollatorForLanguageModeling,
    Trainer,
    TrainingArguments,
    set_seed,
)


def main(config_path: str, out_dir: str) -> None:
    cfg = yaml.safe_load(open(config_path))
    train, lora, data = cfg["train"], cfg["adapter"], cfg["data"]
    set_seed(train.get("seed", 42))
    tokenizer = AutoTokenizer.from_pretrained(cfg["model"]["path"])
    quantization = cfg["model"].get("quantization")
    kwargs = {"dtype": torch.bfloat16}
    if quantization:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=quantization, bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(cfg["model"]["path"], **kwargs)
    if quantization:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model = get_peft_model(model, LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora.get("dropout", 0.0),
                                             target_modules=lora["target_modules"], task_type="CAUSAL_LM"))
    frame = pd.read_json(data["train"], lines=True)
    texts = [f"{p} {r}{tokenizer.eos_token}" for p, r in zip(frame[data["prompt_field"]], frame[data["response_field"]])]
    dataset = Dataset.from_dict(tokenizer(texts, truncation=True, max_length=data["max_length"], add_special_tokens=False))
    args = TrainingArguments(
        output_dir=out_dir, max_steps=train["max_steps"], learning_rate=train["learning_rate"],
        per_device_train_batch_size=train["batch_size"], save_strategy="steps", save_steps=train["checkpoint_every"],
        logging_steps=train["log_every"], report_to=[], bf16=True, use_cpu=not torch.cuda.is_available(),
        optim=train.get("optimizer", "adamw_torch"),
    )
    trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False))
    output = trainer.train()
    tokens = sum(map(len, dataset["input_ids"])) / len(dataset)  # bench/throughput.py checks both sides train the same tokens
    print(json.dumps({"samples_per_second": output.metrics["train_samples_per_second"], "seconds": output.metrics["train_runtime"],
                      "peak_memory_mb": peak_memory_mb(), "tokens_per_sample": tokens}))


def peak_memory_mb() -> float:
    import resource

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
