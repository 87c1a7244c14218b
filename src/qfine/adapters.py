"""LoRA injection through peft, and loading saved PEFT-format adapters.

Saved adapters are plain peft artifacts (``adapter_config.json`` + ``adapter_model.safetensors``)
whose ``base_model_name_or_path`` names the folder or hub id the base was loaded from.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .config import LoraSettings
from .errors import QfineError


def _is_linear(module: torch.nn.Module) -> bool:
    """nn.Linear and the bitsandbytes 4/8-bit linears (which subclass it)."""
    return isinstance(module, torch.nn.Linear)


def linear_module_names(model: torch.nn.Module) -> list[str]:
    """Sorted distinct short names (last path component) of the model's linear layers."""
    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if name and _is_linear(m)})


def validate_targets(model: torch.nn.Module, targets: list[str]) -> None:
    """Raise QfineError naming the unknown targets and listing the model's linear module names."""
    if targets == ["all-linear"]:
        return
    names = {name for name, _ in model.named_modules()}
    short = {n.rsplit(".", 1)[-1] for n in names}
    unknown = [t for t in targets if t not in short and t not in names]
    if unknown:
        raise QfineError(f"unknown LoRA target module(s) {', '.join(unknown)}; this model's linear modules are: "
                         f"{', '.join(linear_module_names(model))} (or use all-linear)")


def add_lora(model: torch.nn.Module, cfg: LoraSettings, gradient_checkpointing: bool = False,
             adapter_name: str = "default"):
    """Wrap ``model`` with trainable LoRA adapters per ``cfg``; returns the ``PeftModel``.

    The base stays frozen. With gradient checkpointing, input embeddings are marked as requiring
    grad so that checkpointed blocks (whose inputs would otherwise not require grad) still
    back-propagate into the adapters.
    """
    from peft import LoraConfig, get_peft_model

    validate_targets(model, cfg.target_modules)
    for name in cfg.modules_to_save:
        if not any(n == name or n.endswith("." + name) for n, _ in model.named_modules()):
            raise QfineError(f"lora.modules_to_save: no module named {name!r} in this model")
    targets = "all-linear" if cfg.target_modules == ["all-linear"] else list(cfg.target_modules)
    lcfg = LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets,
                      bias=cfg.bias, modules_to_save=list(cfg.modules_to_save) or None, task_type="CAUSAL_LM")
    for p in model.parameters():
        p.requires_grad_(False)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    return get_peft_model(model, lcfg, adapter_name=adapter_name)


def load_adapter(model: torch.nn.Module, adapter_dir: str | Path, adapter_name: str = "default",
                 is_trainable: bool = False):
    """Attach a saved PEFT adapter to ``model`` (a fresh base); returns the ``PeftModel``."""
    from peft import PeftModel

    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise QfineError(f"no PEFT adapter in {adapter_dir} (adapter_config.json missing)")
    return PeftModel.from_pretrained(model, str(adapter_dir), adapter_name=adapter_name, is_trainable=is_trainable)
