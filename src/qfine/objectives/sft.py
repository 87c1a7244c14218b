"""Supervised fine-tuning of a causal LM (``model.task: causal-lm``): chat and instruction replies.

Rows are read, templated and masked by :mod:`qfine.data` (the loss on the assistant replies by
default); TRL's SFTTrainer trains, through :class:`~qfine.objectives.graphed_trainer.QfineSFTTrainer`,
whose step can replay as a CUDA graph on the fast path. A multi-task run (``data.task_column``) trains
single-task batches with shared + task adapters (:mod:`qfine.objectives.multitask`).
"""

from __future__ import annotations

from trl import SFTConfig

from qfine.config import RunConfig
from qfine.data import build_datasets
from qfine.data.pipeline import prompt_and_reply, row_messages
from qfine.data.readers import BadRow, read_rows
from qfine.generation.generate import generate
from qfine.models.loading import Loaded
from qfine.objectives.base import Objective, Supports
from qfine.objectives.common import keeping_adapter_dtypes
from qfine.objectives.graphed_trainer import QfineSFTTrainer
from qfine.objectives.multitask import trainer_class
from qfine.util.errors import QfineError


class SFT(Objective):
    name = "sft"
    task = "causal-lm"
    supports = Supports(fast_path=True, adaptive=True, multitask=True, gguf=True, requantize=True, s2_attn=True)

    def datasets(self, tokenizer, cfg: RunConfig, labels):
        return build_datasets(tokenizer, cfg.data, cfg.train.seed)

    def trainer(self, model, tokenizer, train_ds, eval_ds, cfg: RunConfig, arguments, callbacks):
        args = arguments(SFTConfig,
                         max_length=cfg.data.max_seq_len,
                         # Packing puts several examples in one row with restarting position_ids (TRL's best-fit
                         # decreasing); attention is then confined to each example (padding-free batches).
                         packing=cfg.data.packing,
                         packing_strategy="bfd",
                         shuffle_dataset=not cfg.data.streaming,
                         dataset_num_proc=None,
                         remove_unused_columns=True)
        trainer_cls = trainer_class(QfineSFTTrainer) if cfg.data.task_column else QfineSFTTrainer
        trainer = keeping_adapter_dtypes(model, lambda: trainer_cls(
            model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds, processing_class=tokenizer,
            callbacks=callbacks))
        return trainer

    def sample_inputs(self, cfg: RunConfig, source: str, n: int) -> list:
        """The prompts (every turn before the last reply) of the first ``n`` usable chat rows."""
        out = []
        for where, row in read_rows(source, cfg.data.split):
            if len(out) >= n:
                break
            if isinstance(row, BadRow):
                continue
            try:
                msgs = row_messages(row, cfg.data, where)
            except QfineError:
                continue
            if msgs[0]["role"] != "text":
                out.append(prompt_and_reply(msgs)[0])
        return out

    def shown(self, inputs: list) -> list[str]:
        return [p[-1]["content"] for p in inputs]

    def answer(self, model, tokenizer, inputs: list, cfg: RunConfig, labels) -> list[str]:
        loaded = Loaded(model, tokenizer, "", str(next(model.parameters()).device), None)
        return [generate(loaded, p, max_new_tokens=min(48, cfg.generation.max_new_tokens)) for p in inputs]

    def predict(self, loaded, texts: list[str], gen) -> list[dict]:
        return [{"output": generate(loaded, t, max_new_tokens=gen.max_new_tokens)} for t in texts]
