"""Templating, tokenization and the loss mask.

A conversation is rendered with the tokenizer's chat template and cut into segments: the text the
template puts around turns (never trained) and each assistant reply followed by EOS (trained by
default). Each segment is tokenized on its own, so the prompt tokens are exactly what
``apply_chat_template(..., add_generation_prompt=True)`` gives at inference time, and the labels
decode to exactly the assistant texts plus EOS.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..config import DataConfig
from ..errors import QfineError
from .formats import Messages, to_messages
from .readers import read_rows

IGNORE = -100

# Used when a tokenizer has no chat template of its own.
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def ensure_chat_template(tokenizer) -> None:
    """Give ``tokenizer`` the ChatML template when it has none."""
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = CHATML_TEMPLATE


def render(tokenizer, messages: Messages, add_generation_prompt: bool = False) -> str:
    """The chat template applied to ``messages``, as text."""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def _segments(tokenizer, messages: Messages, where: str) -> list[tuple[str, bool]]:
    """Split the rendered conversation into ``(text, is_assistant_reply)`` pieces.

    Assistant pieces hold the reply text alone; the EOS the template writes right after it (if
    any) is dropped from the following piece because the caller appends EOS as a token.
    """
    full = render(tokenizer, messages)
    eos = tokenizer.eos_token or ""
    pieces: list[tuple[str, bool]] = []
    pos = 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prefix = render(tokenizer, messages[:i], add_generation_prompt=True)
        if not full.startswith(prefix) or len(prefix) < pos:
            raise QfineError(f"{where}: the chat template does not render turn {i} as a prefix of the conversation; "
                             "cannot locate the assistant reply for the loss mask")
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
    """Tokenize one conversation; the loss covers assistant replies + EOS (``completion``) or all tokens."""
    if loss_on not in ("completion", "all"):
        raise QfineError(f"data.loss_on must be completion or all, not {loss_on!r}")
    eos_id = tokenizer.eos_token_id
    if messages[0]["role"] == "text":
        ids = tokenizer.encode(messages[0]["content"], add_special_tokens=False) + [eos_id]
        return Encoded(ids, list(ids))
    ids: list[int] = []
    labels: list[int] = []
    for text, trained in _segments(tokenizer, messages, where):
        piece = tokenizer.encode(text, add_special_tokens=False)
        if trained:
            piece = piece + [eos_id]
        ids += piece
        labels += piece if (trained or loss_on == "all") else [IGNORE] * len(piece)
    return Encoded(ids, labels)


def encode_row(row, tokenizer, cfg: DataConfig, where: str = "row") -> Encoded:
    """Convert, template and tokenize one raw row, adding ``cfg.system_prompt`` where none is given."""
    messages = to_messages(row, where)
    if cfg.system_prompt and messages[0]["role"] not in ("system", "text"):
        messages = [{"role": "system", "content": cfg.system_prompt}] + messages
    return encode_messages(tokenizer, messages, cfg.loss_on, where)


@dataclass
class DatasetStats:
    rows: int = 0
    truncated: int = 0
    dropped: int = 0  # truncation left no loss-bearing token
    tokens: int = 0


def build_dataset(path: str | Path, tokenizer, cfg: DataConfig):
    """Read ``path`` and return ``(datasets.Dataset with input_ids/labels, DatasetStats)``.

    Sequences longer than ``cfg.max_seq_len`` are truncated at the end; examples left without any
    loss-bearing token are dropped and counted.
    """
    from datasets import Dataset

    ensure_chat_template(tokenizer)
    stats = DatasetStats()
    rows = []
    for where, row in read_rows(path):
        enc = encode_row(row, tokenizer, cfg, where)
        stats.rows += 1
        if len(enc.input_ids) > cfg.max_seq_len:
            stats.truncated += 1
            enc = Encoded(enc.input_ids[: cfg.max_seq_len], enc.labels[: cfg.max_seq_len])
            if all(label == IGNORE for label in enc.labels):
                stats.dropped += 1
                continue
        stats.tokens += len(enc.input_ids)
        rows.append({"input_ids": enc.input_ids, "labels": enc.labels})
    if not rows:
        why = f" ({stats.dropped} dropped: nothing to train on within max_seq_len={cfg.max_seq_len})" if stats.dropped else ""
        raise QfineError(f"{path}: no usable rows{why}")
    return Dataset.from_list(rows), stats
