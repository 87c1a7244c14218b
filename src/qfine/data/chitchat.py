"""Convert the ``chitchat-dataset`` package (MIT, ~7k real conversations) to ``messages`` JSONL.

Each conversation is a list of turns, a turn being consecutive messages of one sender; the first
sender becomes ``user`` and the other ``assistant``. Every ``eval_every``-th conversation goes to
the eval file, so the split is deterministic.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from qfine.util.errors import QfineError
from qfine.util.files import atomic_write_text


def chitchat_json() -> Path:
    """Path of the dataset.json shipped in the chitchat-dataset package."""
    spec = importlib.util.find_spec("chitchat_dataset")
    if spec is None or not spec.submodule_search_locations:
        raise QfineError("the chitchat example needs the package chitchat-dataset: pip install chitchat-dataset")
    return Path(list(spec.submodule_search_locations)[0]) / "dataset.json"


def conversation_to_messages(conv: dict, max_turns: int | None = None) -> list[dict]:
    """One chitchat conversation → alternating user/assistant messages (utterances joined by newlines)."""
    msgs: list[dict] = []
    first = None
    for turn in conv["messages"]:
        texts = [u["text"].strip() for u in turn if u.get("text", "").strip()]
        if not texts:
            continue  # a turn of empty messages says nothing
        first = first or turn[0]["sender"]
        role = "user" if turn[0]["sender"] == first else "assistant"
        if msgs and msgs[-1]["role"] == role:  # an empty turn between two of one sender's: join them
            msgs[-1]["content"] += "\n" + "\n".join(texts)
        else:
            msgs.append({"role": role, "content": "\n".join(texts)})
    return msgs[:max_turns] if max_turns else msgs


def convert(out_dir: str | Path, limit: int | None = None, eval_every: int = 10, max_turns: int | None = 8) -> tuple[int, int]:
    """Write ``train.jsonl`` and ``eval.jsonl`` under ``out_dir``; returns (train rows, eval rows)."""
    data = json.loads(chitchat_json().read_text(encoding="utf-8"))
    train, evals = [], []
    for i, conv in enumerate(data.values()):
        if limit is not None and len(train) + len(evals) >= limit:
            break
        msgs = conversation_to_messages(conv, max_turns)
        if not any(m["role"] == "assistant" and m["content"].strip() for m in msgs):
            continue
        (evals if i % eval_every == eval_every - 1 else train).append(json.dumps({"messages": msgs}))
    out = Path(out_dir)
    atomic_write_text(out / "train.jsonl", "\n".join(train) + "\n")
    atomic_write_text(out / "eval.jsonl", "\n".join(evals) + "\n")
    return len(train), len(evals)
