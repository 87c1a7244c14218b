"""Reinforcement learning from verifiable rewards (``train.objective: grpo``) on the quantized base.

Each step samples ``train.group_size`` completions for each of ``train.batch_size`` prompts, scores
them with ``train.rewards`` (:mod:`.rewards`), and moves the policy toward the completions that beat
their group's mean, with the ratio clipped (``train.clip_epsilon``) and, when ``train.beta`` > 0, a KL
term to the reference: the same base with the adapter off. TRL's GRPOTrainer runs the loop (rollouts,
advantages, the loss normalisations ``train.grpo_loss``); qfine brings the rows, the rewards and their
checks, and the run around it (run directory, resume, report, merge, export).

Rows: ``{"prompt": "..."}`` or ``{"prompt": [messages]}`` (or ``{"messages": [...]}``, a final assistant
turn dropped), with any other columns (``answer`` …) handed to the reward functions.
"""

from __future__ import annotations

import random

from datasets import Dataset

from qfine.config import DataConfig, RunConfig
from qfine.data.pipeline import DatasetStats
from qfine.data.readers import BadRow, read_rows
from qfine.objectives import rewards
from qfine.objectives.base import Supports
from qfine.objectives.common import first_usable, keeping_adapter_dtypes
from qfine.objectives.sft import SFT
from qfine.util.errors import QfineError


def read_prompt(row, data: DataConfig, where: str) -> tuple[list[dict], dict]:
    """``(prompt messages, other columns)`` of one prompt row; QfineError naming ``where`` if unusable."""
    if not isinstance(row, dict):
        raise QfineError(f"{where}: a prompt row is a JSON object")
    key = data.columns.get("prompt", "prompt")
    if key in row:
        prompt = row[key]
        if isinstance(prompt, str):
            messages = [{"role": "user", "content": prompt}]
        elif isinstance(prompt, list) and prompt and all(isinstance(m, dict) and "role" in m for m in prompt):
            messages = [{"role": m["role"], "content": m.get("content", "")} for m in prompt]
        else:
            raise QfineError(f"{where}: field {key!r} must be text or a list of messages")
    elif isinstance(row.get("messages"), list) and row["messages"]:
        messages = [{"role": m.get("role"), "content": m.get("content", "")} for m in row["messages"]]
        if messages[-1]["role"] == "assistant":
            messages = messages[:-1]
    else:
        raise QfineError(f"{where}: no prompt (a {key!r} field, or 'messages')")
    if not messages or messages[-1]["role"] != "user" or not str(messages[-1]["content"]).strip():
        raise QfineError(f"{where}: the prompt must end with a non-empty user turn")
    if data.system_prompt and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": data.system_prompt}, *messages]
    extra = {k: v for k, v in row.items() if k not in (key, "messages")}
    return messages, extra


def _rows(path: str, tokenizer, data: DataConfig, stats: DatasetStats) -> list[dict]:
    out = []
    for where, row in read_rows(path, data.split):
        try:
            if isinstance(row, BadRow):
                raise QfineError(f"{where}: {row.reason}")
            messages, extra = read_prompt(row, data, where)
            ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                return_dict=False)
            if len(ids) > data.max_seq_len:
                raise QfineError(f"{where}: the prompt is {len(ids)} tokens, over data.max_seq_len "
                                 f"{data.max_seq_len}")
        except QfineError as e:
            if data.on_bad_rows == "error":
                raise
            stats.skipped += 1
            stats.first_skip = stats.first_skip or str(e)
            continue
        out.append({"prompt": messages, "prompt_ids": list(ids), **extra})
        stats.tokens += len(ids)
        stats.lengths.append(len(ids))
    keys = sorted({k for r in out for k in r})
    return [{k: r.get(k) for k in keys} for r in out]  # every row with every column (None where absent)


def datasets(tokenizer, cfg: RunConfig):
    """``(train, eval or None, stats)`` of prompt rows: ``prompt`` (messages), ``prompt_ids`` and the
    rows' other columns."""
    data = cfg.data
    if not data.path:
        raise QfineError("data.path: a file of prompts is needed (--data FILE)")
    stats = DatasetStats()
    train = _rows(data.path, tokenizer, data, stats)
    if not train:
        raise QfineError(f"{data.path}: no usable prompt rows")
    held = []
    if data.eval_path:
        held = _rows(data.eval_path, tokenizer, data, DatasetStats())
    elif data.eval_ratio > 0:
        order = list(range(len(train)))
        random.Random(cfg.train.seed).shuffle(order)
        cut = max(1, int(len(train) * data.eval_ratio))
        held = [train[i] for i in sorted(order[:cut])]
        train = [train[i] for i in sorted(order[cut:])]
    stats.rows = len(train)
    return Dataset.from_list(train), (Dataset.from_list(held) if held else None), stats


class GRPO(SFT):
    name = "grpo"
    supports = Supports(gguf=True, requantize=True, perplexity=False)
    metric = "eval_reward"
    greater_is_better = True

    def datasets(self, tokenizer, cfg: RunConfig, labels):
        return datasets(tokenizer, cfg)

    def trainer(self, model, tokenizer, train_ds, eval_ds, cfg: RunConfig, arguments, callbacks):
        from trl import GRPOConfig, GRPOTrainer

        if cfg.data.task_column:
            raise QfineError("train.objective grpo trains one adapter; data.task_column is for sft")
        t = cfg.train
        if t.group_size < 2:
            raise QfineError("train.group_size must be at least 2: a completion is scored against its group")
        chosen = rewards.parse(t.rewards)
        completions = t.batch_size * t.group_size  # TRL's batch counts completions, qfine's counts prompts
        args = arguments(GRPOConfig, per_device_train_batch_size=completions, per_device_eval_batch_size=completions,
                         num_generations=t.group_size, max_completion_length=t.max_completion_len,
                         temperature=t.rollout_temperature, top_p=t.rollout_top_p, beta=t.beta,
                         epsilon=t.clip_epsilon, loss_type=t.grpo_loss, scale_rewards=t.scale_rewards,
                         reward_weights=[r.weight for r in chosen], remove_unused_columns=False)
        return keeping_adapter_dtypes(model, lambda: GRPOTrainer(
            model=model, reward_funcs=[r.fn for r in chosen], args=args, train_dataset=train_ds,
            eval_dataset=eval_ds, processing_class=tokenizer, callbacks=callbacks))

    def sample_inputs(self, cfg: RunConfig, source: str, n: int) -> list:
        """The prompts of the first ``n`` usable rows."""
        return first_usable(source, cfg.data.split, lambda row, where: read_prompt(row, cfg.data, where)[0], n)
