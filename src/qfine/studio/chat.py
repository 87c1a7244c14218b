"""Chat in the studio: the models it answers with, loaded on first use and kept (two at a time).

A target is a run folder's base + adapter (``adapter``), the base alone as the run trained on it
(``base``), or something exported from it (``exports/NAME``: a merged folder or a GGUF), so a reply
can be compared across every form a run takes. Loading and generating go through the same functions
as ``qfine generate`` and ``qfine chat``; torch is imported on the first chat, not at start.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path
from typing import Iterator

import yaml

from qfine import config as C
from qfine.studio.paths import Refused, inside
from qfine.util.errors import QfineError

KEEP = 2  # models held at once: base vs run, or two runs, side by side


class Models:
    """Loaded models by target, least recently used dropped first; one generation at a time each."""

    def __init__(self, runs_root: Path):
        self.root = runs_root
        self._models: OrderedDict[tuple, tuple] = OrderedDict()
        self._lock = threading.Lock()
        # one load at a time: loading builds the model under process-wide contexts (meta-device
        # initialisation) that two threads would overlap
        self._loading = threading.Lock()

    def _load(self, run: str, what: str):
        from qfine.generation.load import load_for_inference

        run_dir = self.root / run
        if what == "adapter":
            if not (run_dir / "adapter").is_dir():
                raise QfineError(f"{run} has no adapter yet (it is written when training finishes)")
            return load_for_inference(str(run_dir))
        if what == "base":
            cfg = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8")) or {}
            model = cfg.get("model") or {}
            return load_for_inference(str(model.get("source", "default")),
                                      C.ModelConfig(quantization=model.get("quantization", "nf4")))
        if what.startswith("exports/"):
            return load_for_inference(str(inside(run_dir, what)))
        raise Refused(f"unknown chat target {what!r}: adapter, base or exports/NAME")

    def get(self, run: str, what: str):
        """``(loaded, lock)`` for the target, loading it (and dropping the oldest) if needed."""
        key = (run, what)
        with self._lock:
            if key in self._models:
                self._models.move_to_end(key)
                return self._models[key]
        with self._loading:
            with self._lock:
                if key in self._models:  # loaded by the thread we waited for
                    return self._models[key]
            loaded = self._load(run, what)
        with self._lock:
            entry = self._models.setdefault(key, (loaded, threading.Lock()))
            self._models.move_to_end(key)
            while len(self._models) > KEEP:
                self._models.popitem(last=False)
            return entry


def reply(models: Models, run: str, what: str, messages: list[dict], max_new_tokens: int,
          temperature: float) -> Iterator[str]:
    """The reply to ``messages`` piece by piece (greedy at temperature 0)."""
    from qfine.generation.generate import stream

    loaded, lock = models.get(run, what)
    with lock:
        yield from stream(loaded, messages, max_new_tokens, temperature, 1.0)


def check_messages(messages) -> list[dict]:
    """A conversation from the browser: a list of {role: user|assistant|system, content: str}."""
    if not isinstance(messages, list) or not messages:
        raise QfineError("messages: a non-empty list of {role, content}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("user", "assistant", "system") \
                or not isinstance(m.get("content"), str):
            raise QfineError(f"messages[{i}]: needs role (user, assistant or system) and content (text)")
        out.append({"role": m["role"], "content": m["content"]})
    return out
