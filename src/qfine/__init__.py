"""qfine: QLoRA fine-tuning — 4-bit base, LoRA adapters, exact 16-bit merge."""

from .adapters import add_lora, load_adapter
from .config import DataConfig, LoraSettings, ModelConfig, RunConfig, TrainConfig
from .errors import QfineError
from .loading import load_model

__version__ = "0.1.0"

__all__ = ["DataConfig", "LoraSettings", "ModelConfig", "QfineError", "RunConfig", "TrainConfig",
           "add_lora", "load_adapter", "load_model", "__version__"]
