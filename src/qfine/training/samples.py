"""The report's sample answers: a few held-out inputs answered before and after training, as the
run's objective answers them (a chat reply, a label with its probability, a generated target)."""

from __future__ import annotations

from qfine import config as C
from qfine.objectives.base import Objective


class Samples:
    """Up to ``train.report_samples`` inputs from the eval data (else the training data), and how
    the model as it is now answers them (:meth:`answers`)."""

    def __init__(self, cfg: C.RunConfig, objective: Objective, labels: list[str] | None = None):
        self.cfg, self.objective, self.labels = cfg, objective, labels
        source = cfg.data.eval_path or cfg.data.path
        self.note = (f"held-out inputs from {cfg.data.eval_path}" if cfg.data.eval_path else
                     f"no separate eval file: inputs from the training data {cfg.data.path}")
        n = cfg.train.report_samples
        self.inputs: list = objective.sample_inputs(cfg, source, n) if n > 0 else []

    def shown(self) -> list[str]:
        """The inputs as the report prints them."""
        return self.objective.shown(self.inputs)

    def first_prompt(self) -> str | None:
        """The first sample as a prompt for the summary's `qfine generate` line (chat objectives only)."""
        return self.shown()[0] if self.inputs and self.objective.sample_field == "prompt" else None

    def answers(self, model, tokenizer) -> list[str]:
        """How ``model`` (in eval mode for the call) answers each input."""
        if not self.inputs:
            return []
        was_training = model.training
        model.eval()
        try:
            return self.objective.answer(model, tokenizer, self.inputs, self.cfg, self.labels)
        finally:
            model.train(was_training)
