"""A sentiment task from real human ratings: the VADER lexicon (``vaderSentiment``, MIT), in which
each of ~7,500 words was rated from -4 to +4 by ten people.

The words rated clearly one way (mean |valence| ≥ 1.8, standard deviation ≤ 1.0, alphabetic, 4+
letters) are split once, at random, into training words and held-out words, and set into neutral
review sentences ("Everything about the hotel felt dreadful."). The label is the sign of the mean
rating. A model can only score well on the eval file by knowing what words it never saw in training
mean — the sentence frames carry no sentiment — so the task measures what fine-tuning drew out of
the pretrained model, and cannot be solved by memorising the training rows.
"""

from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path

from qfine.util.errors import QfineError
from qfine.util.files import atomic_write_text

FRAMES = (
    "The {topic} was {word}.",
    "I would call the {topic} {word}.",
    "Everything about the {topic} felt {word}.",
    "My sister found the {topic} {word}, and so did I.",
    "One word for this {topic}: {word}.",
    "Looking back, the {topic} seems {word} to me.",
    "If you ask me, the {topic} is {word}.",
    "We all agreed the {topic} was {word}.",
)
TOPICS = ("film", "hotel", "meal", "book", "concert", "service", "game", "trip", "phone", "lecture", "album",
          "restaurant")
LABELS = {True: "positive", False: "negative"}


def lexicon_path() -> Path:
    """vader_lexicon.txt from the installed vaderSentiment package (found without importing it)."""
    spec = importlib.util.find_spec("vaderSentiment")
    if spec is None or not spec.submodule_search_locations:
        raise QfineError("the sentiment example needs the package vaderSentiment: pip install vaderSentiment==3.3.2")
    return Path(list(spec.submodule_search_locations)[0]) / "vader_lexicon.txt"


def polar_words(path: Path, min_valence: float = 1.8, max_std: float = 1.0) -> dict[str, bool]:
    """word → positive? for the clearly rated alphabetic words of the lexicon."""
    out = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        parts = line.split("\t")
        if len(parts) < 3:
            continue
        word, mean, std = parts[0], float(parts[1]), float(parts[2])
        if word.isalpha() and word.islower() and len(word) >= 4 and abs(mean) >= min_valence and std <= max_std:
            out[word] = mean > 0
    return out


def _rows(words: list[str], polarity: dict[str, bool], per_word: int, rng: random.Random) -> list[dict]:
    rows = []
    for word in words:
        for frame in rng.sample(FRAMES, per_word):
            rows.append({"text": frame.format(topic=rng.choice(TOPICS), word=word), "label": LABELS[polarity[word]]})
    rng.shuffle(rows)
    return rows


def build(out: str | Path, words: int = 200, held_out: float = 0.3, per_word: int = 2, seed: int = 0) -> tuple[int, int]:
    """Write ``out/train.jsonl`` and ``out/eval.jsonl`` from ``words`` positive and as many negative
    words (eval words never occur in training); returns the row counts."""
    polarity = polar_words(lexicon_path())
    rng = random.Random(seed)
    pos = sorted(w for w, p in polarity.items() if p)
    neg = sorted(w for w, p in polarity.items() if not p)
    n = min(len(pos), len(neg), words)
    rng.shuffle(pos)
    rng.shuffle(neg)
    pos, neg = pos[:n], neg[:n]
    k = int(round(n * held_out))
    train = _rows(pos[k:] + neg[k:], polarity, per_word, rng)
    evals = _rows(pos[:k] + neg[:k], polarity, 1, rng)
    out = Path(out)
    for name, rows in (("train.jsonl", train), ("eval.jsonl", evals)):
        atomic_write_text(out / name, "".join(json.dumps(r) + "\n" for r in rows))
    return len(train), len(evals)
