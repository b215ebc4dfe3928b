#!/usr/bin/env python3
"""Build the second benchmark task: which library an API docstring comes from.

A different text type and label set from the demo (Debian package descriptions by section): the
summary paragraphs of public function and class docstrings of six Python libraries installed from
the lock (numpy, scipy, pandas, scikit-learn, torch, sympy), read from their source files with `ast`
(nothing is imported), labelled with the library. Four of them share the numpydoc style, so the
task is not solved by formatting alone. Standard library only; the same installed versions and
seed give byte-identical files.

    python3 data/prepare_docstrings.py --site-packages .venv/lib/python3.11/site-packages \
        --out data/docstrings --per-label 500 --seed 13
"""

from __future__ import annotations

import argparse
import ast
import csv
import random
import re
from pathlib import Path

LIBRARIES = {"numpy": "numpy", "scipy": "scipy", "pandas": "pandas", "sklearn": "sklearn", "torch": "torch", "sympy": "sympy"}
MIN_CHARS, MAX_CHARS = 60, 600
SECTION_HEADINGS = re.compile(r"^\s*(Parameters|Returns|Examples?|Notes|See Also|Args|Arguments|Raises|Yields|Attributes|"
                              r"References|Warnings?|Keyword Arguments)\s*:?\s*$", re.MULTILINE)
VENDORED_OR_TESTS = {"tests", "test", "testing", "_vendor", "vendored", "externals", "_lib", "array_api_compat",
                     "array_api_extra", "_array_api_compat_vendor", "third_party", "_thirdparty"}
SPLITS = (("train", 0.7), ("validation", 0.1), ("test", 0.2))


def summary(docstring: str) -> str:
    """The text before the first section heading (Parameters, Args, ...), directives and doctests dropped, one line."""
    head = SECTION_HEADINGS.split(docstring, maxsplit=1)[0]
    lines = [line.strip() for line in head.splitlines()]
    kept = [line for line in lines if line and not line.startswith((">>>", "..", ":", "---", "===")) and set(line) != {"-"}]
    text = " ".join(kept)
    if len(text) > MAX_CHARS:
        text = text[:MAX_CHARS].rsplit(" ", 1)[0]
    return text


def public_docstrings(path: Path):
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)) and not node.name.startswith("_"):
            docstring = ast.get_docstring(node)
            if docstring:
                yield docstring


def library_rows(root: Path, label: str) -> list[str]:
    texts = set()
    for path in sorted(root.rglob("*.py")):
        if any(part in VENDORED_OR_TESTS for part in path.parts):
            continue  # test helpers and other projects' code copied in are not the library's own API
        for docstring in public_docstrings(path):
            text = summary(docstring)
            if MIN_CHARS <= len(text) and label not in text.lower():  # the library's name would give the label away
                texts.add(text)
    return sorted(texts)


def split_rows(rows_by_label: dict[str, list[str]], per_label: int, seed: int) -> dict[str, list[tuple[str, str]]]:
    rng = random.Random(seed)
    splits = {name: [] for name, _ in SPLITS}
    for label, texts in rows_by_label.items():
        chosen = rng.sample(texts, min(per_label, len(texts)))
        start = 0
        for name, share in SPLITS:
            count = round(share * len(chosen)) if name != SPLITS[-1][0] else len(chosen) - start
            splits[name] += [(text, label) for text in chosen[start : start + count]]
            start += count
    for rows in splits.values():
        rng.shuffle(rows)
    return splits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--site-packages", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "docstrings")
    parser.add_argument("--per-label", type=int, default=500)
    parser.add_argument("--seed", type=int, default=13)
    args = parser.parse_args()
    rows_by_label = {label: library_rows(args.site_packages / folder, label) for label, folder in LIBRARIES.items()}
    seen: dict[str, str] = {}
    for label, texts in rows_by_label.items():  # a text two libraries share (copied docstrings) is ambiguous: dropped
        for text in texts:
            seen[text] = "" if text in seen else label
    rows_by_label = {label: [t for t in texts if seen[t] == label] for label, texts in rows_by_label.items()}
    args.out.mkdir(parents=True, exist_ok=True)
    for name, rows in split_rows(rows_by_label, args.per_label, args.seed).items():
        with open(args.out / f"{name}.csv", "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle, lineterminator="\n")
            writer.writerow(("text", "label"))
            writer.writerows(rows)
        print(f"{name}: {len(rows)} rows")
    print({label: len(texts) for label, texts in rows_by_label.items()})


if __name__ == "__main__":
    main()
