"""What a config asks of the hardware: refused before any compute when impossible, honoured where it runs.

The CUDA parts are marked `gpu` and skipped without CUDA; `make gpu-check` runs them on a GPU machine.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import cls_config, run_cli, write_config

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs CUDA (run `make gpu-check` on a GPU machine)")


@pytest.mark.skipif(CUDA, reason="this machine has CUDA: these requests are allowed")
@pytest.mark.parametrize(
    "train, expected",
    [
        ({"precision": "fp16"}, "train.precision is fp16, which needs a CUDA device"),
        ({"optimizer": "paged_adamw_8bit"}, "Use adamw_8bit (works on CPU)"),
        ({"launch": {"processes": 2, "strategy": "fsdp"}}, "Use strategy: ddp (gloo on CPU)"),
        ({"device": "cuda"}, "no CUDA device is visible"),
    ],
    ids=["fp16", "paged-optimizer", "fsdp", "cuda-device"],
)
@pytest.mark.slow  # starts a fresh interpreter
def test_impossible_hardware_requests_are_refused_before_any_compute(tiny_bert, cls_data, tmp_path, train, expected):
    config = cls_config(tiny_bert, cls_data, **{f"train.{key}": value for key, value in train.items()})
    result = run_cli("check", str(write_config(tmp_path / "c.yaml", config)), home=tmp_path / "state")
    assert result.returncode == 2 and expected in result.stderr
    assert not (tmp_path / "state" / "runs").exists()


def test_batch_size_must_split_over_processes(tiny_bert, cls_data):
    from adapterflow.tasks.config import RunConfig

    with pytest.raises(ValueError, match="must split evenly over train.launch.processes"):
        RunConfig.model_validate(cls_config(tiny_bert, cls_data,
                                            **{"train.batch_size": 9, "train.launch": {"mode": "accelerate", "processes": 2}}))


def _train(tmp_path, model_dir, data, overrides) -> dict:
    from adapterflow.tasks.config import RunConfig
    from adapterflow.tasks.init_adapter import initialize_adapter
    from adapterflow.tasks.model_io import resolve_base
    from adapterflow.tasks.train import train_adapter

    config = RunConfig.model_validate(cls_config(model_dir, data, **overrides))
    base_ref = resolve_base(config.model)
    init = initialize_adapter(config, base_ref, tmp_path / "init")
    result = train_adapter(config, base_ref, Path(init.init_dir), tmp_path / "run")
    log = json.loads((tmp_path / "run" / "train_log.json").read_text())
    return {"result": result, "losses": [e["loss"] for e in log if "loss" in e]}


def test_bf16_autocast_gradient_checkpointing_and_8bit_adam_train_on_cpu(tmp_path, tiny_bert, cls_data):
    trained = _train(tmp_path, tiny_bert, cls_data, {
        "train.precision": "bf16", "train.gradient_checkpointing": True, "train.optimizer": "adamw_8bit", "train.max_steps": 6,
    })
    assert trained["result"].steps == 6 and len(trained["losses"]) == 6 and all(math.isfinite(x) for x in trained["losses"])
    assert trained["result"].peak_memory_mb > 100  # resident memory of a process that imported torch and trained


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("quantization", [None, "nf4"], ids=["bf16", "qlora-nf4"])
def test_cuda_training_through_the_launcher_in_mixed_precision(tmp_path, tiny_bert, cls_data, quantization):
    from adapterflow.tasks.config import RunConfig
    from adapterflow.tasks.init_adapter import initialize_adapter
    from adapterflow.tasks.launch import launch_training
    from adapterflow.tasks.model_io import resolve_base

    overrides = {"train.launch": {"mode": "accelerate"}, "train.max_steps": 6, "train.optimizer": "paged_adamw_8bit",
                 "train.gradient_checkpointing": True, "adapter.init": {"method": "pissa"}, "model.quantization": quantization}
    config = RunConfig.model_validate(cls_config(tiny_bert, cls_data, **overrides))
    base_ref = resolve_base(config.model)
    init = initialize_adapter(config, base_ref, tmp_path / "init")
    result = launch_training(config, base_ref, Path(init.init_dir), tmp_path / "run", None)
    assert result.device == "cuda" and result.steps == 6 and result.peak_memory_mb > 0
    args = json.loads((tmp_path / "run" / "train_job.json").read_text())["config"]["train"]
    assert args["precision"] == "auto"  # resolved to bf16 (or fp16) inside the worker


@pytest.mark.gpu
@needs_cuda
def test_loftq_initializes_a_4bit_base_on_cuda(tmp_path, tiny_bert, cls_data):
    from adapterflow.tasks.config import RunConfig
    from adapterflow.tasks.init_adapter import initialize_adapter
    from adapterflow.tasks.model_io import resolve_base

    config = RunConfig.model_validate(cls_config(tiny_bert, cls_data, **{"adapter.init": {"method": "loftq"}, "model.quantization": "nf4"}))
    init = initialize_adapter(config, resolve_base(config.model), tmp_path / "init")
    assert init.method == "loftq" and Path(init.init_dir, "adapter_model.safetensors").exists()


@pytest.mark.parametrize(
    "env, tracking, expected",
    [
        ({"PREFECT_API_URL": "http://127.0.0.1:9/api"}, {},
         "the Prefect API at http://127.0.0.1:9/api (PREFECT_API_URL) cannot be reached"),
        ({"AWS_ENDPOINT_URL": "http://127.0.0.1:9"}, {"dvc_remote": "s3://bucket/dvc"},
         "the S3 endpoint http://127.0.0.1:9 of tracking.dvc_remote"),
    ],
    ids=["prefect-api", "s3-endpoint"],
)
@pytest.mark.slow  # starts a fresh interpreter
def test_a_server_that_does_not_answer_fails_the_run_before_training(tiny_bert, cls_data, tmp_path, env, tracking, expected):
    import os
    import subprocess
    import sys

    from conftest import ROOT

    config = write_config(tmp_path / "c.yaml", cls_config(tiny_bert, cls_data, tracking=tracking))
    environment = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}  # only the dead server under test
    environment.update(ADAPTERFLOW_HOME=str(tmp_path / "state"), **env)
    result = subprocess.run([sys.executable, "-m", "adapterflow.flows.cli", "run", str(config)], cwd=ROOT, env=environment,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 5 and expected in result.stderr, result.stderr[-2000:]
    assert not (tmp_path / "state" / "runs").exists()


@pytest.mark.skipif(CUDA, reason="this machine has CUDA: a CUDA-only method is allowed")
def test_a_cuda_only_method_is_refused_without_cuda_quoting_its_reason_and_alternative(tiny_bert, cls_data):
    from test_config import _throwaway_method

    from adapterflow.adapters.registry import Refusal
    from adapterflow.errors import ConfigError
    from adapterflow.tasks.config import RunConfig
    from adapterflow.tasks.hardware import check_hardware

    with _throwaway_method(cuda_only=Refusal("its kernels are CUDA-only", "method: lora")):
        config = RunConfig.model_validate(cls_config(tiny_bert, cls_data, **{"adapter.init": {"method": "throwaway"}}))
        with pytest.raises(ConfigError) as refused:
            check_hardware(config)
    assert str(refused.value) == ("adapter.init.method throwaway runs only on CUDA (its kernels are CUDA-only) and this run has no "
                                  "CUDA device. On CPU use method: lora.")
    lora = RunConfig.model_validate(cls_config(tiny_bert, cls_data))
    assert check_hardware(lora) is None  # the same run with a method that runs anywhere passes
