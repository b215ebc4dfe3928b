#!/usr/bin/env python3
"""Build the adapterflow demo dataset: Debian package descriptions labelled
with their archive section.

Two subcommands, standard library only:

  extract  read the local APT package lists (``apt-cache dumpavail`` plus
           ``apt-cache show`` for English long descriptions), keep eight
           sections, clean and dedupe the text, cap each section, and write
           a gzipped CSV (package, section, text).
  split    stratified, seeded train/validation/test split of that CSV into
           text,label CSV files.

Both commands are deterministic: the same APT lists and seed give
byte-identical output files.

    python3 data/prepare_demo.py extract --out data/raw/debian_packages.csv.gz
    python3 data/prepare_demo.py split --raw data/raw/debian_packages.csv.gz \
        --out data/demo --seed 13 --validation 0.1 --test 0.15
"""

from __future__ import annotations

import argparse
import collections
import csv
import gzip
import io
import random
import subprocess
import sys
from pathlib import Path
from typing import Iterable, Iterator

SECTIONS = ("games", "science", "sound", "graphics", "net", "text", "fonts", "admin")
MAX_CHARS = 600
MIN_CHARS = 20
RAW_COLUMNS = ("package", "section", "text")
SPLIT_COLUMNS = ("text", "label")
SPLIT_NAMES = ("train", "validation", "test")


# --------------------------------------------------------------------------
# APT access and stanza parsing
# --------------------------------------------------------------------------

def apt_cache(args: list[str], apt_options: list[str]) -> Iterator[str]:
    """Yield stdout lines of an apt-cache call, failing loudly on error."""
    cmd = ["apt-cache"]
    for opt in apt_options:
        cmd += ["-o", opt]
    cmd += args
    proc = subprocess.run(cmd, capture_output=True, text=True, encoding="utf-8",
                          errors="replace", check=False)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd[:4])} ... failed ({proc.returncode}): {proc.stderr.strip()}")
    return iter(proc.stdout.splitlines())


def parse_stanzas(lines: Iterable[str]) -> Iterator[dict[str, str]]:
    """Parse deb822 stanzas; a multi-line field keeps its continuation lines
    (with their leading space) after a newline."""
    stanza: dict[str, str] = {}
    key = None
    for line in lines:
        if not line.strip():
            if stanza:
                yield stanza
            stanza, key = {}, None
        elif line[0] in " \t" and key is not None:
            stanza[key] += "\n" + line
        elif ":" in line:
            key, _, value = line.partition(":")
            stanza[key] = value.strip()
    if stanza:
        yield stanza


def base_section(section: str) -> str:
    """'contrib/games' -> 'games': the component prefix is not part of the label."""
    return section.rsplit("/", 1)[-1]


# --------------------------------------------------------------------------
# Text cleaning
# --------------------------------------------------------------------------

def long_description(field: str) -> str:
    """The long part of a Description field as one line.

    Lines after the synopsis are indented; ' .' marks a paragraph break,
    which a single-line classifier input does not need.
    """
    body = [ln.strip() for ln in field.split("\n")[1:]]
    return " ".join(ln for ln in body if ln and ln != ".")


def truncate_words(text: str, limit: int = MAX_CHARS) -> str:
    """Cut to at most `limit` chars without splitting a word."""
    if len(text) <= limit:
        return text
    head = text[: limit + 1]
    cut = head.rfind(" ")
    return head[:cut].rstrip() if cut > 0 else text[:limit]


def build_text(synopsis: str, long_desc: str) -> str:
    synopsis = synopsis.strip()
    if long_desc:
        # Avoid 'foo.. bar' when the synopsis already ends a sentence.
        sep = " " if synopsis.endswith((".", "!", "?")) else ". "
        text = synopsis + sep + long_desc
    else:
        text = synopsis
    return truncate_words(" ".join(text.split()))


# --------------------------------------------------------------------------
# extract
# --------------------------------------------------------------------------

def candidate_stanzas(apt_options: list[str]) -> list[dict[str, str]]:
    """First dumpavail stanza per package whose section is one of SECTIONS."""
    seen: set[str] = set()
    kept = []
    for stanza in parse_stanzas(apt_cache(["dumpavail"], apt_options)):
        name = stanza.get("Package")
        section = base_section(stanza.get("Section", ""))
        if not name or name in seen or section not in SECTIONS:
            continue
        seen.add(name)
        kept.append(stanza)
    return kept


def english_long_descriptions(packages: list[str], apt_options: list[str]) -> dict[str, str]:
    """Map Description-md5 -> long description.

    Packages files only carry the synopsis; the long text lives in the
    Translation-en index, which `apt-cache show` merges in as Description-en.
    """
    options = ["Acquire::Languages=en", *apt_options]
    by_md5: dict[str, str] = {}
    for stanza in parse_stanzas(apt_cache(["show", *packages], options)):
        md5 = stanza.get("Description-md5")
        field = stanza.get("Description-en") or stanza.get("Description", "")
        if md5 and md5 not in by_md5:
            by_md5[md5] = long_description(field)
    return by_md5


def make_rows(stanzas: list[dict[str, str]], long_by_md5: dict[str, str]) -> list[dict[str, str]]:
    """Clean text, drop too-short rows and exact duplicate texts (first wins)."""
    rows, seen_text = [], set()
    missing_long = 0
    for stanza in stanzas:
        field = stanza.get("Description", "")
        long_desc = long_description(field) or long_by_md5.get(stanza.get("Description-md5", ""), "")
        missing_long += not long_desc
        text = build_text(field.split("\n", 1)[0], long_desc)
        if len(text) < MIN_CHARS or text in seen_text:
            continue
        seen_text.add(text)
        rows.append({"package": stanza["Package"],
                     "section": base_section(stanza["Section"]),
                     "text": text})
    if missing_long:
        print(f"warning: {missing_long} packages have no long description "
              "(are Translation-en lists downloaded? see data/README.md)", file=sys.stderr)
    return rows


def cap_per_section(rows: list[dict[str, str]], cap: int, seed: int) -> list[dict[str, str]]:
    """Seeded sample of at most `cap` rows per section, sorted for stable output."""
    rng = random.Random(seed)
    by_section = collections.defaultdict(list)
    for row in rows:
        by_section[row["section"]].append(row)
    kept = []
    for section in sorted(by_section):
        group = sorted(by_section[section], key=lambda r: r["package"])
        kept += rng.sample(group, cap) if len(group) > cap else group
    return sorted(kept, key=lambda r: (r["section"], r["package"]))


def write_csv_gz(path: Path, rows: list[dict[str, str]], columns: tuple[str, ...]) -> None:
    """gzip with mtime=0 and no embedded file name, so reruns are byte-identical."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as raw, \
            gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz, \
            io.TextIOWrapper(gz, encoding="utf-8", newline="") as fh:
        write_rows(fh, rows, columns)


def write_rows(fh, rows: list[dict[str, str]], columns: tuple[str, ...]) -> None:
    writer = csv.DictWriter(fh, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)


def cmd_extract(args: argparse.Namespace) -> None:
    stanzas = candidate_stanzas(args.apt_option)
    long_by_md5 = english_long_descriptions([s["Package"] for s in stanzas], args.apt_option)
    rows = make_rows(stanzas, long_by_md5)
    before = collections.Counter(r["section"] for r in rows)
    rows = cap_per_section(rows, args.cap, args.seed)
    after = collections.Counter(r["section"] for r in rows)
    write_csv_gz(args.out, rows, RAW_COLUMNS)

    print(f"{len(stanzas)} packages in {len(SECTIONS)} sections; "
          f"{sum(before.values())} after cleaning/dedupe; {len(rows)} written to {args.out}")
    for section in SECTIONS:
        print(f"  {section:<9} {before[section]:>5} -> {after[section]:>4}")
    print(f"  size: {args.out.stat().st_size} bytes")


# --------------------------------------------------------------------------
# split
# --------------------------------------------------------------------------

def read_raw(path: Path) -> list[dict[str, str]]:
    with gzip.open(path, "rt", encoding="utf-8", newline="") as fh:
        return list(csv.DictReader(fh))


def stratified_split(rows: list[dict[str, str]], seed: int, val_frac: float,
                     test_frac: float) -> dict[str, list[dict[str, str]]]:
    """Per-section seeded shuffle, then slice test / validation / train."""
    rng = random.Random(seed)
    by_section = collections.defaultdict(list)
    for row in rows:
        by_section[row["section"]].append(row)
    splits = {name: [] for name in SPLIT_NAMES}
    for section in sorted(by_section):
        # Sort first so the result does not depend on the raw file's row order.
        group = sorted(by_section[section], key=lambda r: r["package"])
        rng.shuffle(group)
        n_test = round(len(group) * test_frac)
        n_val = round(len(group) * val_frac)
        splits["test"] += group[:n_test]
        splits["validation"] += group[n_test:n_test + n_val]
        splits["train"] += group[n_test + n_val:]
    for name in SPLIT_NAMES:
        rng.shuffle(splits[name])  # no long single-label runs in the files
    return splits


def check_no_leakage(splits: dict[str, list[dict[str, str]]]) -> None:
    owner: dict[str, str] = {}
    for name, rows in splits.items():
        for row in rows:
            if owner.setdefault(row["text"], name) != name:
                sys.exit(f"leakage: text in both {owner[row['text']]} and {name}: {row['text'][:60]!r}")


def print_counts(splits: dict[str, list[dict[str, str]]]) -> None:
    counts = {name: collections.Counter(r["section"] for r in rows) for name, rows in splits.items()}
    print(f"{'label':<9}" + "".join(f"{name:>11}" for name in SPLIT_NAMES) + f"{'total':>8}")
    for label in sorted(set().union(*counts.values())):
        per = [counts[name][label] for name in SPLIT_NAMES]
        print(f"{label:<9}" + "".join(f"{n:>11}" for n in per) + f"{sum(per):>8}")
    totals = [len(splits[name]) for name in SPLIT_NAMES]
    print(f"{'total':<9}" + "".join(f"{n:>11}" for n in totals) + f"{sum(totals):>8}")


def cmd_split(args: argparse.Namespace) -> None:
    if not 0 <= args.validation + args.test < 1:
        sys.exit("--validation + --test must be in [0, 1)")
    splits = stratified_split(read_raw(args.raw), args.seed, args.validation, args.test)
    check_no_leakage(splits)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, rows in splits.items():
        out_rows = [{"text": r["text"], "label": r["section"]} for r in rows]
        with open(args.out / f"{name}.csv", "w", encoding="utf-8", newline="") as fh:
            write_rows(fh, out_rows, SPLIT_COLUMNS)
    print_counts(splits)


# --------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    ext = sub.add_parser("extract", help="APT lists -> raw gzipped CSV")
    ext.add_argument("--out", type=Path, default=Path("data/raw/debian_packages.csv.gz"))
    ext.add_argument("--seed", type=int, default=13)
    ext.add_argument("--cap", type=int, default=450, help="max rows per section")
    ext.add_argument("--apt-option", action="append", default=[], metavar="KEY=VALUE",
                     help="passed to apt-cache as -o (repeatable), e.g. "
                          "Dir::State::Lists=/tmp/lists")
    ext.set_defaults(func=cmd_extract)

    spl = sub.add_parser("split", help="raw CSV -> train/validation/test CSVs")
    spl.add_argument("--raw", type=Path, default=Path("data/raw/debian_packages.csv.gz"))
    spl.add_argument("--out", type=Path, default=Path("data/demo"))
    spl.add_argument("--seed", type=int, default=13)
    spl.add_argument("--validation", type=float, default=0.1)
    spl.add_argument("--test", type=float, default=0.15)
    spl.set_defaults(func=cmd_split)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
