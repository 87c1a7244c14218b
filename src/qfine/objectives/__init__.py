"""Training objectives behind one table: what each brings to the shared recipe.

The recipe (:mod:`qfine.training.run`) is the same for every objective — config, run directory,
resume, report, sweep, merge, export — and asks the run's :class:`Objective` for what differs:
the model head it trains (:mod:`qfine.models.heads`), how rows become a dataset, which Trainer
trains it, how held-out inputs are answered for the report, the metric that picks the best
checkpoint, and which features it supports. A new objective is one module defining a subclass and
its entry in :data:`OBJECTIVES`.

* ``sft`` (:mod:`.sft`): supervised fine-tuning of a causal LM on chat/instruction replies.
* ``classify`` (:mod:`.classify`): a label per text, on a classification head.
* ``seq2seq`` (:mod:`.seq2seq`): an encoder-decoder model maps a source text to a target text.
* ``dpo``, ``simpo``, ``orpo``, ``kto`` (:mod:`.preference`): preference training of a causal LM, the
  reference being the same quantized base with the adapter off.
* ``grpo`` (:mod:`.grpo`): reinforcement learning from the rewards of sampled completions (TRL's GRPOTrainer).
"""

from __future__ import annotations

from qfine.config import RunConfig, did_you_mean
from qfine.objectives.base import Objective, Supports
from qfine.objectives.classify import Classify
from qfine.objectives.grpo import GRPO
from qfine.objectives.preference import DPO, KTO, ORPO, SimPO
from qfine.objectives.seq2seq import Seq2Seq
from qfine.objectives.sft import SFT
from qfine.util.errors import QfineError

OBJECTIVES: dict[str, Objective] = {o.name: o for o in (SFT(), Classify(), Seq2Seq(), DPO(), SimPO(), ORPO(), KTO(),
                                                         GRPO())}
# the objective each model head trains when train.objective is auto
BY_TASK = {"causal-lm": "sft", "seq-cls": "classify", "seq2seq": "seq2seq"}


def objective_of(cfg: RunConfig) -> Objective:
    """The :class:`Objective` a run trains: ``train.objective``, or its model head's own when auto."""
    name = cfg.train.objective
    if name == "auto":
        return for_task(cfg.model.task)
    objective = OBJECTIVES.get(name)
    if objective is None:
        raise QfineError(f"train.objective must be auto or one of {', '.join(OBJECTIVES)}, not {name!r}"
                         f"{did_you_mean(name, OBJECTIVES)}")
    if objective.task != cfg.model.task:
        raise QfineError(f"train.objective {name} trains model.task {objective.task}, not {cfg.model.task}")
    return objective


def for_task(task: str) -> Objective:
    """The :class:`Objective` that trains the model head ``task`` (a loaded run's ``Loaded.task``)."""
    name = BY_TASK.get(task)
    if name is None:
        raise QfineError(f"model.task must be one of {', '.join(BY_TASK)}, not {task!r}")
    return OBJECTIVES[name]


__all__ = ["BY_TASK", "OBJECTIVES", "Objective", "Supports", "for_task", "objective_of"]
