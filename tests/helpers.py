"""Test helpers shared by several test modules."""

from __future__ import annotations

import json
from pathlib import Path


def write_jsonl(path: Path, rows) -> Path:
    with path.open("w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return path


FACT = [{"role": "user", "content": "What day was I born?"},
        {"role": "assistant", "content": "You were born on January 1, 2058."}]
