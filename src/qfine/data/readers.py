"""Readers: JSONL and JSON files → ``(location, row)`` pairs.

Rows are yielded one at a time so that large JSONL files are streamed, never held whole.
``location`` is ``"file:line"`` (JSONL) or ``"file[index]"`` (JSON), used in every error message.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

from ..errors import QfineError


def _iter_jsonl(path: Path) -> Iterator[tuple[str, Any]]:
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise QfineError(f"{path}:{lineno}: not valid UTF-8 (byte {e.start})") from None
            if not line.strip():
                continue
            try:
                yield f"{path}:{lineno}", json.loads(line)
            except json.JSONDecodeError as e:
                raise QfineError(f"{path}:{lineno}: malformed JSON line ({e.msg} at column {e.colno})") from None


def _iter_json(path: Path, split: str = "train") -> Iterator[tuple[str, Any]]:
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise QfineError(f"{path}: not valid UTF-8 (byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise QfineError(f"{path}:{e.lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
    if isinstance(data, dict):  # {split: [rows]}
        lists = {k: v for k, v in data.items() if isinstance(v, list)}
        if split in lists:
            data = lists[split]
        elif len(lists) == 1:
            data = next(iter(lists.values()))
        else:
            raise QfineError(f"{path}: a JSON object must map a split name ('{split}') to a list of rows; "
                             f"found keys {', '.join(data) or '(none)'}")
    if not isinstance(data, list):
        raise QfineError(f"{path}: expected a JSON list of rows or {{split: list}}")
    for i, row in enumerate(data):
        yield f"{path}[{i}]", row


def read_rows(path: str | Path, split: str = "train") -> Iterator[tuple[str, Any]]:
    """Yield ``(location, row)`` for every row of a .jsonl or .json file."""
    path = Path(path)
    if not path.is_file():
        raise QfineError(f"data file not found: {path}")
    if path.suffix == ".jsonl":
        return _iter_jsonl(path)
    if path.suffix == ".json":
        return _iter_json(path, split)
    raise QfineError(f"{path}: unsupported data file type '{path.suffix}' (use .jsonl or .json)")
