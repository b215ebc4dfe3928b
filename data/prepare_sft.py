"""Prompt/response pairs for the causal-LM smoke config, derived from the demo splits.

Each prompt shows a (shortened) Debian package description and asks for its archive section;
the response is the section name. Standard library only; deterministic.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

SIZES = {"train": 300, "validation": 60, "test": 30}
PROMPT = "Debian package description: {text}\nArchive section:"


def to_pair(row: dict) -> dict:
    text = row["text"][:160].rsplit(" ", 1)[0]
    return {"prompt": PROMPT.format(text=text), "response": row["label"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--demo", default="data/demo")
    parser.add_argument("--out", default="data/sft")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for split, size in SIZES.items():
        with open(Path(args.demo) / f"{split}.csv", newline="") as handle:
            rows = list(csv.DictReader(handle))[:size]
        name = "generation" if split == "test" else split
        lines = [json.dumps(to_pair(r)) + "\n" for r in rows]
        (out / f"{name}.jsonl").write_text("".join(lines))
        print(f"{name}: {len(lines)} rows")


if __name__ == "__main__":
    main()
