"""bitsandbytes' packed CPU path for 4-bit layers: kept out of models that train, and off layers it cannot pack.

Works around bitsandbytes 0.50.2. On a CPU with AVX512-BF16, `Linear4bit.forward` in eval mode (no grad)
repacks the layer's 4-bit weight in place for a fused bf16 kernel (`_convert_weight_packed_for_cpu`, which
sets `quant_state.packing_format_for_cpu`), and nothing unpacks it when the layer trains again: the next
training step goes through the inference kernel and autograd fails ("a view of a leaf Variable that requires
grad is being used in an in-place operation"). Unpacking when training resumes is no cure: the inverse is
lossy (absmax goes through bf16 and the double quantization is redone; ~0.2% of a MiniLM weight), so every
evaluation would move the frozen base. Hence the smallest robust rule: a model that will train is never
packed (its layers' per-module switch is off), so periodic evaluation, the init race and any `model.eval()`
mid-run use the ordinary path, which is also cheaper there: packing MiniLM's 37 layers costs ~2.8 s, more
than a small validation set saves (~20% per batch). Models that only infer (the final evaluation) keep the
packed kernel.

The packing also fails on layers whose input width is not a multiple of the quantization block size (64)
or whose output width is not a multiple of 32 (`shape '[32, 0]' is invalid`); those layers stay quantized
and are never packed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

SWITCH = "ADAPTERFLOW_BNB_CPU_PACKING"  # "0" turns the packed path off everywhere
FLAG = "support_avx512bf16_for_cpu"  # bitsandbytes 0.50.2: Linear4bit packs in eval only while this is true
PACK_BLOCK_N = 32  # output rows per packed tile in _convert_weight_packed_for_cpu


def packing_enabled() -> bool:
    return os.environ.get(SWITCH, "1").strip().lower() not in ("0", "off", "false", "no")


def cpu_has_packed_kernel() -> bool:
    """The check bitsandbytes' Linear4bit itself makes (tests monkeypatch this one name)."""
    try:
        from bitsandbytes.nn import modules
    except ImportError:
        return False
    check = getattr(modules, "has_avx512bf16", None)
    return bool(check and check())


def unpackable_reason(layer) -> str | None:
    """Why bitsandbytes' CPU packing would fail on this Linear4bit, or None if it can pack it."""
    blocksize = getattr(layer.weight, "blocksize", None) or 64
    if layer.in_features % blocksize:
        return f"input width {layer.in_features} is not a multiple of the 4-bit block size {blocksize}"
    if layer.out_features % PACK_BLOCK_N:
        return f"output width {layer.out_features} is not a multiple of {PACK_BLOCK_N}"
    return None


def configure_cpu_packing(model, training: bool) -> dict[str, str]:
    """Switch packing off on every 4-bit layer of a model that will train, and on the layers it cannot pack.

    Returns {layer name: why it is never packed} for the layers excluded by their shape.
    """
    import bitsandbytes as bnb

    allow = not training and packing_enabled()
    excluded = {}
    for name, layer in model.named_modules():
        if not isinstance(layer, bnb.nn.Linear4bit) or not hasattr(layer, FLAG):
            continue
        reason = unpackable_reason(layer)
        if reason:
            excluded[name] = reason
        if not allow or reason:
            setattr(layer, FLAG, False)
            _unpack(layer)
    return excluded


def _unpack(layer) -> None:
    """Undo a packing that already happened (lossy, see the module docstring; normally never needed)."""
    state = getattr(layer.weight, "quant_state", None)
    if state is not None and getattr(state, "packing_format_for_cpu", False):
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

        layer.weight.data, layer.weight.quant_state = _convert_weight_packed_for_cpu_inverse(layer.weight.data, state)


@dataclass(frozen=True)
class CpuPath:
    packed: bool
    reason: str

    def __str__(self) -> str:
        return f"bitsandbytes CPU path: {'packed' if self.packed else 'unpacked'} ({self.reason})"


def cpu_path(quantization: str | None, device: str = "cpu") -> CpuPath | None:
    """Which bitsandbytes CPU path a run with `model.quantization` uses, and why; None when none applies.

    None for a full-precision or int8 base (nothing is packed) and on CUDA (bitsandbytes' GPU kernels).
    """
    if quantization in (None, "int8") or device != "cpu":
        return None
    if not packing_enabled():
        return CpuPath(False, f"turned off by {SWITCH}=0")
    if not cpu_has_packed_kernel():
        return CpuPath(False, "this CPU has no AVX512-BF16")
    return CpuPath(True, "AVX512-BF16: final evaluation uses the fused bf16 kernel; training and its periodic evaluations stay "
                         "unpacked, as bitsandbytes 0.50.2 cannot train a packed layer")
