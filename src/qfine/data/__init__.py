"""Data: read rows → detect their format → render with a template → tokenize with a loss mask.

``build_datasets(tokenizer, cfg, seed)`` (train and eval rows, tokenized) is what the causal-LM
objective (qfine.objectives.sft) and the adaptive quantizer's calibration read.
"""

from qfine.data.formats import detect_format, to_messages
from qfine.data.pipeline import build_dataset, build_datasets, encode_row
from qfine.data.readers import read_rows

__all__ = ["build_dataset", "build_datasets", "detect_format", "encode_row", "read_rows", "to_messages"]
