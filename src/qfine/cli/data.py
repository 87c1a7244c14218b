"""``qfine data``: how a data file will be read and masked, and the bundled example datasets."""

from __future__ import annotations

import sys

from qfine import config as C


def cmd_data_preview(ns) -> None:
    """Show the detected format, a rendered example with its loss mask, and token lengths."""
    from qfine.data.preview import preview
    from qfine.models.loading import load_tokenizer
    from qfine.models.sources import resolve_source

    cfg = C.DataConfig(path=ns.file)
    C.apply_overrides(C.RunConfig(data=cfg), {("data", k): v for k, v in (
        ("max_seq_len", ns.max_seq_len), ("format", ns.format), ("template", ns.template), ("columns", ns.columns),
        ("loss_on", ns.loss_on), ("too_long", ns.too_long), ("on_bad_rows", ns.on_bad_rows)) if v is not None})
    tokenizer = load_tokenizer(resolve_source(ns.model))
    from qfine.objectives import pref_data

    kind = pref_data.row_kind(ns.file, cfg)
    if kind is not None:
        pref_data.preview(ns.file, tokenizer, cfg, sys.stdout, ns.example, paired=kind == "pairs")
        return
    preview(ns.file, tokenizer, cfg, sys.stdout, ns.example)


def cmd_data_chitchat(ns) -> None:
    """Convert the chitchat-dataset package to messages JSONL (train.jsonl + eval.jsonl)."""
    from qfine.data.chitchat import convert

    n_train, n_eval = convert(ns.out, ns.limit, max_turns=ns.max_turns)
    print(f"wrote {n_train} training and {n_eval} eval conversations to {ns.out}/train.jsonl, eval.jsonl")


def cmd_data_sentiment(ns) -> None:
    """Write the lexicon-based sentiment task (train.jsonl + eval.jsonl, eval words unseen in training)."""
    from qfine.data.sentiment import build

    n_train, n_eval = build(ns.out, ns.words)
    print(f"wrote {n_train} training and {n_eval} eval rows to {ns.out}/train.jsonl, eval.jsonl "
          "(the eval rows' sentiment words never occur in training)")




def register(sub) -> None:
    """Add data preview, chitchat and sentiment to the CLI's subparsers."""
    data = sub.add_parser("data", help="inspect training data").add_subparsers(dest="data_command", required=True)
    p = data.add_parser("preview", help="detected format, one rendered example with the loss mask, token lengths")
    p.add_argument("file", help="data file, glob, save_to_disk folder or hub dataset id")
    p.add_argument("--model", default="default", help="whose tokenizer and chat template to use")
    p.add_argument("--max-seq-len", type=int)
    p.add_argument("--format")
    p.add_argument("--template")
    p.add_argument("--columns", help="field=column,... mapping")
    p.add_argument("--loss-on")
    p.add_argument("--too-long")
    p.add_argument("--on-bad-rows")
    p.add_argument("--example", type=int, default=0, help="index of the row to render")
    p.set_defaults(func=cmd_data_preview)
    p = data.add_parser("chitchat", help="convert the chitchat-dataset package (MIT) to messages JSONL")
    p.add_argument("--out", default="data/chitchat", help="folder for train.jsonl and eval.jsonl")
    p.add_argument("--limit", type=int, help="conversations to convert (default: all ~7k)")
    p.add_argument("--max-turns", type=int, default=8, help="turns kept per conversation")
    p.set_defaults(func=cmd_data_chitchat)
    p = data.add_parser("sentiment", help="a sentiment task from the VADER lexicon's human ratings (vaderSentiment, MIT)")
    p.add_argument("--out", default="data/sentiment", help="folder for train.jsonl and eval.jsonl")
    p.add_argument("--words", type=int, default=200, help="positive words (and as many negative) to use")
    p.set_defaults(func=cmd_data_sentiment)
