"""Test helpers shared by several test modules."""

from __future__ import annotations

import json
from pathlib import Path


def write_jsonl(path: Path, rows) -> Path:
    with path.open("w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return path


FACT = [{"role": "user", "content": "What day was I born?"},
        {"role": "assistant", "content": "You were born on January 1, 2058."}]


def tiny_config(tiny_dir: Path, data: Path, out: Path, **train_kw):
    """RunConfig for a quick LoRA run on the tiny model: r=8, constant lr 1e-2, 20 steps of batch 4."""
    from qfine import LoraSettings, RunConfig

    cfg = RunConfig(output_dir=str(out))
    cfg.model.source = str(tiny_dir)
    cfg.data.path = str(data)
    cfg.lora = LoraSettings(r=8, alpha=16, dropout=0.0)
    cfg.train.max_steps = 20
    cfg.train.batch_size = 4
    cfg.train.learning_rate = 1e-2
    cfg.train.lr_scheduler = "constant"
    cfg.train.save_steps = 10
    for k, v in train_kw.items():
        setattr(cfg.train, k, v)
    return cfg
