"""What a model's task asks of loading: its transformers Auto class, peft's task type, the modules kept
out of quantization and trained in full (a classifier's head), and a classifier's label names.

``causal-lm`` (chat/instruction replies), ``seq-cls`` (a label per text: a classification head on the
base) and ``seq2seq`` (encoder-decoder models mapping a source to a target).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import transformers

from qfine.util.errors import QfineError
from qfine.util.files import atomic_write_text

LABELS_FILE = "labels.json"  # in a seq-cls run directory: the class names in label-id order


@dataclass(frozen=True)
class Head:
    """``auto_class``: the transformers Auto class that loads the model; ``peft_type``: peft's
    ``TaskType`` name; ``heads``: modules trained in full and kept out of quantization (a classification
    head starts random and is small); ``labelled``: the model has one output per class label;
    ``chat``: its inputs are chat turns rendered with a chat template (``qfine chat`` serves it)."""

    name: str
    auto_class: str
    peft_type: str
    heads: tuple[str, ...] = ()
    labelled: bool = False
    chat: bool = False


HEADS = {
    "causal-lm": Head("causal-lm", "AutoModelForCausalLM", "CAUSAL_LM", chat=True),
    "seq-cls": Head("seq-cls", "AutoModelForSequenceClassification", "SEQ_CLS", ("score", "classifier"), True),
    "seq2seq": Head("seq2seq", "AutoModelForSeq2SeqLM", "SEQ_2_SEQ_LM"),
}


def head_of(name: str) -> Head:
    """The :class:`Head` of ``model.task``; an unknown name is a QfineError listing the known ones."""
    if name not in HEADS:
        raise QfineError(f"model.task must be one of {', '.join(HEADS)}, not {name!r}")
    return HEADS[name]


def auto_class(name: str):
    """The transformers Auto class of task ``name``."""
    return getattr(transformers, head_of(name).auto_class)


def save_labels(run_dir: Path, labels: list[str]) -> None:
    atomic_write_text(run_dir / LABELS_FILE, json.dumps(labels) + "\n")


def read_labels(run_dir: Path) -> list[str]:
    """A seq-cls run's class names in label-id order."""
    path = Path(run_dir) / LABELS_FILE
    if not path.is_file():
        raise QfineError(f"{run_dir} is a seq-cls run without its label set ({LABELS_FILE} missing)")
    return json.loads(path.read_text(encoding="utf-8"))
