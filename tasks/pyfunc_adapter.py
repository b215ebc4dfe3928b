"""Kept for versions registered before models-from-code: their python_model.pkl names this class.

New versions log tasks/serving_model.py instead (no pickle, no adapterflow needed to load). Deleting this module
would make `mlflow.pyfunc.load_model` fail on every older version with ModuleNotFoundError.
"""

from __future__ import annotations

import mlflow.pyfunc


class LoraAdapterModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        from peft import PeftModel

        from adapterflow.tasks.model_io import BaseModelRef, load_model, load_tokenizer

        cfg = context.model_config
        ref = BaseModelRef(_base_location(cfg), cfg.get("revision"), cfg["identity"], cfg["source"], cfg.get("trust_remote_code", False))
        self.task, self.labels = cfg["task"], cfg.get("labels")
        self.tokenizer = load_tokenizer(ref)
        base = load_model(ref, self.task, self.labels)
        self.model = PeftModel.from_pretrained(base, context.artifacts["adapter"]).eval()
        self.max_length = cfg["max_length"]

    def predict(self, context, model_input, params=None):
        import torch

        texts = [str(t) for t in model_input.iloc[:, 0]]
        with torch.no_grad():
            if self.task == "sequence_classification":
                batch = self.tokenizer(texts, truncation=True, max_length=self.max_length, padding=True, return_tensors="pt")
                return [self.labels[i] for i in self.model(**batch).logits.argmax(-1).tolist()]
            return [self._generate(text) for text in texts]

    def _generate(self, prompt: str) -> str:
        import torch

        ids = torch.tensor([self.tokenizer(prompt, add_special_tokens=False)["input_ids"]])
        out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=64, do_sample=False)
        return self.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def _base_location(cfg: dict) -> str:
    if cfg["source"] == "bundled":
        from adapterflow.tasks.model_io import bundled_folder

        return str(bundled_folder(cfg["bundled"]))
    return cfg["name_or_path"]
