"""Init products on disk: the initial adapter, written by the init stage, applied by training.

A method that rewrites the base (W <- W - s·BA) is stored as its initial A and B only; applying
it re-derives the residual from the untouched base, so no copy of the base weights is stored.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch

from adapterflow.adapters.frozen_factors import fold_middle, structure_of, train_structured
from adapterflow.adapters.layers import delta_factors, lora_layers, short_name
from adapterflow.adapters.quantized import is_quantized, store_weight
from adapterflow.errors import InitError

META_FILE = "adapterflow_init.json"
WEIGHTS = "adapter_model.safetensors"
METHOD_SUBCONFIGS = ("eva_config", "corda_config", "lora_ga_config", "loftq_config")


def export_init(peft_model, folder: Path, method: str, init_config=None) -> Path:
    """`init_config`: the method's knobs as run (None: its defaults); kept where training reads them (a regularizer's)."""
    from adapterflow.adapters.registry import get_initializer

    initializer = get_initializer(method)
    config = peft_model.peft_config["default"]
    # Saved as a plain LoRA config: peft would otherwise re-run the method when loading it (and warn
    # about the method's sub-config).
    plain = {"init_lora_weights": True, **{field: None for field in METHOD_SUBCONFIGS if hasattr(config, field)}}
    original = {field: getattr(config, field) for field in plain}
    for field, value in plain.items():
        setattr(config, field, value)
    structure = structure_of(peft_model)  # a B·M·A model (NLoRA) is saved folded; apply_init splits it again
    fold_middle(peft_model)
    try:
        peft_model.save_pretrained(folder)
    finally:
        for field, value in original.items():
            setattr(config, field, value)
        if structure:
            train_structured(peft_model, structure)
    meta = {"method": method, "mutates_base": initializer.mutates_base, "trains_middle_only": initializer.trains_middle_only,
            "structure": structure}
    meta.update(_hook_meta(initializer, init_config))
    if initializer.extra_products:
        initializer.extra_products(peft_model, Path(folder))
    (Path(folder) / META_FILE).write_text(json.dumps(meta))
    return Path(folder)


def _hook_meta(initializer, init_config) -> dict:
    """Which of the method's own steps training and saving run (found in the registry by method name)."""
    meta = {"training_form": initializer.training_form is not None, "plain_lora": initializer.plain_lora is not None}
    if initializer.regularizer:
        meta["regularizer_init"] = (init_config or initializer.default_config()).model_dump(mode="json")
    return meta


def read_init_meta(folder: Path) -> dict:
    return json.loads((Path(folder) / META_FILE).read_text())


def apply_init(base_model, folder: Path, full_precision: Callable[[str], torch.Tensor] | None = None):
    """The initialized, trainable peft model: base + initial adapter (+ residual where needed).

    On a quantized base, a base-rewriting method needs `full_precision(layer name) -> W`: the
    residual W - s·BA is computed from it and then quantized (QPiSSA), never from the quantized W.
    """
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(base_model, str(folder), is_trainable=True)
    meta = read_init_meta(folder)
    if meta["mutates_base"]:
        _subtract_initial_delta(peft_model, full_precision)
    structure = meta.get("structure") or ("intermediate" if meta.get("trains_middle_only") else None)
    if structure:
        train_structured(peft_model, structure)
    if meta.get("training_form"):
        from adapterflow.adapters.registry import get_initializer

        get_initializer(meta["method"]).training_form(peft_model)
    return peft_model


@torch.no_grad()
def _subtract_initial_delta(peft_model, full_precision) -> None:
    for name, module in lora_layers(peft_model):
        b, a, scaling = delta_factors(module)
        layer = module.base_layer
        if is_quantized(layer):
            if full_precision is None:
                raise InitError(f"layer {short_name(name)} is quantized: its residual needs the full-precision weight")
            store_weight(layer, full_precision(short_name(name)).float().to(b.device) - scaling * (b @ a))
        else:
            layer.weight.data = (layer.weight.data.float() - scaling * (b @ a)).to(layer.weight.dtype)


def save_trained_adapter(peft_model, folder: Path, init_folder: Path) -> Path:
    """Save as a plain LoRA adapter that loads on the untouched base model."""
    fold_middle(peft_model)
    peft_model.save_pretrained(folder)
    meta = read_init_meta(init_folder)
    if meta.get("plain_lora"):
        from adapterflow.adapters.registry import get_initializer

        get_initializer(meta["method"]).plain_lora(Path(folder), Path(init_folder))
    elif meta["mutates_base"]:
        convert_to_plain_lora(Path(folder), Path(init_folder))
    return Path(folder)


def convert_to_plain_lora(folder: Path, init_folder: Path, removed: dict | None = None) -> None:
    """Rewrite a tuned adapter of a base-mutating method as the rank-2r delta (BA - B0A0).

    `removed`: B0, A0 under the adapter's keys, what init took out of the base as s·B0·A0; None: the
    initial adapter (PiSSA and the like move exactly that part of W into the adapter).

    Our own instead of peft's `path_initial_model_for_weight_conversion`: in peft 0.21.2 that
    path drops every non-LoRA tensor (the classifier head in modules_to_save), so the converted
    adapter fails to load.
    """
    from safetensors.torch import load_file, save_file

    tuned = load_file(folder / WEIGHTS)
    initial = removed if removed is not None else load_file(init_folder / WEIGHTS)
    converted = {key: _concat_initial(key, value, initial) for key, value in tuned.items()}
    save_file(converted, folder / WEIGHTS, metadata={"format": "pt"})
    config_path = folder / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps(_doubled_rank(config), indent=2))


def _concat_initial(key: str, value: torch.Tensor, initial: dict) -> torch.Tensor:
    if ".lora_A." in key:
        return torch.cat([value, initial[key].to(value.dtype)], dim=0).contiguous()
    if ".lora_B." in key:
        return torch.cat([value, -initial[key].to(value.dtype)], dim=1).contiguous()
    return value


def _doubled_rank(config: dict) -> dict:
    # Doubling r and alpha keeps alpha/r; rsLoRA scales by alpha/sqrt(r), so alpha grows by sqrt(2).
    factor = 2**0.5 if config.get("use_rslora") else 2
    config["r"] *= 2
    config["lora_alpha"] *= factor
    config["rank_pattern"] = {k: 2 * v for k, v in (config.get("rank_pattern") or {}).items()}
    config["alpha_pattern"] = {k: factor * v for k, v in (config.get("alpha_pattern") or {}).items()}
    config["init_lora_weights"] = True
    return config
