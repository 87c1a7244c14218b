"""``qfine data preview``: what the trainer will see, before training on it."""

from __future__ import annotations

import statistics
from collections import Counter
from typing import TextIO

from qfine.config import DataConfig
from qfine.data.formats import apply_columns, detect_format
from qfine.data.pipeline import IGNORE, DatasetStats, encode_messages, encoded_rows, row_messages
from qfine.data.readers import BadRow, read_rows
from qfine.data.templates import set_template

OPEN, CLOSE = "⟦", "⟧"  # marks the loss-bearing text in the rendered example


def marked_text(tokenizer, input_ids: list[int], labels: list[int]) -> str:
    """Decode ``input_ids`` with each run of loss-bearing tokens wrapped in ⟦ ⟧."""
    out, run, trained = [], [], None
    for tok, lab in zip(input_ids, labels):
        is_trained = lab != IGNORE
        if run and is_trained != trained:
            text = tokenizer.decode(run)
            out.append(f"{OPEN}{text}{CLOSE}" if trained else text)
            run = []
        run.append(tok)
        trained = is_trained
    if run:
        text = tokenizer.decode(run)
        out.append(f"{OPEN}{text}{CLOSE}" if trained else text)
    return "".join(out)


def histogram(lengths: list[int], bins: int = 10, width: int = 40) -> list[str]:
    """Text histogram lines ``"  lo-hi  ████ count"`` of token lengths."""
    lo, hi = min(lengths), max(lengths)
    step = max(1, -(-(hi - lo + 1) // bins))
    counts = Counter((n - lo) // step for n in lengths)
    top = max(counts.values())
    lines = []
    for b in range((hi - lo) // step + 1):
        c = counts.get(b, 0)
        lines.append(f"  {lo + b * step:>6}-{lo + (b + 1) * step - 1:<6} {'█' * round(width * c / top):<{width}} {c}")
    return lines


def preview(spec: str, tokenizer, cfg: DataConfig, out: TextIO, example: int = 0) -> DatasetStats:
    """Write the preview of ``spec`` to ``out`` and return the stats it computed."""
    template = set_template(tokenizer, cfg.template)
    formats: Counter = Counter()
    first = None
    for i, (where, row) in enumerate(read_rows(spec, cfg.split)):
        if isinstance(row, BadRow):
            continue
        try:
            formats[detect_format(apply_columns(row, cfg.columns), where, cfg.format)] += 1
        except Exception:  # noqa: BLE001 - counted as bad below, through the real pipeline
            continue
        if first is None and i >= example:
            first = (where, row)
    stats = DatasetStats()
    for _ in encoded_rows(spec, tokenizer, cfg, stats):
        pass
    out.write(f"data:     {spec}\n")
    out.write(f"format:   {', '.join(f'{k} ({v} rows)' for k, v in formats.most_common()) or 'none detected'}\n")
    out.write(f"template: {template}; loss on: {cfg.loss_on}\n")
    if first is not None:
        where, row = first
        enc = encode_messages(tokenizer, row_messages(row, cfg, where), cfg.loss_on, where)
        out.write(f"\nexample {where} ({len(enc.input_ids)} tokens; loss-bearing text between {OPEN} and {CLOSE}):\n")
        out.write(marked_text(tokenizer, enc.input_ids, enc.labels) + "\n")
    if stats.lengths:
        L = stats.lengths
        out.write(f"\ntoken lengths over {len(L)} rows: min {min(L)}, median {statistics.median(L):g}, "
                  f"mean {statistics.fmean(L):.1f}, max {max(L)}\n")
        out.write("\n".join(histogram(L)) + "\n")
    over = sum(n > cfg.max_seq_len for n in stats.lengths)
    action = "truncated" if cfg.too_long == "truncate" else "dropped"
    out.write(f"\n{over} of {stats.rows} rows exceed max_seq_len={cfg.max_seq_len} ({action}); "
              f"{stats.dropped} dropped in all, {stats.tokens} tokens kept\n")
    if stats.skipped:
        out.write(f"{stats.skipped} bad rows skipped; first: {stats.first_skip}\n")
    return stats
