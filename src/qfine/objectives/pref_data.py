"""Preference rows → token ids with completion-only labels, and the collator that batches them.

Paired rows (DPO, SimPO, ORPO) hold ``prompt``, ``chosen`` and ``rejected``: each a string, or a list of
``{role, content}`` messages. ``chosen``/``rejected`` may be whole conversations that share a prompt
(HH-RLHF, UltraFeedback-binarized: the last message is the assistant's reply, everything before it the
prompt, with or without a ``prompt`` column). Unpaired rows (KTO) hold ``prompt``, ``completion`` and a
boolean ``label`` (true: desirable). Column names follow ``data.columns``. The chat template is applied
(:func:`qfine.data.pipeline.encode_messages`) and only the reply's tokens (and its EOS) are scored.
Every bad row is named by ``file:line`` and follows ``data.on_bad_rows``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qfine.config import DataConfig
from qfine.data.formats import apply_columns
from qfine.data.pipeline import IGNORE, encode_messages
from qfine.data.rows import RowStats, in_memory_datasets, no_rows, read_fields
from qfine.util.errors import QfineError

Messages = list[dict]


@dataclass
class Pair:
    prompt: Messages
    chosen: str
    rejected: str


@dataclass
class Unpaired:
    prompt: Messages
    completion: str
    desirable: bool


def _messages(value, where: str, name: str) -> Messages:
    """A field as messages: a string is one user turn; a list must hold {role, content} dicts."""
    if isinstance(value, str):
        if not value.strip():
            raise QfineError(f"{where}: {name} is empty")
        return [{"role": "user", "content": value}]
    if isinstance(value, list) and value and all(isinstance(m, dict) and {"role", "content"} <= set(m)
                                                  for m in value):
        return [{"role": m["role"], "content": m["content"]} for m in value]
    raise QfineError(f"{where}: {name} must be text or a list of {{role, content}} messages")


def _reply(value, prompt: Messages | None, where: str, name: str) -> tuple[Messages | None, str]:
    """``(the prompt the field carries or None, the reply text)`` of a chosen/rejected/completion field."""
    if isinstance(value, str):
        if not value.strip():
            raise QfineError(f"{where}: {name} is empty")
        return None, value
    msgs = _messages(value, where, name)
    if msgs[-1]["role"] != "assistant":
        raise QfineError(f"{where}: the last message of {name} must be the assistant's reply, not {msgs[-1]['role']}")
    before = msgs[:-1]
    if prompt is not None and before[:len(prompt)] == prompt:
        before = before[len(prompt):]  # the conversation repeats the prompt column
    return (before or None), msgs[-1]["content"]


def _prompt(row: dict, where: str) -> Messages | None:
    return _messages(row["prompt"], where, "prompt") if row.get("prompt") is not None else None


def read_pair(row: dict, cfg: DataConfig, where: str) -> Pair:
    """One paired row as a :class:`Pair` (see the module docstring for the shapes taken)."""
    row = apply_columns(row, cfg.columns)
    missing = [k for k in ("chosen", "rejected") if k not in row]
    if missing:
        raise QfineError(f"{where}: no {' or '.join(missing)} column; found: {', '.join(row) or '(none)'} "
                         "(a pair needs prompt, chosen and rejected; data.columns maps other names)")
    prompt = _prompt(row, where)
    extra_c, chosen = _reply(row["chosen"], prompt, where, "chosen")
    extra_r, rejected = _reply(row["rejected"], prompt, where, "rejected")
    if extra_c != extra_r:
        raise QfineError(f"{where}: the conversations of chosen and rejected have different prompts")
    full = (prompt or []) + (extra_c or [])
    if not full:
        raise QfineError(f"{where}: no prompt (a prompt column, or chosen/rejected as conversations)")
    if chosen.strip() == rejected.strip():
        raise QfineError(f"{where}: chosen and rejected are identical")
    return Pair(_with_system(full, cfg), chosen, rejected)


def read_unpaired(row: dict, cfg: DataConfig, where: str) -> Unpaired:
    """One KTO row (prompt, completion, label) as :class:`Unpaired`."""
    row = apply_columns(row, cfg.columns)
    missing = [k for k in ("prompt", "completion", "label") if k not in row]
    if missing:
        raise QfineError(f"{where}: no {', '.join(missing)} column; found: {', '.join(row) or '(none)'} "
                         "(KTO rows hold prompt, completion and a true/false label)")
    label = row["label"]
    if not isinstance(label, bool):
        raise QfineError(f"{where}: label must be true (desirable) or false, got {label!r}")
    prompt = _prompt(row, where)
    extra, completion = _reply(row["completion"], prompt, where, "completion")
    return Unpaired(_with_system((prompt or []) + (extra or []), cfg), completion, label)


def _with_system(prompt: Messages, cfg: DataConfig) -> Messages:
    if cfg.system_prompt and prompt[0]["role"] != "system":
        return [{"role": "system", "content": cfg.system_prompt}] + prompt
    return prompt


def encode_reply(tokenizer, prompt: Messages, reply: str, max_len: int, where: str) -> tuple[list[int], list[int], bool]:
    """``(input_ids, labels, truncated)`` of prompt + the assistant's ``reply``: labels only on the
    reply's tokens and EOS; the reply is cut to fit ``max_len``; a prompt that alone fills it is an error."""
    enc = encode_messages(tokenizer, prompt + [{"role": "assistant", "content": reply}], "last_turn", where)
    start = next(i for i, label in enumerate(enc.labels) if label != IGNORE)
    if start >= max_len - 1:
        raise QfineError(f"{where}: the prompt alone has {start} tokens; data.max_seq_len is {max_len}")
    cut = len(enc.input_ids) > max_len
    return enc.input_ids[:max_len], enc.labels[:max_len], cut


def encoded_pairs(spec, tokenizer, cfg: DataConfig) -> tuple[list[dict], RowStats]:
    """Every usable paired row of ``spec`` as ``{chosen_ids, chosen_labels, rejected_ids, rejected_labels}``."""
    def encode(row, where):
        pair = read_pair(row, cfg, where)
        c_ids, c_labels, c_cut = encode_reply(tokenizer, pair.prompt, pair.chosen, cfg.max_seq_len, where)
        r_ids, r_labels, r_cut = encode_reply(tokenizer, pair.prompt, pair.rejected, cfg.max_seq_len, where)
        return {"chosen_ids": c_ids, "chosen_labels": c_labels, "rejected_ids": r_ids, "rejected_labels": r_labels,
                "truncated": c_cut or r_cut}

    return _encoded(spec, cfg, encode)


def encoded_unpaired(spec, tokenizer, cfg: DataConfig) -> tuple[list[dict], RowStats]:
    """Every usable KTO row of ``spec`` as ``{ids, labels, desirable}``."""
    def encode(row, where):
        item = read_unpaired(row, cfg, where)
        ids, labels, cut = encode_reply(tokenizer, item.prompt, item.completion, cfg.max_seq_len, where)
        return {"ids": ids, "labels": labels, "desirable": item.desirable, "truncated": cut}

    return _encoded(spec, cfg, encode)


def _encoded(spec, cfg: DataConfig, encode) -> tuple[list[dict], RowStats]:
    """``encode(row, where)`` over the usable rows of ``spec``, bad ones (a reading or an encoding error)
    following ``data.on_bad_rows``."""
    stats, rows = RowStats(), []
    for _, (row,) in read_fields(spec, cfg, ("row",), stats, {"row": encode}):
        stats.truncated += row.pop("truncated")
        stats.tokens += sum(len(v) for k, v in row.items() if k.endswith("ids"))
        rows.append(row)
    if not rows:
        raise no_rows(spec, stats)
    return rows, stats


def datasets(tokenizer, cfg: DataConfig, seed: int, paired: bool):
    """(train, eval or None, stats) for a paired or an unpaired (KTO) objective."""
    encode = encoded_pairs if paired else encoded_unpaired
    return in_memory_datasets(lambda spec: encode(spec, tokenizer, cfg), cfg, seed, "preference")


def row_kind(spec, cfg: DataConfig) -> str | None:
    """"pairs" when the first readable row of ``spec`` has chosen and rejected, "kto" when it has prompt,
    completion and label, else None (rows for sft)."""
    from qfine.data.readers import BadRow, read_rows

    for _, row in read_rows(spec, cfg.split):
        if isinstance(row, BadRow) or not isinstance(row, dict):
            continue
        row = apply_columns(row, cfg.columns)
        if "chosen" in row and "rejected" in row:
            return "pairs"
        return "kto" if {"prompt", "completion", "label"} <= set(row) else None
    return None


def _pad(seqs: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(s) for s in seqs)
    return torch.tensor([s + [value] * (width - len(s)) for s in seqs], dtype=torch.long)


def _batch(ids: list[list[int]], labels: list[list[int]], pad_id: int) -> dict:
    mask = [[1] * len(s) for s in ids]
    return {"input_ids": _pad(ids, pad_id), "attention_mask": _pad(mask, 0), "labels": _pad(labels, IGNORE)}


@dataclass
class PairCollator:
    """B pairs → one batch of 2B rows, the chosen first (rows 0..B−1), then the rejected, right-padded to
    the longest, so that both go through one forward."""

    pad_id: int

    def __call__(self, rows: list[dict]) -> dict:
        ids = [r["chosen_ids"] for r in rows] + [r["rejected_ids"] for r in rows]
        labels = [r["chosen_labels"] for r in rows] + [r["rejected_labels"] for r in rows]
        batch = _batch(ids, labels, self.pad_id)
        if "row" in rows[0]:  # the pairs' places in their dataset: where precomputed reference log-probs are
            batch["row"] = torch.tensor([r["row"] for r in rows], dtype=torch.long)
        return batch


def _split(ids: list[int], labels: list[int]) -> tuple[list[int], list[int]]:
    start = next(i for i, label in enumerate(labels) if label != IGNORE)
    return ids[:start], ids[start:]


@dataclass
class UnpairedCollator:
    """B KTO rows → 2B rows: the rows themselves, then each prompt i with the completion of row i+1
    (mod B), whose log-ratios estimate KTO's KL term; ``desirable`` (B,) bool."""

    pad_id: int

    def __call__(self, rows: list[dict]) -> dict:
        ids = [r["ids"] for r in rows]
        labels = [r["labels"] for r in rows]
        parts = [_split(i, lab) for i, lab in zip(ids, labels)]
        for k, (prompt, _) in enumerate(parts):
            completion = parts[(k + 1) % len(parts)][1]
            ids.append(prompt + completion)
            labels.append([IGNORE] * len(prompt) + completion)
        batch = _batch(ids, labels, self.pad_id)
        batch["desirable"] = torch.tensor([r["desirable"] for r in rows], dtype=torch.bool)
        return batch


def preview(spec, tokenizer, cfg: DataConfig, out, example: int = 0, paired: bool = True) -> RowStats:
    """``qfine data preview`` of preference rows: counts, one row with its scored tokens marked (chosen
    and rejected, or the completion and its label), token lengths; returns the stats."""
    from qfine.data.preview import CLOSE, OPEN, marked_text
    from qfine.data.templates import set_template

    template = set_template(tokenizer, cfg.template)
    rows, stats = (encoded_pairs if paired else encoded_unpaired)(spec, tokenizer, cfg)
    kind = "preference pairs (prompt, chosen, rejected)" if paired else "KTO rows (prompt, completion, label)"
    out.write(f"data:     {spec}\nformat:   {kind}, {stats.rows} rows\ntemplate: {template}; scored: the reply "
              f"and its EOS\n")
    row = rows[min(example, len(rows) - 1)]
    out.write(f"\nrow {min(example, len(rows) - 1)} (scored text between {OPEN} and {CLOSE}):\n")
    if paired:
        out.write("chosen:   " + marked_text(tokenizer, row["chosen_ids"], row["chosen_labels"]) + "\n")
        out.write("rejected: " + marked_text(tokenizer, row["rejected_ids"], row["rejected_labels"]) + "\n")
    else:
        label = "desirable" if row["desirable"] else "undesirable"
        out.write(f"{label}: " + marked_text(tokenizer, row["ids"], row["labels"]) + "\n")
    lengths = [len(v) for r in rows for k, v in r.items() if k.endswith("ids")]
    out.write(f"\ntoken lengths over {len(lengths)} sequences: min {min(lengths)}, max {max(lengths)}; "
              f"{stats.truncated} rows cut to max_seq_len={cfg.max_seq_len}, {stats.tokens} tokens\n")
    if stats.skipped:
        out.write(f"{stats.skipped} bad rows skipped; first: {stats.first_skip}\n")
    return stats
