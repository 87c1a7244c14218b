"""Trainer callbacks: metrics.jsonl with tokens/s."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from transformers import TrainerCallback


class MetricsJsonl(TrainerCallback):
    """Append one JSON line per log event to ``path``: step, loss, lr, grad_norm, tokens_per_s, ...

    tokens/s counts the non-padding input tokens seen (``state.num_input_tokens_seen``) between
    two log events over the wall time between them.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._last = (None, 0)  # (time, tokens) at the previous log

    def on_train_begin(self, args, state, control, **kwargs):
        self._last = (time.perf_counter(), state.num_input_tokens_seen)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs:
            return
        now, tokens = time.perf_counter(), state.num_input_tokens_seen
        then, seen = self._last
        row = {"step": state.global_step, "epoch": state.epoch}
        rename = {"learning_rate": "lr"}
        for k, v in logs.items():
            if isinstance(v, (int, float)) and not k.startswith("total_flos"):
                row[rename.get(k, k)] = v if (not isinstance(v, float) or math.isfinite(v)) else str(v)
        if "loss" in logs and then is not None and now > then:
            row["tokens_per_s"] = round((tokens - seen) / (now - then), 1)
            self._last = (now, tokens)
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")


def read_losses(path: str | Path) -> list[float]:
    """The training losses logged in a metrics.jsonl, in step order."""
    rows = [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    return [r["loss"] for r in rows if isinstance(r.get("loss"), (int, float))]
