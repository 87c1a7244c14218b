"""The report's sample answers: a few held-out inputs answered before and after training.

causal-lm: greedy replies to prompts; seq-cls: the predicted label with its probability; seq2seq:
the generated target (with the run's generation settings).
"""

from __future__ import annotations

from .. import config as C
from ..errors import QfineError


class Samples:
    """Up to ``train.report_samples`` inputs from the eval data (else the training data), and how
    the model as it is now answers them (:meth:`answers`)."""

    def __init__(self, cfg: C.RunConfig, labels: list[str] | None = None):
        self.cfg, self.labels = cfg, labels
        source = cfg.data.eval_path or cfg.data.path
        self.note = (f"held-out inputs from {cfg.data.eval_path}" if cfg.data.eval_path else
                     f"no separate eval file: inputs from the training data {cfg.data.path}")
        n = cfg.train.report_samples
        self.inputs: list = []
        if n > 0:
            self.inputs = (self._prompts(source, n) if cfg.model.task == "causal-lm" else
                           self._texts(source, n, "text" if cfg.model.task == "seq-cls" else "source"))

    def _prompts(self, source, n: int) -> list:
        from ..data.pipeline import prompt_and_reply, row_messages
        from ..data.readers import BadRow, read_rows

        out = []
        for where, row in read_rows(source, self.cfg.data.split):
            if len(out) >= n:
                break
            if isinstance(row, BadRow):
                continue
            try:
                msgs = row_messages(row, self.cfg.data, where)
            except QfineError:
                continue
            if msgs[0]["role"] != "text":
                out.append(prompt_and_reply(msgs)[0])
        return out

    def _texts(self, source, n: int, field: str) -> list[str]:
        from dataclasses import replace

        from ..tasks.rows import RowStats, read_fields

        lenient = replace(self.cfg.data, on_bad_rows="skip")
        out = []
        for _, (text,) in read_fields(source, lenient, (field,), RowStats()):
            if len(out) >= n:
                break
            out.append(text)
        return out

    def shown(self) -> list[str]:
        """The inputs as the report prints them."""
        return [p[-1]["content"] if isinstance(p, list) else p for p in self.inputs]

    def answers(self, model, tokenizer, device) -> list[str]:
        """How ``model`` (in eval mode for the call) answers each input."""
        if not self.inputs:
            return []
        was_training = model.training
        model.eval()
        try:
            task = self.cfg.model.task
            if task == "seq-cls":
                from ..tasks.classify import predict

                return [f"{p['label']} ({p['probabilities'][p['label']]:.2f})"
                        for p in predict(model, tokenizer, self.inputs, self.labels, self.cfg.data.max_seq_len)]
            if task == "seq2seq":
                from ..tasks.seq2seq import generate

                return generate(model, tokenizer, self.inputs, self.cfg.generation, self.cfg.data.max_seq_len)
            from ..inference import generate as reply
            from ..loading import Loaded

            loaded = Loaded(model, tokenizer, "", device, None)
            return [reply(loaded, p, max_new_tokens=min(48, self.cfg.generation.max_new_tokens)) for p in self.inputs]
        finally:
            model.train(was_training)
