"""Data validation with a Great Expectations suite built from the config.

A failed suite raises DataError with a readable table before any model is loaded.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd

from adapterflow.errors import DataError
from adapterflow.tasks.data_io import label_type_mismatch, labels_as_declared, read_split, split_files
from adapterflow.tasks.sft_formats import as_declared

MESSAGES_TEXT = "_messages_text"
LABEL_TYPE_CHECK = "column_values_to_match_labels_type"  # a check of ours, beside the Great Expectations suite


@dataclass(frozen=True)
class CheckRow:
    split: str
    expectation: str
    column: str
    success: bool
    observed: str
    examples: str = ""


@dataclass
class ValidationReport:
    rows: list[CheckRow] = field(default_factory=list)
    row_counts: dict[str, int] = field(default_factory=dict)

    @property
    def success(self) -> bool:
        return all(row.success for row in self.rows)

    def failures(self) -> list[CheckRow]:
        return [row for row in self.rows if not row.success]

    def as_table(self) -> list[dict]:
        return [asdict(row) for row in self.rows]

    def to_markdown(self) -> str:
        head = "| split | expectation | column | ok | observed | examples |\n|---|---|---|---|---|---|"
        body = [
            f"| {r.split} | {r.expectation} | {r.column} | {'yes' if r.success else 'NO'} | {r.observed} | {r.examples} |"
            for r in self.rows
        ]
        return "\n".join([head, *body])

    def write(self, folder: Path) -> dict[str, Path]:
        folder.mkdir(parents=True, exist_ok=True)
        paths = {"markdown": folder / "validation_report.md", "json": folder / "validation_report.json"}
        paths["markdown"].write_text(self.to_markdown() + "\n")
        paths["json"].write_text(json.dumps({"success": self.success, "row_counts": self.row_counts, "checks": self.as_table()}, indent=2))
        return paths


def validate_data(config) -> ValidationReport:
    """Validate every split the config names; raise DataError listing each failed expectation."""
    report = ValidationReport()
    for split, path in split_files(config.data).items():
        frame = _with_declared_labels(as_declared(read_split(path, split), config.data.format, split), path, config)
        report.row_counts[split] = len(frame)
        report.rows.extend(_validate_frame(frame, split, config))
    if not report.success:
        raise DataError(_failure_message(report), ) from None
    return report


def _failure_message(report: ValidationReport) -> str:
    lines = ["data validation failed; nothing was trained. Failed expectations:"]
    said: dict[tuple[str, str, str], str] = {}
    for row in report.failures():
        example = f" e.g. {row.examples}" if row.examples else ""
        first = said.setdefault((row.expectation, row.column, row.observed), row.split)
        repeated = first != row.split and len(row.observed) > 80
        observed = f"the same as in {first}" if repeated else row.observed  # a long message (with its fix) is said once
        lines.append(f"  - {row.split}: {row.expectation} on '{row.column}': {observed}{example}")
    lines.append("Fix the data, or relax data.checks / data.labels in the config if the data is right.")
    return "\n".join(lines)


def _validate_frame(frame: pd.DataFrame, split: str, config) -> list[CheckRow]:
    columns = _required_columns(config)
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        present = ", ".join(map(str, frame.columns))
        return [CheckRow(split, "column_exists", c, False, f"missing; columns present: {present}") for c in missing]
    frame = _with_messages_text(frame, config)
    mismatch = _label_type_row(frame, split, config)
    results = _run_suite(frame, _build_expectations(config, labels_in_set=mismatch is None))
    return [_to_row(split, result) for result in results] + ([mismatch] if mismatch else [])


def _with_declared_labels(frame: pd.DataFrame, path: str, config) -> pd.DataFrame:
    """A CSV's label cells read as the type data.labels lists (encoding reads them the same way)."""
    field = config.data.label_field
    if config.task != "sequence_classification" or field not in frame.columns:
        return frame
    frame = frame.copy()
    frame[field] = labels_as_declared(frame[field], config.data.labels, path)
    return frame


def _label_type_row(frame: pd.DataFrame, split: str, config) -> CheckRow | None:
    """Integer labels in the file and strings in data.labels (or the reverse) would match nothing: say so, with the fix."""
    if config.task != "sequence_classification":
        return None
    field = config.data.label_field
    problem = label_type_mismatch(frame[field], config.data.labels, field)
    return CheckRow(split, LABEL_TYPE_CHECK, field, False, problem) if problem else None


def _required_columns(config) -> list[str]:
    data = config.data
    if config.task == "sequence_classification":
        return [data.text_field, data.label_field]
    if data.messages_field:
        return [data.messages_field]
    return [data.prompt_field, data.response_field]


def _read_columns(config) -> list[str]:
    """Every column training reads besides the text columns: each gets a not-null expectation."""
    data = config.data
    if config.task == "sequence_classification":
        return [data.label_field]
    return [data.messages_field] if data.messages_field else []


def _text_columns(config) -> list[str]:
    data = config.data
    if config.task == "sequence_classification":
        return [data.text_field]
    if data.messages_field:
        return [MESSAGES_TEXT]
    return [data.prompt_field, data.response_field]


def _with_messages_text(frame: pd.DataFrame, config) -> pd.DataFrame:
    """Chat rows are validated through their concatenated contents (length, blanks, duplicates)."""
    if config.task != "causal_lm" or not config.data.messages_field:
        return frame
    column = frame[config.data.messages_field]
    frame = frame.copy()
    frame[MESSAGES_TEXT] = column.map(_join_messages)
    return frame


def _join_messages(value) -> str | None:
    if not isinstance(value, list) or not value:
        return None
    parts = [m.get("content", "") for m in value if isinstance(m, dict)]
    return "\n".join(str(p) for p in parts) if len(parts) == len(value) else None


def _build_expectations(config, labels_in_set: bool = True) -> list:
    """The suite; `labels_in_set` False leaves out the label set check (its column has the wrong type, reported instead)."""
    import great_expectations as gx

    checks = config.data.checks
    found = [gx.expectations.ExpectTableRowCountToBeBetween(min_value=checks.min_rows)]
    for column in _text_columns(config):
        found += [
            gx.expectations.ExpectColumnValuesToNotBeNull(column=column),
            gx.expectations.ExpectColumnValuesToNotMatchRegex(column=column, regex=r"^\s*$"),
            gx.expectations.ExpectColumnValueLengthsToBeBetween(
                column=column, min_value=checks.min_text_chars, max_value=checks.max_text_chars
            ),
        ]
    # A null label (or chat) cell passes every other check and would crash training: refused here.
    found += [gx.expectations.ExpectColumnValuesToNotBeNull(column=column) for column in _read_columns(config)]
    key = _text_columns(config)[0]
    found.append(gx.expectations.ExpectColumnProportionOfUniqueValuesToBeBetween(column=key, min_value=1.0 - checks.max_duplicate_rate))
    if config.task == "sequence_classification" and labels_in_set:
        found.append(gx.expectations.ExpectColumnValuesToBeInSet(column=config.data.label_field, value_set=list(config.data.labels)))
    return found


def _run_suite(frame: pd.DataFrame, expectations: list) -> list:
    import logging

    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    # GE pins this module's logger to INFO and announces a temp folder on every ephemeral context.
    logging.getLogger("great_expectations.data_context.types.base").setLevel(logging.WARNING)
    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    batch_def = context.data_sources.add_pandas("adapterflow").add_dataframe_asset("split").add_batch_definition_whole_dataframe("all")
    suite = context.suites.add(gx.ExpectationSuite(name="adapterflow_data"))
    for expectation in expectations:
        suite.add_expectation(expectation)
    result = batch_def.get_batch(batch_parameters={"dataframe": frame}).validate(suite)
    return list(result.results)


def _to_row(split: str, result) -> CheckRow:
    config = result.expectation_config
    kind = config.type.removeprefix("expect_")
    column = str(config.kwargs.get("column", "(table)"))
    if result.exception_info and result.exception_info.get("raised_exception"):
        message = result.exception_info.get("exception_message", "error")
        return CheckRow(split, kind, column, False, f"could not evaluate: {message}")
    return CheckRow(split, kind, column, bool(result.success), _observed(kind, result.result), _examples(result.result))


def _observed(kind: str, result: dict) -> str:
    if "unexpected_count" in result:
        return f"{result['unexpected_count']} of {result.get('element_count', '?')} rows unexpected"
    value = result.get("observed_value")
    if kind.startswith("column_proportion_of_unique"):
        return f"unique fraction {value:.3f} (duplicate rate {1 - value:.3f})" if value is not None else "n/a"
    return f"observed {value}"


def _examples(result: dict) -> str:
    examples = result.get("partial_unexpected_list") or []
    shown = [repr(e)[:40] for e in examples[:3]]
    return ", ".join(shown)
