"""Reading the split files a config names, with one clear error per way a file can be wrong.

Every way a data file can be unreadable (missing, a folder, no permission, empty, not UTF-8, a corrupt
parquet, unparsable) ends in one DataError naming the file and the fix, never a traceback. The cheap
checks (`check_readable`) run in the CLI's preflight too, before anything starts.
"""

from __future__ import annotations

import codecs
import errno
import re
from pathlib import Path

import pandas as pd

from adapterflow.errors import DataError

DATA_SUFFIXES = (".csv", ".jsonl", ".json", ".parquet")  # as tasks/config.py accepts them
TEXT_SUFFIXES = (".csv", ".jsonl", ".json")
PARQUET_MAGIC = b"PAR1"  # a parquet file starts and ends with these four bytes
_REASON_CHARS = 300  # a parser's own message is cut here: errors never echo a whole file back
_CHUNK = 1 << 20


def read_split(path: str, split: str) -> pd.DataFrame:
    file = Path(path)
    check_readable(file, split, scan_text=False)  # the parse below decodes the text anyway
    try:
        frame = _read(file)
    except UnicodeDecodeError as err:
        raise DataError(_not_utf8(file, split, err.start, err.reason)) from None
    except OSError as err:
        if err.errno is not None:  # the system refused the read (pyarrow's OSErrors carry no errno: a corrupt file)
            raise DataError(_unreadable(file, split, err)) from None
        raise DataError(_unparsable(file, split, err)) from None
    except (ValueError, pd.errors.ParserError, pd.errors.EmptyDataError) as err:  # pyarrow's ArrowInvalid is a ValueError
        raise DataError(_unparsable(file, split, err)) from None
    if frame.empty:
        raise DataError(f"{_key(split)}: {file} has no rows. Add rows or point {_key(split)} at another file.")
    return frame


def check_readable(path: str | Path, split: str, scan_text: bool = True) -> None:
    """The file exists, is a regular file this user may read, is not empty, and looks like its format:
    parquet has its magic bytes, text formats decode as UTF-8 (`scan_text`). Reads no rows into memory."""
    file, key = Path(path), _key(split)
    if not file.exists():
        raise DataError(f"{key}: file not found: {file}. Check the path (relative paths are read from the config's folder).")
    if file.is_dir():
        raise DataError(f"{key}: {file} is a folder, not a file. Point {key} at one data file ({', '.join(DATA_SUFFIXES)}).")
    if not file.is_file():
        raise DataError(f"{key}: {file} is not a regular file (a pipe or a device?). Point {key} at a data file on disk.")
    try:
        size = file.stat().st_size
        with open(file, "rb") as handle:
            head = handle.read(len(PARQUET_MAGIC))
            if file.suffix.lower() == ".parquet" and size >= 2 * len(PARQUET_MAGIC):
                handle.seek(-len(PARQUET_MAGIC), 2)
                tail = handle.read()
            else:
                tail = b""
    except OSError as err:
        raise DataError(_unreadable(file, split, err)) from None
    if size == 0:
        raise DataError(f"{key}: file is empty: {file}. Point {key} at a file with a header and rows.")
    if file.suffix.lower() == ".parquet" and (head, tail) != (PARQUET_MAGIC, PARQUET_MAGIC):
        raise DataError(
            f"{key}: {file} is not a readable parquet file (no PAR1 marker at its start and end: truncated, corrupt, or "
            f"another format under a .parquet name). Write it again (e.g. pandas DataFrame.to_parquet) or point {key} at an intact copy."
        )
    if scan_text and file.suffix.lower() in TEXT_SUFFIXES:
        _check_utf8(file, split)


def _check_utf8(file: Path, split: str) -> None:
    decoder, offset = codecs.getincrementaldecoder("utf-8")(), 0
    try:
        with open(file, "rb") as handle:
            while chunk := handle.read(_CHUNK):
                try:
                    decoder.decode(chunk)
                except UnicodeDecodeError as err:
                    raise DataError(_not_utf8(file, split, offset + err.start, err.reason)) from None
                offset += len(chunk)
            decoder.decode(b"", final=True)
    except UnicodeDecodeError as err:  # the file ends inside a multi-byte character
        raise DataError(_not_utf8(file, split, offset, err.reason)) from None
    except OSError as err:
        raise DataError(_unreadable(file, split, err)) from None


def _key(split: str) -> str:
    """The config key that names the file: data.train, or a full key such as evaluate.generation.file."""
    return split if "." in split else f"data.{split}"


def _unreadable(file: Path, split: str, err: OSError) -> str:
    key = _key(split)
    if err.errno in (errno.EACCES, errno.EPERM):
        fix = f"Make it readable by this user (check its owner and mode, e.g. chmod u+r), or point {key} at a readable copy."
    elif err.errno == errno.EISDIR:
        fix = f"Point {key} at one data file, not a folder."
    else:
        fix = f"Check the file and the disk it is on, or point {key} at another copy."
    return f"{key}: cannot read {file}: {err.strerror or err}. {fix}"


def _not_utf8(file: Path, split: str, offset: int, reason: str) -> str:
    key = _key(split)
    return (f"{key}: {file} is not UTF-8 text (byte {offset}: {reason}). Save it as UTF-8, e.g. "
            f"iconv -f latin1 -t utf-8 {file.name} > {file.stem}.utf8{file.suffix}, and point {key} at that file.")


def _unparsable(file: Path, split: str, err: Exception) -> str:
    key = _key(split)
    reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:_REASON_CHARS]
    if file.suffix.lower() == ".parquet":
        fix = f"The file is damaged: write it again (e.g. pandas DataFrame.to_parquet) or point {key} at an intact copy."
    else:
        fix = f"Fix the file, or give it the extension of its format ({', '.join(DATA_SUFFIXES)})."
    return f"{key}: cannot parse {file}: {reason}. {fix}"


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
    """The split files a DataSpec names, in a fixed order (none for a data.dataset source until a run materialises it)."""
    if data.train is None:
        return {}
    files = {"train": data.train, "validation": data.validation}
    if data.test:
        files["test"] = data.test
    return files


# Labels: data.labels may list strings or integers. CSV holds no types (it is read as text), so its label
# cells are read as the declared type; JSONL and parquet carry their own, which must match the declared one.
_INT_TEXT = re.compile(r"[+-]?\d+")


def declared_kind(labels) -> str:
    """'integer' or 'string': the type data.labels lists (bool is no integer here)."""
    kinds = {_kind(label) for label in labels}
    return kinds.pop() if len(kinds) == 1 else "mixed"


def labels_as_declared(values: pd.Series, labels, path: str | Path) -> pd.Series:
    """The label column as the config declares it: in a CSV, blank cells are missing labels (null) and
    integer text becomes an int when data.labels lists integers. Other formats are returned as read."""
    if Path(path).suffix.lower() != ".csv":
        return values
    as_ints = declared_kind(labels) == "integer"

    def convert(value):
        if not isinstance(value, str):
            return value
        text = value.strip()
        if not text:
            return None
        return int(text) if as_ints and _INT_TEXT.fullmatch(text) else value

    return values.map(convert).astype(object)


def label_type_mismatch(values: pd.Series, labels, column: str) -> str | None:
    """A 'type mismatch' message with the fix when the column's labels are not the declared type, else None.
    Missing values are left to the not-null check."""
    declared = declared_kind(labels)
    found: dict[str, object] = {}
    for value in values:
        if _missing(value):
            continue
        found.setdefault(_kind(value), value)
    wrong = {kind: example for kind, example in found.items() if kind != declared}
    if not wrong:
        return None
    shown = ", ".join(repr(label) for label in list(labels)[:3]) + (", ..." if len(labels) > 3 else "")
    kind, example = next(iter(wrong.items()))
    holds = f"{_plural(kind)} (e.g. {_short(example)})"
    if len(found) > 1:
        holds = "a mix of " + " and ".join(f"{_plural(k)} (e.g. {_short(v)})" for k, v in found.items())
    head = f"type mismatch: data.labels lists {_plural(declared)} [{shown}] but column '{column}' holds {holds}"
    if kind == "integer" and declared == "string" and len(found) == 1:
        fix = "write data.labels as integers, without quotes (e.g. [0, 1, 2]), or store the labels as text in the file"
    elif kind == "string" and declared == "integer" and len(found) == 1:
        fix = f"list the file's label names in data.labels (e.g. [{_short(example)}, ...]), or store integers in the file"
    else:
        fix = "store every label in the file as one type, text or integer, the type data.labels lists"
    return f"{head}; {fix}"


def _kind(value) -> str:
    import numpy as np

    if isinstance(value, (bool, np.bool_)):
        return "boolean"
    if isinstance(value, (int, np.integer)):
        return "integer"
    if isinstance(value, (float, np.floating)):
        # An integer column with a missing value reads as floats (1.0, NaN): whole numbers still count as integers.
        return "integer" if float(value).is_integer() else "fractional number"
    if isinstance(value, str):
        return "string"
    return type(value).__name__


def _missing(value) -> bool:
    if value is None:
        return True
    try:
        return bool(pd.isna(value))
    except (TypeError, ValueError):  # a list or dict cell
        return False


def _plural(kind: str) -> str:
    return {"string": "strings", "integer": "integers", "boolean": "booleans", "fractional number": "fractional numbers",
            "mixed": "mixed types"}.get(kind, f"{kind} values")


def _short(value, quoted: bool = True) -> str:
    text = repr(value) if quoted else str(value)
    return text if len(text) <= 40 else text[:37] + "..."
