"""What the config asks of the hardware, checked before any compute."""

from __future__ import annotations

from adapterflow.adapters import get_initializer
from adapterflow.errors import ConfigError

NO_CUDA = "train.device is 'cuda' but no CUDA device is visible. Use train.device: auto (or cpu)."


def _asks_for_a_gpu(config) -> bool:
    train = config.train
    return (
        train.device == "cuda" or _init_needs_cuda(config) or train.precision in ("bf16", "fp16")
        or train.optimizer.startswith("paged_") or train.launch.processes > 1 or train.launch.strategy == "fsdp"
    )


def check_hardware(config) -> None:
    if not _asks_for_a_gpu(config):
        return  # nothing to ask the hardware; keeps `adapterflow check` free of the torch import
    import torch

    cuda = torch.cuda.is_available() and config.train.device != "cpu"
    for problem in (_device_problem, _init_problem, _precision_problem, _optimizer_problem, _launch_problem):
        message = problem(config, cuda, torch)
        if message:
            raise ConfigError(message)


def _device_problem(config, cuda: bool, torch) -> str | None:
    return NO_CUDA if config.train.device == "cuda" and not torch.cuda.is_available() else None


def _init_needs_cuda(config) -> bool:
    return get_initializer(config.adapter.init.method).cuda_only is not None


def _init_problem(config, cuda: bool, torch) -> str | None:
    method = config.adapter.init.method
    refusal = get_initializer(method).cuda_only
    if refusal is None or cuda:
        return None
    return (f"adapter.init.method {method} runs only on CUDA ({refusal.reason}) and this run has no CUDA device. "
            f"On CPU use {refusal.instead}.")


def _precision_problem(config, cuda: bool, torch) -> str | None:
    precision = config.train.precision
    if precision == "fp16" and not cuda:
        return ("train.precision is fp16, which needs a CUDA device, and this run has none. "
                "Use precision: bf16 (CPU autocast) or auto (fp32 on CPU).")
    if precision == "bf16" and cuda and not torch.cuda.is_bf16_supported():
        return (f"train.precision is bf16 but {torch.cuda.get_device_name()} has no bf16. "
                "Use precision: fp16 or auto (which picks fp16 here).")
    return None


def _optimizer_problem(config, cuda: bool, torch) -> str | None:
    optimizer = config.train.optimizer
    if optimizer.startswith("paged_") and not cuda:
        # bitsandbytes would warn and fall back to its non-paged optimizer: refuse instead of a silent swap.
        return (f"train.optimizer {optimizer} pages optimizer state through CUDA unified memory and this run has no CUDA device. "
                "Use adamw_8bit (works on CPU) or adamw_torch.")
    return None


def _launch_problem(config, cuda: bool, torch) -> str | None:
    launch = config.train.launch
    if launch.strategy == "fsdp" and not cuda:
        return "train.launch.strategy fsdp shards over CUDA devices and this run has none. Use strategy: ddp (gloo on CPU)."
    if cuda and launch.processes > torch.cuda.device_count():
        return (
            f"train.launch.processes is {launch.processes} but only {torch.cuda.device_count()} CUDA device(s) are visible. "
            f"Use processes: {torch.cuda.device_count()} (one per GPU), or train.device: cpu for CPU processes."
        )
    return None
