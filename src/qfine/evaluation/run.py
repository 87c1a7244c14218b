"""Evaluate models on a data file: perplexity over loss-bearing tokens and generation metrics.

For a run directory one loaded model serves three rows of the comparison — the base (adapter
disabled), base + adapter, and the exact merge (each adapted layer swapped for its merged 16-bit
copy, see :func:`qfine.methods.lora.merge_adapter`) — so the comparison costs one model load.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from qfine.config import DataConfig
from qfine.data.formats import Messages
from qfine.data.pipeline import IGNORE, Encoded, encode_messages, prompt_and_reply, row_messages, set_template
from qfine.data.readers import BadRow, read_rows
from qfine.evaluation.metrics import GENERATION_METRICS, score_generations
from qfine.generation.generate import generate
from qfine.methods.lora import merged
from qfine.models.loading import Loaded
from qfine.util.errors import QfineError


@dataclass
class EvalExample:
    """One row: the prompt (messages before the last assistant turn), its reference reply, and the
    whole conversation tokenized with its loss mask (for perplexity)."""

    prompt: Messages
    reference: str
    encoded: Encoded


def load_examples(spec, tokenizer, cfg: DataConfig, limit: int | None = None) -> list[EvalExample]:
    """Read up to ``limit`` evaluation rows of ``spec`` (bad rows follow ``cfg.on_bad_rows``)."""
    set_template(tokenizer, cfg.template)
    out: list[EvalExample] = []
    for where, row in read_rows(spec, cfg.split):
        if limit is not None and len(out) >= limit:
            break
        try:
            if isinstance(row, BadRow):
                raise QfineError(f"{where}: {row.message}")
            msgs = row_messages(row, cfg, where)
            if msgs[0]["role"] == "text":
                raise QfineError(f"{where}: plain text rows have no reply to compare; use them for perplexity only")
            prompt, reply = prompt_and_reply(msgs)
            enc = encode_messages(tokenizer, msgs[: len(prompt) + 1], cfg.loss_on, where)
        except QfineError:
            if cfg.on_bad_rows == "error":
                raise
            continue
        enc = Encoded(enc.input_ids[: cfg.max_seq_len], enc.labels[: cfg.max_seq_len])
        out.append(EvalExample(prompt, reply, enc))
    if not out:
        raise QfineError(f"{spec}: no usable evaluation rows")
    return out


@torch.no_grad()
def perplexity(model, examples: list[EvalExample], batch_size: int = 4) -> dict[str, float]:
    """exp(mean NLL) over the loss-bearing tokens of ``examples``; also the mean NLL (nats) and token count."""
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    for i in range(0, len(examples), batch_size):
        batch = [e.encoded for e in examples[i: i + batch_size]]
        width = max(len(e.input_ids) for e in batch)
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        for j, e in enumerate(batch):
            n = len(e.input_ids)
            ids[j, :n], labels[j, :n], mask[j, :n] = torch.tensor(e.input_ids), torch.tensor(e.labels), 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
        target = labels[:, 1:].to(device)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), target, ignore_index=IGNORE,
                                                 reduction="sum")
        nll += float(loss)
        count += int((target != IGNORE).sum())
    if count == 0:
        raise QfineError("no loss-bearing tokens to compute perplexity on")
    mean = nll / count
    return {"perplexity": math.exp(mean), "nll": mean, "tokens": count}


def evaluate_model(loaded: Loaded, examples: list[EvalExample], metrics: list[str], max_new_tokens: int = 64,
                   batch_size: int = 4) -> tuple[dict[str, float], list[str]]:
    """``(scores, predictions)`` of the model as it is now (adapters as currently enabled/merged)."""
    scores: dict[str, float] = {}
    t0 = time.perf_counter()
    if "perplexity" in metrics:
        scores.update(perplexity(loaded.model, examples, batch_size))
    predictions: list[str] = []
    if any(m in GENERATION_METRICS for m in metrics):
        predictions = [generate(loaded, e.prompt, max_new_tokens=max_new_tokens) for e in examples]
        scores.update(score_generations(predictions, [e.reference for e in examples], metrics))
    scores["seconds"] = time.perf_counter() - t0
    return scores, predictions


def compare_run(loaded: Loaded, examples: list[EvalExample], metrics: list[str], max_new_tokens: int = 64,
                batch_size: int = 4) -> dict[str, dict[str, float]]:
    """Scores of base, base + adapter, and the exact merge, for a PeftModel loaded from a run."""
    return three_rows(loaded.model, lambda: evaluate_model(loaded, examples, metrics, max_new_tokens, batch_size)[0])


def three_rows(model, score) -> dict[str, dict]:
    """``score()`` of a run's model with the adapter off ("base"), on ("base+adapter"), and merged
    exactly ("merged"): one model load serves the three."""
    rows = {}
    with model.disable_adapter():
        rows["base"] = score()
    rows["base+adapter"] = score()
    with merged(model):
        rows["merged"] = score()
    return rows


def format_table(rows: dict[str, dict[str, float]], first_col: str = "model") -> str:
    """A plain-text table: one row per entry, one column per score."""
    cols = [c for c in dict.fromkeys(k for r in rows.values() for k in r) if c not in ("seconds",)] + ["seconds"]
    width = max(len(first_col), *(len(k) for k in rows))
    head = f"{first_col:<{width}}  " + "  ".join(f"{c:>11}" for c in cols)
    lines = [head, "-" * len(head)]
    for name, r in rows.items():
        cells = []
        for c in cols:
            v = r.get(c)
            cells.append(f"{'':>11}" if v is None else f"{v:>11,.0f}" if c == "tokens" else f"{v:>11.4g}")
        lines.append(f"{name:<{width}}  " + "  ".join(cells))
    return "\n".join(lines)
