"""Training throughput and peak memory: the flow's train step vs a plain transformers + peft Trainer script.

Both train the same config (same model, data, LoRA, batch, steps) in fresh processes, alternating,
best of N (and the median of the alternating pairs' ratios). Throughput is the Trainer's own
samples/s (model loading and start-up excluded) times the mean tokens per training sample; peak
memory is each training process's own peak (resident memory on CPU, CUDA memory allocated on a GPU).
Targets: throughput >= 0.97x, peak memory <= 1.0x.

Usage: python bench/throughput.py [--config configs/demo.yaml] [--steps 40] [--repeats 3] [--threads N]
       python bench/throughput.py --gpu   # a config-built ~1 B Llama, SFT data, bf16 and 4-bit NF4 (needs CUDA)
       python bench/throughput.py --gpu --dry-run   # the same rows on CPU with a tiny Llama, 2 steps: checks
                                                    # the GPU bench works before a GPU is rented (numbers mean nothing)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def run_json(command: list[str], env: dict) -> dict:
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"failed: {' '.join(command)}\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def bench_config(source: Path, steps: int, folder: Path) -> Path:
    """The config with max_steps set and no mid-run checkpoint (both sides save the same, at the end)."""
    config = yaml.safe_load(source.read_text())
    config["train"].update(max_steps=steps, checkpoint_every=steps)
    for split in ("train", "validation", "test"):
        if config["data"].get(split):
            config["data"][split] = str((source.parent / config["data"][split]).resolve())
    path = folder / "throughput.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def tokens_per_sample(config_path: Path) -> float:
    """Mean tokens per training sample, encoded the way the flow encodes them."""
    from adapterflow.tasks.config import load_config
    from adapterflow.tasks.encode import encode_split
    from adapterflow.tasks.model_io import load_tokenizer, resolve_base

    config = load_config(config_path)
    encoded = encode_split(config, load_tokenizer(resolve_base(config.model)), "train")
    return sum(len(ids) for ids in encoded["input_ids"]) / len(encoded)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, help="torch threads on both sides (1 on a busy machine)")
    parser.add_argument("--gpu", action="store_true", help="the GPU rows: ~1 B Llama in bf16 and in 4-bit")
    parser.add_argument("--dry-run", action="store_true", help="with --gpu: a tiny Llama on CPU, 2 steps, 1 repeat")
    parser.add_argument("--rows", default="bf16,nf4", help="with --gpu: which base precisions to measure (bf16, nf4)")
    args = parser.parse_args()
    if args.dry_run:
        args.steps, args.repeats = 2, 1
    if args.gpu:
        return gpu_rows(args)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    if args.threads:
        env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    with tempfile.TemporaryDirectory() as tmp:
        config = bench_config(ROOT / args.config, args.steps, Path(tmp))
        tokens = tokens_per_sample(config)
        plain, ours = [], []
        for repeat in range(args.repeats):
            plain.append(run_json([sys.executable, "bench/plain_demo.py", str(config), f"{tmp}/plain{repeat}", "--train-only"], env))
            ours.append(run_json([sys.executable, "bench/flow_train_step.py", str(config), f"{tmp}/flow{repeat}"], env))
    report(plain, ours, tokens, args)


def report(plain: list[dict], ours: list[dict], tokens: float, args) -> None:
    best_plain = max(r["samples_per_second"] for r in plain) * tokens
    best_ours = max(r["samples_per_second"] for r in ours) * tokens
    peak_plain = min(r["peak_memory_mb"] for r in plain)
    peak_ours = min(r["peak_memory_mb"] for r in ours)
    device = ours[0]["device"]
    print(f"config {args.config}, {args.steps} steps, best of {args.repeats}, device {device}, {tokens:.1f} tokens/sample")
    print(f"{'':34} {'tokens/s':>10} {'peak MB':>10}")
    print(f"{'plain transformers + peft Trainer':34} {best_plain:10.1f} {peak_plain:10.0f}")
    print(f"{'adapterflow train step':34} {best_ours:10.1f} {peak_ours:10.0f}")
    print(f"ratio: throughput {best_ours / best_plain:.3f}x (target >= 0.97), peak memory {peak_ours / peak_plain:.3f}x (target <= 1.0)")
    # Runs alternate, so each pair shares the machine's load of the moment; the median pair resists outliers.
    paired = sorted(o["samples_per_second"] / p["samples_per_second"] for p, o in zip(plain, ours))
    print(f"paired throughput ratios: {', '.join(f'{r:.3f}' for r in paired)}; median {statistics.median(paired):.3f}x")
    print("all runs tokens/s  plain: " + ", ".join(f"{r['samples_per_second'] * tokens:.0f}" for r in plain)
          + "  ours: " + ", ".join(f"{r['samples_per_second'] * tokens:.0f}" for r in ours))


GPU_LLAMA = {"hidden": 2048, "layers": 22}  # ~1.0 B parameters with the tiny models' tokenizer (30,522 tokens)
DRY_RUN_LLAMA = {"hidden": 64, "layers": 2}


def gpu_rows(args) -> None:
    import torch

    if not torch.cuda.is_available() and not args.dry_run:
        sys.exit("--gpu needs CUDA; none is visible here. Run it on a GPU machine (make gpu-check), or add --dry-run to check it on CPU")
    from adapterflow.tasks.tiny_models import make_tiny_llama

    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_tiny_llama(Path(tmp) / "llama", **(DRY_RUN_LLAMA if args.dry_run else GPU_LLAMA))
        for quantization in [None if row == "bf16" else row for row in args.rows.split(",")]:
            config = gpu_config(Path(tmp), model_dir, quantization, args.steps)
            tokens = tokens_per_sample(config)
            plain, ours = [], []
            for repeat in range(args.repeats):
                plain.append(run_json([sys.executable, "bench/plain_causal.py", str(config), f"{tmp}/plain{repeat}"], env))
                ours.append(run_json([sys.executable, "bench/flow_train_step.py", str(config), f"{tmp}/flow{repeat}-{quantization}"], env))
            if abs(plain[0]["tokens_per_sample"] - tokens) > 0.01 * tokens:
                sys.exit(f"the plain script trains {plain[0]['tokens_per_sample']:.1f} tokens/sample and the flow {tokens:.1f}: "
                         "not comparable")
            args.config = f"{'tiny Llama (dry run)' if args.dry_run else 'Llama ~1 B'}, {quantization or 'bf16'}"
            report(plain, ours, tokens, args)


def gpu_config(folder: Path, model_dir: Path, quantization: str | None, steps: int) -> Path:
    sft = ROOT / "data" / "sft"
    config = {
        "name": "throughput-gpu", "task": "causal_lm",
        "model": {"path": str(model_dir), "dtype": "bfloat16", **({"quantization": quantization} if quantization else {})},
        "data": {"train": str(sft / "train.jsonl"), "validation": str(sft / "validation.jsonl"), "prompt_field": "prompt",
                 "response_field": "response", "max_length": 256,
                 "checks": {"min_rows": 20, "max_text_chars": 400, "max_duplicate_rate": 0.05}},
        "adapter": {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
                    "init": {"method": "lora"}},
        "train": {"max_steps": steps, "learning_rate": 2e-4, "batch_size": 8, "checkpoint_every": steps, "log_every": min(5, steps),
                  "precision": "bf16", "optimizer": "adamw_torch_fused"},  # named: the plain script reads it from here too
        "evaluate": {"split": "validation"}, "registry": {"model_name": "throughput-gpu"},
    }
    path = folder / f"gpu-{quantization or 'bf16'}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


if __name__ == "__main__":
    main()
