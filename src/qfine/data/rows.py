"""Reading the two text fields a seq-cls or seq2seq row needs, with the bad-row rules of causal-lm data.

A row's field is taken from the column ``data.columns`` maps it to, else from the first of a few
usual column names that the row has (``text``/``sentence``/``review`` for a classifier's text,
``source``/``document``/``article`` for a seq2seq source, and so on). Every failure names the row's
``file:line`` and follows ``data.on_bad_rows``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Iterator

from datasets import Dataset

from qfine import config as C
from qfine.config import DataConfig
from qfine.data.pipeline import skip_bad_row
from qfine.data.readers import BadRow, read_rows
from qfine.util.errors import QfineError

# field → usual column names, tried in order when data.columns does not name one
COLUMNS = {
    "text": ("text", "sentence", "review", "content", "document"),
    "label": ("label", "labels", "sentiment", "class", "category"),
    "source": ("source", "document", "article", "input", "text"),
    "target": ("target", "summary", "highlights", "output", "label"),
}


@dataclass
class RowStats:
    """What reading found: usable rows, bad rows skipped (and the first reason)."""

    rows: int = 0
    skipped: int = 0
    first_skip: str = ""
    truncated: int = 0
    tokens: int = 0
    lengths: list[int] = field(default_factory=list)


def column(row: dict, name: str, cfg: DataConfig, where: str) -> str:
    """The column of ``row`` that holds field ``name`` (see :data:`COLUMNS`)."""
    if name in cfg.columns:
        col = cfg.columns[name]
        if col not in row:
            raise QfineError(f"{where}: no column {col!r} (data.columns maps {name} to it); found: {', '.join(row)}")
        return col
    for col in COLUMNS[name]:
        if col in row:
            return col
    raise QfineError(f"{where}: no {name} column; found: {', '.join(row) or '(none)'}; expected one of "
                     f"{', '.join(COLUMNS[name])} or a data.columns mapping such as {name}=your_column")


def text_of(row: dict, name: str, cfg: DataConfig, where: str) -> str:
    """Field ``name`` of ``row`` as non-empty text."""
    col = column(row, name, cfg, where)
    value = row[col]
    if not isinstance(value, str):
        raise QfineError(f"{where}: column {col!r} ({name}) must be text, got {type(value).__name__}")
    if not value.strip():
        raise QfineError(f"{where}: column {col!r} ({name}) is empty")
    return value


def read_fields(spec, cfg: DataConfig, fields: tuple[str, ...], stats: RowStats,
                convert=None) -> Iterator[tuple[str, tuple[Any, ...]]]:
    """Yield ``(where, values)`` per usable row of ``spec``: each field's value, text by default or
    ``convert[field](row, where)``; bad rows raise or are counted per ``cfg.on_bad_rows``."""
    if cfg.on_bad_rows not in C.allowed(C.DataConfig, "on_bad_rows"):
        raise QfineError(f"data.on_bad_rows must be error or skip, not {cfg.on_bad_rows!r}")
    convert = convert or {}
    for where, row in read_rows(spec, cfg.split):
        try:
            if isinstance(row, BadRow):
                raise QfineError(f"{where}: {row.message}")
            if not isinstance(row, dict):
                raise QfineError(f"{where}: expected an object with named columns, got {type(row).__name__}")
            values = tuple(convert[f](row, where) if f in convert else text_of(row, f, cfg, where) for f in fields)
        except QfineError as e:
            skip_bad_row(e, cfg, stats)
            continue
        stats.rows += 1
        yield where, values


def no_rows(spec, stats: RowStats) -> QfineError:
    why = f" ({stats.skipped} bad rows skipped, first: {stats.first_skip})" if stats.skipped else ""
    return QfineError(f"{spec}: no usable rows{why}")


def in_memory_datasets(encode, cfg: DataConfig, seed: int, task: str):
    """``(train, eval or None, stats of the training rows)`` as ``datasets.Dataset``s, from
    ``encode(spec) -> (rows, stats)``: eval rows from ``data.eval_path`` or a seeded
    ``data.eval_ratio`` share of the training rows."""

    if cfg.streaming or cfg.packing:
        raise QfineError(f"model.task {task} reads its data into memory; data.streaming and data.packing are for "
                         "causal-lm")
    rows, stats = encode(cfg.path)
    train_ds, eval_ds = Dataset.from_list(rows), None
    if cfg.eval_path:
        eval_ds = Dataset.from_list(encode(cfg.eval_path)[0])
    elif cfg.eval_ratio:
        if not 0 < cfg.eval_ratio < 1:
            raise QfineError(f"data.eval_ratio must be in (0, 1), not {cfg.eval_ratio}")
        parts = train_ds.train_test_split(test_size=cfg.eval_ratio, seed=seed)
        train_ds, eval_ds = parts["train"], parts["test"]
    return train_ds, eval_ds, stats


def first_fields(spec, cfg: DataConfig, field: str, n: int) -> list[str]:
    """``field`` of the first ``n`` usable rows of ``spec`` (bad rows skipped, whatever ``on_bad_rows``)."""
    lenient = dataclasses.replace(cfg, on_bad_rows="skip")
    out = []
    for _, (text,) in read_fields(spec, lenient, (field,), RowStats()):
        if len(out) >= n:
            break
        out.append(text)
    return out
