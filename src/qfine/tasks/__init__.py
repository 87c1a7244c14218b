"""What differs per task — model class, peft task type, data, trainer, metrics — behind one table.

``causal-lm`` (the default) is the chat/instruction path of :mod:`qfine.data` and TRL's SFTTrainer;
``seq-cls`` (:mod:`.classify`) puts a classification head on the base; ``seq2seq`` (:mod:`.seq2seq`)
trains encoder-decoder models. Everything else — config, run directory, resume, report, merge —
is shared.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import QfineError


@dataclass(frozen=True)
class TaskSpec:
    """Per-task facts. ``auto_class``: the transformers Auto class that loads the model;
    ``peft_type``: peft's ``TaskType`` name; ``heads``: modules trained in full and kept out of
    quantization (a classification head starts random and is small)."""

    name: str
    auto_class: str
    peft_type: str
    heads: tuple[str, ...] = ()


TASKS = {
    "causal-lm": TaskSpec("causal-lm", "AutoModelForCausalLM", "CAUSAL_LM"),
    "seq-cls": TaskSpec("seq-cls", "AutoModelForSequenceClassification", "SEQ_CLS", ("score", "classifier")),
    "seq2seq": TaskSpec("seq2seq", "AutoModelForSeq2SeqLM", "SEQ_2_SEQ_LM"),
}


def task_spec(name: str) -> TaskSpec:
    """The :class:`TaskSpec` of ``name``; an unknown name is a QfineError listing the known ones."""
    if name not in TASKS:
        raise QfineError(f"model.task must be one of {', '.join(TASKS)}, not {name!r}")
    return TASKS[name]


def auto_class(name: str):
    """The transformers Auto class of task ``name``."""
    import transformers

    return getattr(transformers, task_spec(name).auto_class)
