"""Quantized base layers (bitsandbytes): read a weight in full precision, store a new one quantized alike.

QPiSSA and the other base-rewriting methods decompose W in full precision and quantize only the
residual W - s·BA, whose quantization error is smaller than that of W itself.
"""

from __future__ import annotations

import torch


def is_quantized(layer) -> bool:
    import bitsandbytes as bnb

    return isinstance(layer, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))


def dequantized_weight(layer) -> torch.Tensor:
    from peft.utils.integrations import dequantize_module_weight

    return dequantize_module_weight(layer).float()


def store_weight(layer, weight: torch.Tensor) -> None:
    """Set `layer`'s weight to `weight` (full precision), quantizing it the way the layer already is."""
    import bitsandbytes as bnb

    device = layer.weight.device
    if isinstance(layer, bnb.nn.Linear4bit):
        old = layer.weight
        layer.weight = bnb.nn.Params4bit(
            weight.to(torch.float32).contiguous().cpu(), requires_grad=False, quant_type=old.quant_type,
            compress_statistics=old.compress_statistics, blocksize=old.blocksize, quant_storage=old.quant_storage,
        ).to(device)
    elif isinstance(layer, bnb.nn.Linear8bitLt):
        int8 = bnb.nn.Int8Params(weight.to(torch.float16).contiguous().cpu(), requires_grad=False, has_fp16_weights=False)
        layer.weight = int8.to(device)
        layer.state.SCB = layer.weight.SCB  # the layer caches the old row scales
    else:
        layer.weight.data = weight.to(layer.weight.dtype)
