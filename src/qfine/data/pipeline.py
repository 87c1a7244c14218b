"""Templating, tokenization, the loss mask, and dataset assembly.

A conversation is rendered with the chat template and cut into segments: the text the template
puts around turns (never trained) and each assistant reply followed by EOS (trained by default).
Each segment is tokenized on its own, so the prompt tokens are exactly what
``apply_chat_template(..., add_generation_prompt=True)`` gives at inference time, and the labels
decode to exactly the assistant texts plus EOS.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

from datasets import Dataset, IterableDataset
from jinja2 import TemplateError

from qfine import config as C
from qfine.config import DataConfig
from qfine.data.formats import Messages, to_messages
from qfine.data.readers import BadRow, read_rows
from qfine.data.templates import set_template
from qfine.util.errors import QfineError

IGNORE = -100
LOSS_ON = C.allowed(C.DataConfig, "loss_on")


def render(tokenizer, messages: Messages, add_generation_prompt: bool = False, where: str = "row") -> str:
    """The chat template applied to ``messages``, as text. A template that rejects the conversation
    (Gemma's refuses a system turn, strict ones demand alternating user/assistant turns) raises
    QfineError naming ``where`` and the template's own message."""

    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except TemplateError as e:
        roles = "/".join(m["role"] for m in messages)
        raise QfineError(f"{where}: the chat template rejects this conversation ({roles}): {e}") from None


def segments(tokenizer, messages: Messages, where: str = "row") -> list[tuple[str, bool]]:
    """Split the rendered conversation into ``(text, is_assistant_reply)`` pieces.

    Assistant pieces hold the reply text alone; the EOS the template writes right after it (if
    any) is left out of the following piece because the caller appends EOS as a token.
    """
    full = render(tokenizer, messages, where=where)
    eos = tokenizer.eos_token or ""
    pieces: list[tuple[str, bool]] = []
    pos = 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prefix = render(tokenizer, messages[:i], add_generation_prompt=True, where=where)
        if not full.startswith(prefix) or len(prefix) < pos:
            raise QfineError(f"{where}: the chat template does not render turn {i} as a prefix of the conversation; "
                             "cannot locate the assistant reply for the loss mask (try data.template: chatml)")
        content = m["content"]
        start = len(prefix)
        if not full.startswith(content, start):
            stripped = content.strip()
            if not full.startswith(stripped, start):
                raise QfineError(f"{where}: the chat template changes assistant turn {i}; cannot mask it")
            content = stripped
        pieces.append((full[pos:start], False))
        pieces.append((content, True))
        pos = start + len(content)
        if eos and full.startswith(eos, pos):
            pos += len(eos)
    pieces.append((full[pos:], False))
    return [(t, trained) for t, trained in pieces if t or trained]


@dataclass
class Encoded:
    """Token ids and labels of one example: ``labels[i]`` is ``input_ids[i]`` or -100 (no loss)."""

    input_ids: list[int]
    labels: list[int]


def encode_messages(tokenizer, messages: Messages, loss_on: str = "completion", where: str = "row") -> Encoded:
    """Tokenize one conversation with its loss mask (see ``DataConfig.loss_on``)."""
    if loss_on not in LOSS_ON:
        raise QfineError(f"data.loss_on must be one of {', '.join(LOSS_ON)}, not {loss_on!r}")
    eos_id = tokenizer.eos_token_id
    if eos_id is None:
        raise QfineError("the tokenizer has no EOS token, so a trained reply could never end; use a tokenizer "
                         "that defines eos_token")
    if messages[0]["role"] == "text":
        ids = tokenizer.encode(messages[0]["content"], add_special_tokens=False) + [eos_id]
        return Encoded(ids, list(ids))
    pieces = segments(tokenizer, messages, where)
    last = max(i for i, (_, trained) in enumerate(pieces) if trained)
    ids: list[int] = []
    labels: list[int] = []
    for i, (text, trained) in enumerate(pieces):
        piece = tokenizer.encode(text, add_special_tokens=False)
        if trained:
            piece = piece + [eos_id]
        keep = loss_on == "all" or (trained and (loss_on == "completion" or i == last))
        ids += piece
        labels += piece if keep else [IGNORE] * len(piece)
    return Encoded(ids, labels)


def row_messages(row, cfg: DataConfig, where: str = "row") -> Messages:
    """Convert one raw row to messages, adding ``cfg.system_prompt`` where none is given."""
    messages = to_messages(row, where, cfg.format, cfg.columns)
    if cfg.system_prompt and messages[0]["role"] not in ("system", "text"):
        messages = [{"role": "system", "content": cfg.system_prompt}] + messages
    return messages


def prompt_and_reply(messages: Messages) -> tuple[Messages, str]:
    """Split a conversation at its last assistant turn: (messages before it, its text)."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return messages[:last], messages[last]["content"]


def encode_row(row, tokenizer, cfg: DataConfig, where: str = "row") -> Encoded:
    """Convert, template and tokenize one raw row."""
    return encode_messages(tokenizer, row_messages(row, cfg, where), cfg.loss_on, where)


@dataclass
class DatasetStats:
    """What reading a data source found. ``lengths`` are token counts before truncation."""

    rows: int = 0
    skipped: int = 0  # bad rows skipped (on_bad_rows: skip)
    truncated: int = 0
    dropped: int = 0  # over max_seq_len with too_long: drop, or truncated to no loss-bearing token
    no_target: int = 0  # rows with no token to predict (every label after the first is -100)
    tokens: int = 0
    lengths: list[int] = field(default_factory=list)
    first_skip: str = ""


def skip_bad_row(error: QfineError, cfg: DataConfig, stats) -> None:
    """``data.on_bad_rows``: re-raise ``error`` (error), or count the row and keep the first reason (skip)."""
    if cfg.on_bad_rows == "error":
        raise error
    stats.skipped += 1
    stats.first_skip = stats.first_skip or str(error)


def has_target(labels: list[int]) -> bool:
    """Whether a row has a token to predict: a label other than -100 after the first position."""
    return any(label != IGNORE for label in labels[1:])


def encoded_rows(spec, tokenizer, cfg: DataConfig, stats: DatasetStats) -> Iterator[dict]:
    """Yield ``{"input_ids", "labels"}`` for every usable row of ``spec``, updating ``stats``."""
    if cfg.on_bad_rows not in C.allowed(C.DataConfig, "on_bad_rows"):
        raise QfineError(f"data.on_bad_rows must be error or skip, not {cfg.on_bad_rows!r}")
    if cfg.too_long not in C.allowed(C.DataConfig, "too_long"):
        raise QfineError(f"data.too_long must be truncate or drop, not {cfg.too_long!r}")
    for where, row in read_rows(spec, cfg.split):
        try:
            if isinstance(row, BadRow):
                raise QfineError(f"{where}: {row.message}")
            enc = encode_row(row, tokenizer, cfg, where)
            task = row_task(row, cfg, where)
        except QfineError as e:
            skip_bad_row(e, cfg, stats)
            continue
        stats.rows += 1
        stats.lengths.append(len(enc.input_ids))
        if len(enc.input_ids) > cfg.max_seq_len:
            if cfg.too_long == "drop":
                stats.dropped += 1
                continue
            stats.truncated += 1
            enc = Encoded(enc.input_ids[: cfg.max_seq_len], enc.labels[: cfg.max_seq_len])
            if not has_target(enc.labels):
                stats.dropped += 1
                continue
        elif not has_target(enc.labels):
            # the first token is never predicted (nothing comes before it): such a row adds no loss
            stats.no_target += 1
            continue
        stats.tokens += len(enc.input_ids)
        if cfg.task_column:
            yield {"input_ids": enc.input_ids, "labels": enc.labels, "task": task}
        else:
            yield {"input_ids": enc.input_ids, "labels": enc.labels}


def row_task(row, cfg: DataConfig, where: str) -> str | None:
    """The row's task name from ``cfg.task_column`` (multi-task runs), None without one."""
    if not cfg.task_column:
        return None
    task = row.get(cfg.task_column) if isinstance(row, dict) else None
    if not isinstance(task, str) or not task.strip():
        raise QfineError(f"{where}: no task name in column {cfg.task_column!r} (data.task_column)")
    return task.strip()


def _no_rows(spec, stats: DatasetStats, cfg: DataConfig) -> QfineError:
    why = []
    if stats.skipped:
        why.append(f"{stats.skipped} bad rows skipped, first: {stats.first_skip}")
    if stats.dropped:
        why.append(f"{stats.dropped} dropped for exceeding max_seq_len={cfg.max_seq_len}")
    if stats.no_target:
        why.append(f"{stats.no_target} with no token to predict (loss_on={cfg.loss_on}: every loss-bearing token "
                   "is the row's first, or there is none; check the tokenizer and the columns)")
    return QfineError(f"{spec}: no usable rows" + (f" ({'; '.join(why)})" if why else ""))


def build_dataset(spec, tokenizer, cfg: DataConfig):
    """Read ``spec`` and return ``(dataset with input_ids/labels, DatasetStats)``.

    With ``cfg.streaming`` the dataset is an ``IterableDataset`` read and tokenized lazily (stats
    then fill in as training reads it); otherwise an in-memory ``Dataset``.
    """

    set_template(tokenizer, cfg.template)
    stats = DatasetStats()
    if cfg.streaming:
        first = next(encoded_rows(spec, tokenizer, cfg, DatasetStats()), None)  # fail fast on bad input
        if first is None:
            raise _no_rows(spec, stats, cfg)

        def gen():
            yield from encoded_rows(spec, tokenizer, cfg, stats)

        return IterableDataset.from_generator(gen), stats
    rows = list(encoded_rows(spec, tokenizer, cfg, stats))
    if not rows:
        raise _no_rows(spec, stats, cfg)
    return Dataset.from_list(rows), stats


def build_datasets(tokenizer, cfg: DataConfig, seed: int = 42):
    """Train and eval datasets per ``cfg`` (eval from eval_path, or eval_ratio of the training rows)."""
    train_ds, stats = build_dataset(cfg.path, tokenizer, cfg)
    eval_ds = None
    if cfg.eval_path:
        eval_ds = build_dataset(cfg.eval_path, tokenizer, cfg)[0]
    elif cfg.eval_ratio:
        if not 0 < cfg.eval_ratio < 1:
            raise QfineError(f"data.eval_ratio must be in (0, 1), not {cfg.eval_ratio}")
        if cfg.streaming:
            raise QfineError("data.eval_ratio needs an in-memory dataset; with streaming give data.eval_path")
        if len(train_ds) < 2:
            raise QfineError(f"{cfg.path}: too few rows ({len(train_ds)}) to hold out an eval split")
        parts = train_ds.train_test_split(test_size=cfg.eval_ratio, seed=seed)
        train_ds, eval_ds = parts["train"], parts["test"]
    return train_ds, eval_ds, stats
