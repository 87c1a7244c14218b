"""Data: read rows → detect their format → render with a template → tokenize with a loss mask.

``build_dataset(path, tokenizer, cfg)`` is the one entry point the trainer uses.
"""

from qfine.data.formats import detect_format, to_messages
from qfine.data.pipeline import build_dataset, build_datasets, encode_row
from qfine.data.readers import read_rows

__all__ = ["build_dataset", "build_datasets", "detect_format", "encode_row", "read_rows", "to_messages"]
