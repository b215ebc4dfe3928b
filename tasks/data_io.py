"""Reading the split files a config names, with one clear error per way a file can be wrong."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from adapterflow.errors import DataError


def read_split(path: str, split: str) -> pd.DataFrame:
    file = Path(path)
    if not file.is_file():
        raise DataError(f"data.{split}: file not found: {file}. Check the path (relative paths are read from the config's folder).")
    if file.stat().st_size == 0:
        raise DataError(f"data.{split}: file is empty: {file}. Point data.{split} at a file with a header and rows.")
    try:
        frame = _read(file)
    except (ValueError, pd.errors.ParserError, pd.errors.EmptyDataError) as err:
        raise DataError(f"data.{split}: cannot parse {file}: {err}. Fix the file or its extension.") from None
    if frame.empty:
        raise DataError(f"data.{split}: {file} has no rows. Add rows or point data.{split} at another file.")
    return frame


def _read(file: Path) -> pd.DataFrame:
    suffix = file.suffix.lower()
    if suffix == ".csv":
        # keep_default_na=False: an empty cell stays "", so blank text is reported as blank, not null.
        return pd.read_csv(file, keep_default_na=False, na_values=[], dtype=str)
    if suffix == ".jsonl":
        return pd.read_json(file, lines=True, dtype=False)
    if suffix == ".json":
        return pd.read_json(file, dtype=False)
    return pd.read_parquet(file)


def split_files(data) -> dict[str, str]:
    """The split files a DataSpec names, in a fixed order."""
    files = {"train": data.train, "validation": data.validation}
    if data.test:
        files["test"] = data.test
    return files
