"""The registered model's code, logged as an MLflow model-from-code: no pickle, and nothing from adapterflow.

MLflow copies this file next to the model and runs it on load, so it imports only torch, transformers, peft
and mlflow (plus the bundled model's package when the base is bundled): the model serves on any machine with
its pip requirements. Everything it needs (where the base is, the labels, lengths) comes from model_config;
the adapter artifact is a plain PEFT folder, so `PeftModel.from_pretrained(base, <artifacts>/adapter)` works too.

Not mlflow.transformers: with a local base it re-initialised q/v/classifier weights on reload
(logits off by ~3e-2 in MLflow 3.17).
"""

from __future__ import annotations

import mlflow.pyfunc
from mlflow.models import set_model


class LoraAdapterModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        from peft import PeftModel

        cfg = context.model_config
        self.task, self.labels, self.max_length = cfg["task"], cfg.get("labels"), cfg["max_length"]
        self.max_new_tokens = cfg.get("max_new_tokens", 64)
        location = base_location(cfg)
        trust = bool(cfg.get("trust_remote_code", False))  # as the config said at registration; off for older versions
        self.tokenizer = load_tokenizer(location, cfg.get("revision"), self.task, trust)
        base = load_base(location, cfg.get("revision"), self.task, self.labels, trust)
        self.model = PeftModel.from_pretrained(base, context.artifacts["adapter"]).eval()

    def predict(self, context, model_input, params=None):
        import torch

        column = "text" if self.task == "sequence_classification" else "prompt"
        values = model_input[column] if column in getattr(model_input, "columns", ()) else model_input.iloc[:, 0]
        texts = [str(t) for t in values]
        with torch.no_grad():
            if self.task == "sequence_classification":
                batch = self.tokenizer(texts, truncation=True, max_length=self.max_length, padding=True, return_tensors="pt")
                # The declared labels themselves: strings, or ints when data.labels listed ints (as the training file held them).
                return [self.labels[i] for i in self.model(**batch).logits.argmax(-1).tolist()]
            return self._generate(texts)

    def _generate(self, prompts: list[str]) -> list[str]:
        # One batch, padded on the left so every prompt's continuation starts at the same position.
        batch = self.tokenizer(prompts, add_special_tokens=False, padding=True, return_tensors="pt")
        out = self.model.generate(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], max_new_tokens=self.max_new_tokens, do_sample=False,
            pad_token_id=self.tokenizer.pad_token_id, eos_token_id=self.tokenizer.eos_token_id,
        )
        new_tokens = out[:, batch["input_ids"].shape[1]:]
        return [text.strip() for text in self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]


def base_location(cfg: dict) -> str:
    """The bundled package's model folder, else the local path or hub id the adapter was trained on."""
    if cfg["source"] == "bundled":
        from importlib import resources

        return str(resources.files(cfg["bundled_package"]) / "model")
    return cfg["name_or_path"]


def load_tokenizer(location: str, revision: str | None, task: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(location, trust_remote_code=trust_remote_code, **_revision(revision))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if task == "causal_lm":
        tokenizer.padding_side = "left"  # decoder-only generation continues from the last position
    return tokenizer


def load_base(location: str, revision: str | None, task: str, labels: list[str] | list[int] | None, trust_remote_code: bool = False):
    """Full precision: a 4-bit training base is a memory saving for training, not needed to serve."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the "newly initialized classifier" notice is expected: the adapter brings it
    kwargs = {"dtype": torch.float32, "trust_remote_code": trust_remote_code, **_revision(revision)}
    if task == "sequence_classification":
        kwargs.update(num_labels=len(labels), id2label=dict(enumerate(labels)), label2id={label: i for i, label in enumerate(labels)})
        return AutoModelForSequenceClassification.from_pretrained(location, **kwargs)
    return AutoModelForCausalLM.from_pretrained(location, **kwargs)


def _revision(revision: str | None) -> dict:
    return {"revision": revision} if revision else {}


set_model(LoraAdapterModel())
