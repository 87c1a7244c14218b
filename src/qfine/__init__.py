"""qfine: QLoRA fine-tuning — 4-bit base, LoRA adapters, exact 16-bit merge.

The public names are imported on first use (PEP 562), so that ``qfine --help`` and ``qfine --version``
start without importing torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it
_PUBLIC = {
    "DataConfig": "qfine.config", "LoraSettings": "qfine.config", "ModelConfig": "qfine.config",
    "RunConfig": "qfine.config", "TrainConfig": "qfine.config", "QfineError": "qfine.util.errors",
    "add_lora": "qfine.methods.lora", "load_adapter": "qfine.methods.lora", "load_model": "qfine.models.loading",
}

__all__ = [*sorted(_PUBLIC), "__version__"]


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'qfine' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value
