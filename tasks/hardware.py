"""What the config asks of the hardware, checked before any compute."""

from __future__ import annotations

from tasks.errors import ConfigError


NO_CUDA = "train.device is 'cuda' but no CUDA device is visible. Use train.device: auto (or cpu)."


def check_hardware(config) -> None:
    if config.train.device != "cuda" and config.adapter.init.method != "loftq":
        return  # nothing to ask the hardware; keeps `adapterflow check` free of the torch import
    import torch

    cuda = torch.cuda.is_available()
    if config.train.device == "cuda" and not cuda:
        raise ConfigError(NO_CUDA)
    if config.adapter.init.method == "loftq" and (not cuda or config.train.device == "cpu"):
        raise ConfigError(
            "adapter.init.method loftq runs only on CUDA (peft quantizes with bitsandbytes' CUDA kernels) and this run "
            "has no CUDA device. On CPU use method: pissa with model.quantization: nf4 (QPiSSA: decompose in full "
            "precision, quantize the residual)."
        )
