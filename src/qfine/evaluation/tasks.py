"""``qfine eval`` for seq-cls and seq2seq runs and for preference pairs: the same three rows as for chat
models — the base (adapter and trained head switched off), base + adapter, and the exact merge — from
one load.

seq-cls scores accuracy and macro-F1 (0–100) and gives the confusion matrix of base + adapter;
seq2seq generates with the run's generation settings and scores ROUGE-L / BLEU / chrF; pairs
(prompt, chosen, rejected) score the preference accuracy (the share of pairs whose chosen reply the
model gives a higher log-probability than the rejected one, %) and the mean margin of the two (nats);
a GRPO run's prompts score the mean of each of its rewards, and their weighted sum, over greedy replies.
"""

from __future__ import annotations

import time

import torch

from qfine.data.rows import RowStats, read_fields
from qfine.evaluation.metrics import GENERATION_METRICS, score_generations
from qfine.evaluation.run import three_rows
from qfine.models.loading import Loaded
from qfine.objectives import pref_data
from qfine.objectives.classify import dataset_scores, encoded
from qfine.objectives.preference import sequence_logps
from qfine.objectives.seq2seq import generate
from qfine.util.errors import QfineError


def compare_classifier(loaded: Loaded, spec, data, metrics: list[str], limit: int | None = None):
    """``(rows, number of examples, confusion of base + adapter)`` on the labelled rows of ``spec`` (a
    classifier is always scored on accuracy and macro-F1: ``metrics`` is not read)."""

    rows, _ = encoded(spec, loaded.tokenizer, data, loaded.labels)
    rows = rows[:limit] if limit else rows
    n = len(loaded.labels)

    def score():
        t0 = time.perf_counter()
        got = dataset_scores(loaded.model, loaded.tokenizer, rows, n)
        return {"accuracy": got["accuracy"], "macro_f1": got["macro_f1"], "seconds": time.perf_counter() - t0,
                "_confusion": got["confusion"]}

    table = three_rows(loaded.model, score)
    adapter_confusion = table["base+adapter"]["_confusion"]
    for r in table.values():
        r.pop("_confusion")
    return table, len(rows), adapter_confusion


def compare_seq2seq(loaded: Loaded, spec, data, metrics: list[str], limit: int | None = None):
    """``(rows, number of examples, None)``: generation metrics of base / base + adapter / merged."""

    unknown = [m for m in metrics if m not in GENERATION_METRICS]
    if unknown:
        raise QfineError(f"seq2seq runs are scored on generations: {', '.join(GENERATION_METRICS)} "
                         f"(not {', '.join(unknown)})")
    pairs = [v for _, v in read_fields(spec, data, ("source", "target"), RowStats())]
    pairs = pairs[:limit] if limit else pairs
    sources, targets = [s for s, _ in pairs], [t for _, t in pairs]

    def score():
        t0 = time.perf_counter()
        outputs = generate(loaded.model, loaded.tokenizer, sources, loaded.generation, data.max_seq_len)
        return {**score_generations(outputs, targets, metrics), "seconds": time.perf_counter() - t0}

    return three_rows(loaded.model, score), len(pairs), None


@torch.no_grad()
def pair_margins(model, tokenizer, rows: list[dict], batch_size: int = 8) -> list[float]:
    """log p(chosen) − log p(rejected) (nats, summed over each reply's tokens) per encoded pair."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    collate, device = pref_data.PairCollator(pad), next(model.parameters()).device
    out: list[float] = []
    for i in range(0, len(rows), batch_size):
        batch = {k: v.to(device) for k, v in collate(rows[i: i + batch_size]).items()}
        logp, _ = sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
        half = logp.shape[0] // 2
        out += (logp[:half] - logp[half:]).tolist()
    return out


def compare_preference(loaded: Loaded, spec, data, metrics: list[str], limit: int | None = None):
    """``(rows, number of pairs, None)``: preference accuracy (%) and mean margin (nats) of base / base +
    adapter / merged on the pairs of ``spec``."""
    rows, _ = pref_data.encoded_pairs(spec, loaded.tokenizer, data)
    rows = rows[:limit] if limit else rows

    def score():
        t0 = time.perf_counter()
        margins = pair_margins(loaded.model, loaded.tokenizer, rows)
        return {"pref_accuracy": 100.0 * sum(m > 0 for m in margins) / len(margins),
                "margin": sum(margins) / len(margins), "seconds": time.perf_counter() - t0}

    return three_rows(loaded.model, score), len(rows), None


def compare_rewards(loaded: Loaded, spec, data, rewards: list, max_new: int, limit: int | None = None):
    """``(rows, number of prompts, None)``: each reward's mean (``rewards/NAME``) and the weighted sum
    (``reward``) over greedy replies of up to ``max_new`` tokens to the prompt rows of ``spec``, for
    base / base + adapter / merged. ``rewards``: :class:`qfine.objectives.rewards.Reward` entries."""
    from qfine.data.pipeline import DatasetStats
    from qfine.objectives.grpo import prompt_rows

    rows = prompt_rows(spec, loaded.tokenizer, data, DatasetStats())
    rows = rows[:limit] if limit else rows
    if not rows:
        raise QfineError(f"{spec}: no usable prompt rows")
    prompts = [r["prompt"] for r in rows]
    columns = {k: [r[k] for r in rows] for k in rows[0] if k not in ("prompt", "prompt_ids")}

    def score():
        t0 = time.perf_counter()
        from qfine.generation.generate import greedy_replies

        replies = greedy_replies(loaded.model, loaded.tokenizer, [r["prompt_ids"] for r in rows], max_new)
        completions = [[{"role": "assistant", "content": t}] for t in replies]
        got, total = {}, [0.0] * len(rows)
        for r in rewards:
            values = r.fn(prompts, completions, **columns)
            scored = [v for v in values if v is not None]
            got[f"rewards/{r.name}"] = sum(scored) / len(scored) if scored else float("nan")
            total = [t + r.weight * (v or 0.0) for t, v in zip(total, values)]
        return {"reward": sum(total) / len(total), **got, "seconds": time.perf_counter() - t0}

    return three_rows(loaded.model, score), len(rows), None


# the comparison of each objective whose runs are not scored as chat models (qfine.evaluation.run), and
# of preference pairs (any causal-LM run)
COMPARE = {"classify": compare_classifier, "seq2seq": compare_seq2seq, "preference": compare_preference}
