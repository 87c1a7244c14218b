"""Row formats, detected by their fields (first match wins), each turned into chat messages.

A converted row is a list of ``{"role", "content"}`` messages with roles system/user/assistant.
Formats whose prompt has parts (alpaca's input, Q&A's context) keep them as extra keys on the user
message, so a built-in template can lay them out; chat templates see the joined ``content``.
Plain ``text`` rows become a single message with role ``text`` (trained in full, no template).
"""

from __future__ import annotations

from typing import Any, Callable

from qfine.util.errors import QfineError

Messages = list[dict[str, str]]

_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "chatgpt": "assistant", "bing": "assistant", "bard": "assistant", "system": "system"}


def _string(row: dict, key: str, where: str, allow_empty: bool = False) -> str:
    v = row[key]
    if v is None and allow_empty:
        return ""
    if not isinstance(v, str):
        raise QfineError(f"{where}: '{key}' must be a string, got {type(v).__name__}")
    if not allow_empty and not v.strip():
        raise QfineError(f"{where}: '{key}' is empty")
    return v


def _check_turns(msgs: Messages, where: str, field: str) -> Messages:
    for i, m in enumerate(msgs):
        if m["role"] == "assistant" and not m["content"].strip():
            raise QfineError(f"{where}: {field}[{i}] is an empty assistant turn")
    if not any(m["role"] == "assistant" for m in msgs):
        raise QfineError(f"{where}: no assistant turn to train on in '{field}'")
    return msgs


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
            raise QfineError(f"{where}: messages[{i}].content must be a string, got {type(m['content']).__name__}")
        out.append({"role": m["role"], "content": m["content"]})
    return _check_turns(out, where, "messages")


def _sharegpt(row: dict, where: str) -> Messages:
    conv = row["conversations"]
    if not isinstance(conv, list) or not conv:
        raise QfineError(f"{where}: 'conversations' must be a non-empty list")
    out = []
    for i, m in enumerate(conv):
        if not isinstance(m, dict) or "from" not in m or "value" not in m:
            raise QfineError(f"{where}: conversations[{i}] needs 'from' and 'value'")
        role = _SHAREGPT_ROLES.get(str(m["from"]).lower())
        if role is None:
            raise QfineError(f"{where}: conversations[{i}].from is {m['from']!r}; expected human, gpt or system")
        if not isinstance(m["value"], str):
            raise QfineError(f"{where}: conversations[{i}].value must be a string, got {type(m['value']).__name__}")
        out.append({"role": role, "content": m["value"]})
    return _check_turns(out, where, "conversations")


def _user(content: str, **parts: str) -> dict[str, str]:
    return {"role": "user", "content": content, **{k: v for k, v in parts.items() if v}}


def _prompt_completion(row: dict, where: str) -> Messages:
    p, c = _string(row, "prompt", where, allow_empty=True), _string(row, "completion", where)
    return [_user(p), {"role": "assistant", "content": c}]


def _alpaca(row: dict, where: str) -> Messages:
    ins, out = _string(row, "instruction", where), _string(row, "output", where)
    inp = _string(row, "input", where, allow_empty=True) if "input" in row else ""
    return [_user(f"{ins}\n\n{inp}" if inp else ins, instruction=ins, input=inp),
            {"role": "assistant", "content": out}]


def _dolly(row: dict, where: str) -> Messages:
    ins, out = _string(row, "instruction", where), _string(row, "response", where)
    ctx = _string(row, "context", where, allow_empty=True) if "context" in row else ""
    return [_user(f"{ins}\n\n{ctx}" if ctx else ins, instruction=ins, input=ctx),
            {"role": "assistant", "content": out}]


def _qa(row: dict, where: str) -> Messages:
    q, a = _string(row, "question", where), _string(row, "answer", where)
    ctx = _string(row, "context", where, allow_empty=True) if "context" in row else ""
    return [_user(f"{ctx}\n\n{q}" if ctx else q, question=q, context=ctx), {"role": "assistant", "content": a}]


def _text(row: dict, where: str) -> Messages:
    return [{"role": "text", "content": _string(row, "text", where)}]


# (name, required fields, converter): tried in order, the first whose fields are all present wins.
FORMATS: list[tuple[str, tuple[str, ...], Callable[[dict, str], Messages]]] = [
    ("messages", ("messages",), _messages),
    ("sharegpt", ("conversations",), _sharegpt),
    ("alpaca", ("instruction", "output"), _alpaca),
    ("dolly", ("instruction", "response"), _dolly),
    ("qa", ("question", "answer"), _qa),
    ("prompt_completion", ("prompt", "completion"), _prompt_completion),
    ("text", ("text",), _text),
]
FORMAT_NAMES = [name for name, _, _ in FORMATS]


def apply_columns(row: Any, columns: dict[str, str] | None) -> Any:
    """Rename the file's columns to the names a format expects (``{format field: file column}``)."""
    if not columns or not isinstance(row, dict):
        return row
    row = dict(row)
    for field, column in columns.items():
        if column in row:
            row[field] = row.pop(column)
    return row


def detect_format(row: Any, where: str, forced: str = "auto") -> str:
    """Name of the first format whose fields ``row`` has; QfineError listing fields otherwise."""
    if not isinstance(row, dict):
        raise QfineError(f"{where}: expected an object per row, got {type(row).__name__}")
    candidates = FORMATS if forced == "auto" else [f for f in FORMATS if f[0] == forced]
    if not candidates:
        raise QfineError(f"data.format must be auto or one of {', '.join(FORMAT_NAMES)}, not {forced!r}")
    for name, fields, _ in candidates:
        if all(f in row for f in fields):
            return name
    expected = "; ".join(f"{n}: {' + '.join(f)}" for n, f, _ in candidates)
    found = ", ".join(sorted(map(str, row))) or "(none)"
    raise QfineError(f"{where}: row has none of the supported fields. Found: {found}. Expected one of: {expected} "
                     "(or map your columns with data.columns)")


def to_messages(row: Any, where: str, forced: str = "auto", columns: dict[str, str] | None = None) -> Messages:
    """Rename columns, detect the format and convert ``row`` to messages."""
    row = apply_columns(row, columns)
    name = detect_format(row, where, forced)
    return next(conv for n, _, conv in FORMATS if n == name)(row, where)
