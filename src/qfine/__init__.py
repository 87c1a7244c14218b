"""qfine: QLoRA fine-tuning — 4-bit base, LoRA adapters, exact 16-bit merge.

The public names (docs/python-api.md) are imported on first use (PEP 562), so that ``import qfine``,
``qfine --help`` and ``qfine --version`` start without importing torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it
_PUBLIC = {
    "DataConfig": "qfine.config", "LoraSettings": "qfine.config", "ModelConfig": "qfine.config",
    "RunConfig": "qfine.config", "TrainConfig": "qfine.config", "QfineError": "qfine.util.errors",
    "load_model": "qfine.models.loading", "add_lora": "qfine.methods.lora", "load_adapter": "qfine.methods.lora",
    "merged": "qfine.methods.lora", "train": "qfine.training.run", "load_run": "qfine.generation.load",
    "generate": "qfine.generation.generate", "merge": "qfine.export.merge", "export_gguf": "qfine.export",
    "plan": "qfine.api",
}
# public names defined under another name in their module
_ALIAS = {"load_run": "load_for_inference", "merge": "merge_run"}

__all__ = [*sorted(_PUBLIC), "__version__"]


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'qfine' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), _ALIAS.get(name, name))
    globals()[name] = value  # later lookups skip this function
    return value
