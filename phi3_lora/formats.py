"""Chat data formats: read rows from files or hubs and normalise them to OpenAI-style messages.

Three row formats are understood, detected from the first row's keys unless ``data.format``
says which:

* ``messages`` — ``{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}``
* ``sharegpt`` — ``{"conversations": [{"from": "human"|"gpt"|"system", "value": str}], "system"?: str}``
* ``alpaca``   — ``{"instruction": str, "input"?: str, "output": str}``

A bad row raises ``DataError`` naming the file, its place there (``row_name``) and what is wrong.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .config import DEMO_DATA


class DataError(ValueError):
    """A data file or row is unusable; the message names where and why."""


SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "bing": "assistant", "bard": "assistant", "system": "system"}
ROLES = ("system", "user", "assistant")


SINGLE_FILE_SUFFIXES = (".json", ".jsonl", ".parquet")


def is_single_file(path: str) -> bool:
    return Path(path).suffix.lower() in SINGLE_FILE_SUFFIXES


class LineRows(list):
    """The rows of a JSON Lines file, with the line (from 1) each came from."""

    def __init__(self, rows: list[dict], lines: list[int]):
        super().__init__(rows)
        self.lines = lines


def row_name(rows, i: int) -> str:
    """Where row ``i`` of ``rows`` is in its file, for errors: ``line N`` in JSON Lines, else ``row i`` (from 0)."""
    return f"line {rows.lines[i]}" if isinstance(rows, LineRows) else f"row {i}"


def read_rows(path: str, split: str = "train", demo_size: int = 1200, seed: int = 0) -> list[dict] | Any:
    """Rows of a local .json/.jsonl/.parquet file, a saved ``datasets`` directory or a hub dataset.

    JSON and JSONL are parsed here, so that a malformed line is reported with its line number.
    Returns a list of dicts (local JSON) or a ``datasets.Dataset`` (parquet, directories, hub).
    """
    if path == DEMO_DATA:
        from .demo_data import demo_conversations
        return demo_conversations(demo_size, seed=seed)
    local = Path(path)
    suffix = local.suffix.lower()
    if suffix in SINGLE_FILE_SUFFIXES and not local.is_file():
        raise DataError(f"data file not found: {path}")
    if suffix in (".json", ".jsonl"):
        return _read_json(local)
    import datasets
    if suffix == ".parquet":
        import pyarrow.parquet
        try:  # the footer first: datasets would log its own error lines before raising
            pyarrow.parquet.read_schema(local)
            return datasets.Dataset.from_parquet(str(local))
        except Exception as err:  # pyarrow's errors: a damaged or truncated file, not a parquet file at all
            raise DataError(f"{path}: cannot read it as parquet ({str(err).splitlines()[0]})") from None
    if local.is_dir():
        try:
            loaded = datasets.load_from_disk(str(local))
        except FileNotFoundError:
            raise DataError(f"{path}: a directory, but not a dataset saved with save_to_disk (give a .json, "
                            ".jsonl or .parquet file)") from None
        except Exception as err:  # a damaged save: its JSON, its Arrow files (pyarrow and json raise their own)
            raise DataError(f"{path}: a dataset saved with save_to_disk, but not readable "
                            f"({type(err).__name__}: {''.join(str(err).splitlines()[:1])[:200]})") from None
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise DataError(f"{path}: no split '{split}' (has {', '.join(loaded)})")
            loaded = loaded[split]
        return loaded
    if local.is_file():
        raise DataError(f"{path}: a file, but not .json, .jsonl or .parquet (the suffix tells the format; or give "
                        "a saved datasets directory)")
    if local.suffix or path.startswith((".", "/")):
        raise DataError(f"data file not found: {path} (expected .json, .jsonl, .parquet, a saved "
                        "datasets directory, or a hub dataset name)")
    try:
        return datasets.load_dataset(path, split=split)
    except Exception as err:  # the hub reports many kinds of failure; one line is what the user needs
        raise DataError(f"could not load dataset '{path}' split '{split}': {str(err).splitlines()[0]}") from None


def read_utf8_text(path: Path) -> str:
    """The text of ``path`` without a UTF-8 byte-order mark (some editors write one); bytes that are not UTF-8
    are a ``DataError`` naming the line and byte."""
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raw = path.read_bytes()
        at = err.start + (3 if raw.startswith(b"\xef\xbb\xbf") else 0)  # counted after the byte-order mark
        line = raw[:at].count(b"\n") + 1
        raise DataError(f"{path} line {line}: not UTF-8 text ({err.reason} at byte {at})") from None


def _read_json(path: Path) -> list[dict]:
    text = read_utf8_text(path)
    one_document = path.suffix.lower() == ".json"  # else JSON Lines
    if one_document and text.lstrip().startswith("{") and "\n" in text.strip():
        try:
            json.loads(text)
        except json.JSONDecodeError as err:
            if not _is_json(next(json_lines(text))[1]):  # one object over many lines, broken: its error's line
                raise DataError(f"{path} line {err.lineno}: not valid JSON ({err.msg})") from None
            # else JSON Lines, parsed below
        else:
            raise DataError(f"{path}: one JSON object; expected a list of rows, or one row per line (JSON Lines)")
    if one_document and text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(f"{path} line {err.lineno}: not valid JSON ({err.msg})") from None
    else:
        rows, lines = [], []
        for lineno, line in json_lines(text):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise DataError(f"{path} line {lineno}: not valid JSON ({err.msg})") from None
            lines.append(lineno)
        rows = LineRows(rows, lines)
    if not rows:
        raise DataError(f"{path}: no rows")
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise DataError(f"{path} {row_name(rows, i)}: expected a JSON object, got {type(row).__name__}")
    return rows


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except json.JSONDecodeError:
        return False
    return True


def json_lines(text: str):
    """``(line number from 1, line)`` for each non-blank line of JSON Lines text. Lines end at ``\\n`` only:
    ``str.splitlines`` would also cut at U+2028, U+2029 and U+0085, which JSON strings may hold unescaped."""
    for lineno, line in enumerate(text.split("\n"), start=1):
        if line.strip():
            yield lineno, line


def detect_format(row: dict, where: str) -> str:
    """The format of ``row`` from its keys: messages, sharegpt or alpaca."""
    if "messages" in row:
        return "messages"
    if "conversations" in row:
        return "sharegpt"
    if "instruction" in row and "output" in row:
        return "alpaca"
    raise DataError(f"{where}: cannot tell the format from keys {sorted(row)}; expected 'messages', "
                    "'conversations' or 'instruction'+'output' (or set data.format)")


def to_messages(row: dict, fmt: str, where: str) -> list[dict[str, str]]:
    """Normalise one row to ``[{"role", "content"}, ...]`` and check it is a trainable conversation."""
    if fmt == "messages":
        turns = _turn_list(row, "messages", where)
        messages, names = [], []
        for j, turn in enumerate(turns):
            if not isinstance(turn, dict) or "role" not in turn or "content" not in turn:
                raise DataError(f"{where}: message {j} needs 'role' and 'content'")
            messages.append({"role": turn["role"], "content": turn["content"]})
            names.append(f"message {j}")
    elif fmt == "sharegpt":
        turns = _turn_list(row, "conversations", where)
        messages, names = [], []
        if row.get("system"):
            messages.append({"role": "system", "content": row["system"]})
            names.append("'system'")
        for j, turn in enumerate(turns):
            if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
                raise DataError(f"{where}: conversation turn {j} needs 'from' and 'value'")
            role = SHAREGPT_ROLES.get(str(turn["from"]).lower())
            if role is None:
                raise DataError(f"{where}: turn {j} has unknown speaker '{turn['from']}'")
            messages.append({"role": role, "content": turn["value"]})
            names.append(f"turn {j}")
    elif fmt == "alpaca":
        instruction, output, extra = row.get("instruction"), row.get("output"), row.get("input")
        if not isinstance(instruction, str) or not isinstance(output, str):
            raise DataError(f"{where}: alpaca rows need string 'instruction' and 'output'{_format_hint(row, fmt)}")
        if extra is not None and not isinstance(extra, str):
            raise DataError(f"{where}: alpaca 'input' must be a string, got {type(extra).__name__}")
        prompt = instruction + (f"\n\n{extra}" if extra else "")
        messages, names = [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}], None
    else:
        raise DataError(f"{where}: unknown format '{fmt}'")
    return check_conversation(messages, where, names)


def _turn_list(row: dict, key: str, where: str) -> list:
    if key not in row:
        raise DataError(f"{where}: no '{key}'{_format_hint(row, 'messages' if key == 'messages' else 'sharegpt')}")
    if not isinstance(row[key], list):
        raise DataError(f"{where}: '{key}' must be a list")
    return row[key]


def _format_hint(row: dict, fmt: str) -> str:
    """For a row without its format's keys: the format came from the first row (or data.format)."""
    return f" (this file's rows are read as {fmt}, from its first row or data.format; this row has keys {sorted(row)})"


def check_conversation(messages: list[dict], where: str, names: list[str] | None = None) -> list[dict]:
    """Roles known, contents strings, system first, user and assistant turns alternating from a user turn,
    and at least one non-empty assistant turn. ``names``: each message's name in the row, for errors."""
    names = names or [f"message {j}" for j in range(len(messages))]
    for j, m in enumerate(messages):
        if m["role"] not in ROLES:
            raise DataError(f"{where}: {names[j]} has unknown role '{m['role']}' (expected {', '.join(ROLES)})")
        if not isinstance(m["content"], str):
            raise DataError(f"{where}: {names[j]} content must be a string, got {type(m['content']).__name__}")
        if m["role"] == "system" and j != 0:
            raise DataError(f"{where}: a system message may only come first (found at {names[j]})")
    if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
        raise DataError(f"{where}: no assistant turn to learn from")
    first = 1 if messages[0]["role"] == "system" else 0
    if len(messages) <= first or messages[first]["role"] != "user":
        raise DataError(f"{where}: the conversation must start with a user turn")
    for j in range(first + 1, len(messages)):
        if messages[j]["role"] == messages[j - 1]["role"]:  # the tokenizer's template: no header, or an empty turn
            raise DataError(f"{where}: {names[j - 1]} and {names[j]} are both {messages[j]['role']} turns; user and "
                            "assistant turns must alternate (merge the two)")
    return messages
