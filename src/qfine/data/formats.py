"""Row formats, detected by their fields (first match wins), each turned into chat messages.

A converted row is a list of ``{"role", "content"}`` messages; roles are system/user/assistant.
Plain ``text`` rows become a single message with role ``text`` (trained in full, no template).
"""

from __future__ import annotations

from typing import Any, Callable

from ..errors import QfineError

Messages = list[dict[str, str]]


def _messages(row: dict, where: str) -> Messages:
    msgs = row["messages"]
    if not isinstance(msgs, list) or not msgs:
        raise QfineError(f"{where}: 'messages' must be a non-empty list")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise QfineError(f"{where}: messages[{i}] needs 'role' and 'content'")
        if m["role"] not in ("system", "user", "assistant"):
            raise QfineError(f"{where}: messages[{i}].role is {m['role']!r}; expected system, user or assistant")
        if not isinstance(m["content"], str):
            raise QfineError(f"{where}: messages[{i}].content must be a string")
        out.append({"role": m["role"], "content": m["content"]})
    if not any(m["role"] == "assistant" and m["content"].strip() for m in out):
        raise QfineError(f"{where}: no non-empty assistant message to train on")
    return out


def _prompt_completion(row: dict, where: str) -> Messages:
    p, c = row["prompt"], row["completion"]
    if not isinstance(p, str) or not isinstance(c, str):
        raise QfineError(f"{where}: 'prompt' and 'completion' must be strings")
    if not c.strip():
        raise QfineError(f"{where}: empty 'completion'")
    return [{"role": "user", "content": p}, {"role": "assistant", "content": c}]


def _text(row: dict, where: str) -> Messages:
    t = row["text"]
    if not isinstance(t, str) or not t.strip():
        raise QfineError(f"{where}: 'text' must be a non-empty string")
    return [{"role": "text", "content": t}]


# (name, required fields, converter): tried in order, the first whose fields are all present wins.
FORMATS: list[tuple[str, tuple[str, ...], Callable[[dict, str], Messages]]] = [
    ("messages", ("messages",), _messages),
    ("prompt_completion", ("prompt", "completion"), _prompt_completion),
    ("text", ("text",), _text),
]


def detect_format(row: Any, where: str) -> str:
    """Name of the first format whose fields ``row`` has; QfineError listing fields otherwise."""
    if not isinstance(row, dict):
        raise QfineError(f"{where}: expected a JSON object per row, got {type(row).__name__}")
    for name, fields, _ in FORMATS:
        if all(f in row for f in fields):
            return name
    expected = "; ".join(" + ".join(f) for _, f, _ in FORMATS)
    found = ", ".join(sorted(row)) or "(none)"
    raise QfineError(f"{where}: row has none of the supported fields. Found: {found}. Expected one of: {expected}")


def to_messages(row: Any, where: str) -> Messages:
    """Detect ``row``'s format and convert it to messages."""
    name = detect_format(row, where)
    return next(conv for n, _, conv in FORMATS if n == name)(row, where)
