"""Chat data formats: read rows from files or hubs and normalise them to OpenAI-style messages.

Three row formats are understood, detected from the first row's keys unless ``data.format``
says which:

* ``messages`` — ``{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}``
* ``sharegpt`` — ``{"conversations": [{"from": "human"|"gpt"|"system", "value": str}], "system"?: str}``
* ``alpaca``   — ``{"instruction": str, "input"?: str, "output": str}``

A bad row raises ``DataError`` naming the file, the row (or line) and what is wrong.
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


def _read_json(path: Path) -> list[dict]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        line = path.read_bytes()[:err.start].count(b"\n") + 1
        raise DataError(f"{path} line {line}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    one_document = path.suffix.lower() == ".json"  # else JSON Lines
    if one_document and text.lstrip().startswith("{") and "\n" in text.strip():
        try:
            json.loads(text)
        except json.JSONDecodeError:
            pass  # JSON Lines, parsed below
        else:
            raise DataError(f"{path}: one JSON object; expected a list of rows, or one row per line (JSON Lines)")
    if one_document and text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(f"{path} line {err.lineno}: not valid JSON ({err.msg})") from None
    else:
        rows = []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise DataError(f"{path} line {lineno}: not valid JSON ({err.msg})") from None
    if not rows:
        raise DataError(f"{path}: no rows")
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise DataError(f"{path} row {i}: expected a JSON object, got {type(row).__name__}")
    return rows


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
        turns = row.get("messages")
        if not isinstance(turns, list):
            raise DataError(f"{where}: 'messages' must be a list")
        messages = []
        for j, turn in enumerate(turns):
            if not isinstance(turn, dict) or "role" not in turn or "content" not in turn:
                raise DataError(f"{where}: message {j} needs 'role' and 'content'")
            messages.append({"role": turn["role"], "content": turn["content"]})
    elif fmt == "sharegpt":
        turns = row.get("conversations")
        if not isinstance(turns, list):
            raise DataError(f"{where}: 'conversations' must be a list")
        messages = []
        if row.get("system"):
            messages.append({"role": "system", "content": row["system"]})
        for j, turn in enumerate(turns):
            if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
                raise DataError(f"{where}: conversation turn {j} needs 'from' and 'value'")
            role = SHAREGPT_ROLES.get(str(turn["from"]).lower())
            if role is None:
                raise DataError(f"{where}: turn {j} has unknown speaker '{turn['from']}'")
            messages.append({"role": role, "content": turn["value"]})
    elif fmt == "alpaca":
        instruction, output = row.get("instruction"), row.get("output")
        if not isinstance(instruction, str) or not isinstance(output, str):
            raise DataError(f"{where}: alpaca rows need string 'instruction' and 'output'")
        prompt = instruction + (f"\n\n{row['input']}" if row.get("input") else "")
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]
    else:
        raise DataError(f"{where}: unknown format '{fmt}'")
    return check_conversation(messages, where)


def check_conversation(messages: list[dict], where: str) -> list[dict]:
    """Roles known, contents strings, system first, and at least one non-empty assistant turn."""
    for j, m in enumerate(messages):
        if m["role"] not in ROLES:
            raise DataError(f"{where}: message {j} has unknown role '{m['role']}' (expected {', '.join(ROLES)})")
        if not isinstance(m["content"], str):
            raise DataError(f"{where}: message {j} content must be a string, got {type(m['content']).__name__}")
        if m["role"] == "system" and j != 0:
            raise DataError(f"{where}: a system message may only come first (found at message {j})")
    if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
        raise DataError(f"{where}: no assistant turn to learn from")
    first = 1 if messages[0]["role"] == "system" else 0
    if len(messages) <= first or messages[first]["role"] != "user":
        raise DataError(f"{where}: the conversation must start with a user turn")
    return messages
