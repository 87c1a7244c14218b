"""TRL's private symbols that qfine uses, each with why (pinned by tests/test_compat.py)."""

from __future__ import annotations

# GRPOTrainer's method that turns one batch of tokenized prompts into completion ids (and sampling
# log-probs or None), with these parameters: qfine's GRPO trainer overrides it in its subclass to generate
# with qfine's engine and keeps TRL's tokenization, chat template and everything after. TRL's public
# alternative, ``rollout_func``, is marked experimental and moves the chat templating into the caller.
GRPO_GENERATE = "_generate_single_turn"
GRPO_GENERATE_PARAMS = ("prompt_ids", "images", "multimodal_fields", "num_generations", "has_tool_images")


def log_metric(trainer, name: str, value: float) -> None:
    """Add ``value`` to what a TRL GRPO/DPO trainer averages into its next log row under ``name``
    (``trainer._metrics[mode]``, mode "train" or "eval" as the model is): TRL logs its own rollout
    metrics this way, and a metric logged through ``Trainer.log`` would be a row of its own."""
    trainer._metrics["train" if trainer.model.training else "eval"][name].append(value)
