"""The common SFT layouts (`data.format`), read onto the prompt/response and chat paths without a conversion script.

alpaca:   {"instruction", "input" (optional), "output", "system" (optional)} → prompt = [system] instruction [input],
          response = output (the layout of Stanford Alpaca, as LLaMA-Factory and axolotl read it).
sharegpt: {"conversations": [{"from": "system"|"human"|"gpt", "value": ...}]} → chat messages
          [{"role": "system"|"user"|"assistant", "content": ...}] (ShareGPT/Vicuna; "user"/"assistant" accepted too).
The config's field names are set by the format (tasks/config.py), so validation reports the source's own columns.
"""

from __future__ import annotations

import pandas as pd

from adapterflow.errors import DataError

ALPACA_PROMPT = "instruction+input"  # the prompt column the alpaca layout builds
ALPACA_RESPONSE = "output"
SHAREGPT_MESSAGES = "conversations"
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
NAMED_TEMPLATES = {"chatml": CHATML}
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


def as_declared(frame: pd.DataFrame, data_format: str | None, split: str) -> pd.DataFrame:
    """The frame in the columns the config's fields name: unchanged without a format."""
    if data_format == "alpaca":
        return _alpaca(frame, split)
    if data_format == "sharegpt":
        return _sharegpt(frame, split)
    return frame


def _alpaca(frame: pd.DataFrame, split: str) -> pd.DataFrame:
    missing = [column for column in ("instruction", "output") if column not in frame.columns]
    if missing:
        raise DataError(f"data.{split}: data.format alpaca needs the columns instruction and output (input and system are "
                        f"optional); missing: {', '.join(missing)}. The file has: {', '.join(map(str, frame.columns))}.")
    frame = frame.copy()
    frame[ALPACA_PROMPT] = [_alpaca_prompt(row) for row in frame.to_dict("records")]
    return frame


def _alpaca_prompt(row: dict) -> str | None:
    """Non-empty parts joined by a blank line; no instruction, no prompt (validation reports the row)."""
    if _blank(row.get("instruction")):
        return None
    return "\n\n".join(str(row[column]) for column in ("system", "instruction", "input") if not _blank(row.get(column)))


def _blank(value) -> bool:
    return value is None or (isinstance(value, float) and pd.isna(value)) or (isinstance(value, str) and not value.strip())


def _sharegpt(frame: pd.DataFrame, split: str) -> pd.DataFrame:
    if SHAREGPT_MESSAGES not in frame.columns:
        raise DataError(f"data.{split}: data.format sharegpt needs a column conversations (a list of {{from, value}} turns). "
                        f"The file has: {', '.join(map(str, frame.columns))}.")
    frame = frame.copy()
    frame[SHAREGPT_MESSAGES] = [_messages(turns, split, row) for row, turns in enumerate(frame[SHAREGPT_MESSAGES])]
    return frame


def _messages(turns, split: str, row: int):
    if not isinstance(turns, list):
        return turns  # validation reports a row that is not a conversation
    messages = []
    for turn in turns:
        if not isinstance(turn, dict):
            return None
        role = SHAREGPT_ROLES.get(turn.get("from"))
        if role is None:
            raise DataError(f"data.{split}: row {row} has a turn from {turn.get('from')!r}; data.format sharegpt reads turns from "
                            f"{', '.join(SHAREGPT_ROLES)}. Drop or rename those turns (tool calls are not trained on).")
        messages.append({"role": role, "content": turn.get("value")})
    return messages


def chat_template(value: str | None) -> str | None:
    """A named template, or the Jinja text itself."""
    return NAMED_TEMPLATES.get(value, value) if value else None
