"""Tokens per second with and without sample packing (data.packing) on the SFT smoke config, side by side in one run.

The same LoRA model, data and steps; only the collator differs: padded batches (each row padded to the
longest in its batch) or packed ones (a batch's samples in one row, no padding; attention kept within each
sample). Tokens counted are the samples' own tokens, so padding counts as no work done. Pairs alternate
in order (padded/packed, then packed/padded) so drift in the machine's load falls on both sides alike.

Usage: python bench/packing.py [--config configs/causal_lm.yaml] [--steps 30] [--repeats 3] [--batch-size 16]
  (the config's base model must exist: `adapterflow make-tiny-model llama .adapterflow/models/tiny-llama`)
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "causal_lm.yaml"))
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()

    from adapterflow.tasks.state import prepare_environment

    prepare_environment(offline=True)
    import torch
    from transformers import AutoTokenizer

    from adapterflow.tasks.config import load_config
    from adapterflow.tasks.encode import collator, encode_split
    from adapterflow.tasks.model_io import resolve_base

    config = load_config(args.config)
    base = resolve_base(config.model)
    tokenizer = AutoTokenizer.from_pretrained(base.name_or_path)
    rows = list(encode_split(config, tokenizer, "train"))
    torch.manual_seed(0)
    batches = [[rows[i % len(rows)] for i in torch.randint(len(rows), (args.batch_size,)).tolist()] for _ in range(args.steps)]
    tokens = sum(len(row["input_ids"]) for batch in batches for row in batch)
    rates = {"padded": [], "packed": []}
    for pair in range(args.repeats):
        for side in (("padded", "packed") if pair % 2 == 0 else ("packed", "padded")):
            seconds = _train(base.name_or_path, batches, collator(config, tokenizer, packed=side == "packed"))
            rates[side].append(tokens / seconds)
            print(f"pair {pair + 1} {side:<6}: {tokens / seconds:,.0f} tokens/s ({seconds:.2f} s for {args.steps} steps)")
    ratios = [packed / padded for packed, padded in zip(rates["packed"], rates["padded"])]
    padding = 1 - tokens / sum(collator(config, tokenizer, packed=False)(b)["input_ids"].numel() for b in batches)
    print(f"padding in the padded batches: {padding:.0%} of their tokens")
    print(f"median tokens/s: padded {statistics.median(rates['padded']):,.0f}, packed {statistics.median(rates['packed']):,.0f}; "
          f"packed / padded {statistics.median(ratios):.2f}")


def _train(model_path: str, batches: list, collate) -> float:
    """LoRA steps with AdamW over the batches; the wall seconds of the steps alone."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_path), LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    collated = [collate(batch) for batch in batches]
    start = time.perf_counter()
    for batch in collated:
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return time.perf_counter() - start


if __name__ == "__main__":
    main()
