"""Evaluation of a saved adapter, loaded the way a user would load it: plain PeftModel on the base."""

from __future__ import annotations

import math
from pathlib import Path

from adapterflow.errors import DataError
from adapterflow.tasks.data_io import read_split


def evaluate_adapter(config, base_ref, adapter_dir: Path | None, split: str, plots_dir: Path | None = None) -> dict[str, float]:
    """Metrics of base+adapter on one split; adapter_dir None evaluates the bare base model.

    With `plots_dir`, a classification run also draws its confusion matrix there.
    """
    import torch
    from transformers import set_seed

    from adapterflow.tasks.encode import encode_split
    from adapterflow.tasks.model_io import load_model, load_tokenizer

    set_seed(config.train.seed)  # a bare base's classifier head is random: keep it reproducible
    tokenizer = load_tokenizer(base_ref)
    model = load_model(base_ref, config.task, config.data.labels, config.model.dtype, config.model.quantization)
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter_dir))
    model.eval()
    dataset = encode_split(config, tokenizer, split)
    with torch.no_grad():
        if config.task == "sequence_classification":
            metrics = _classification_metrics(model, dataset, config, tokenizer, plots_dir)
        else:
            metrics = _causal_metrics(model, dataset, config, tokenizer)
            if config.evaluate.generation:
                metrics["exact_match"] = exact_match(model, tokenizer, config)
    return metrics


def _batches(dataset, config, tokenizer):
    from torch.utils.data import DataLoader

    from adapterflow.tasks.encode import collator

    return DataLoader(dataset, batch_size=config.evaluate.batch_size, collate_fn=collator(config, tokenizer, packed=False))


def _classification_metrics(model, dataset, config, tokenizer, plots_dir: Path | None) -> dict[str, float]:
    import torch
    from sklearn.metrics import accuracy_score, f1_score

    losses, predictions, labels = [], [], []
    for batch in _batches(dataset, config, tokenizer):
        out = model(**batch)
        losses.append(torch.nn.functional.cross_entropy(out.logits.float(), batch["labels"], reduction="sum").item())
        predictions += out.logits.argmax(-1).tolist()
        labels += batch["labels"].tolist()
    classes = list(range(len(config.data.labels)))
    if plots_dir is not None:
        from adapterflow.tasks.run_plots import plot_confusion_matrix

        plot_confusion_matrix(labels, predictions, config.data.labels, plots_dir / "confusion_matrix.png")
    return {
        "eval_loss": sum(losses) / len(labels),
        "accuracy": accuracy_score(labels, predictions),
        "macro_f1": f1_score(labels, predictions, labels=classes, average="macro", zero_division=0),
    }


def _causal_metrics(model, dataset, config, tokenizer) -> dict[str, float]:
    import torch

    total_loss, total_tokens = 0.0, 0
    for batch in _batches(dataset, config, tokenizer):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        shifted_labels = batch["labels"][:, 1:]
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.size(-1)), shifted_labels.reshape(-1), ignore_index=-100, reduction="sum"
        )
        total_loss += loss.item()
        total_tokens += int((shifted_labels != -100).sum())
    mean = total_loss / max(total_tokens, 1)
    return {"eval_loss": mean, "perplexity": math.exp(min(mean, 50.0))}


def exact_match(model, tokenizer, config) -> float:
    """Share of prompts whose greedy continuation equals the reference (whitespace-trimmed)."""
    spec = config.evaluate.generation
    frame = read_split(spec.file, "evaluate.generation.file")
    fields = (config.data.prompt_field, config.data.response_field)
    missing = [f for f in fields if f not in frame.columns]
    if missing:
        raise DataError(f"evaluate.generation.file {spec.file} lacks column(s) {missing}; it needs {list(fields)}.")
    nulls = [f for f in fields if frame[f].isna().any()]
    if nulls:  # str(None) would be generated from, or matched against, as the text "None"
        raise DataError(f"evaluate.generation.file {spec.file} has empty (null) values in column(s) {nulls}; fill or drop those rows.")
    pairs = zip(frame[fields[0]], frame[fields[1]])
    hits = sum(_generate(model, tokenizer, str(prompt), spec.max_new_tokens) == str(response).strip() for prompt, response in pairs)
    return hits / len(frame)


def _generate(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    import torch

    ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]])
    out = model.generate(
        input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
