"""peft's private symbols that qfine uses, each with why (pinned by tests/test_compat.py)."""

from __future__ import annotations


def register_custom_module(lora_config, mapping: dict) -> None:
    """``LoraConfig._register_custom_module``: the documented way (peft's "custom models" guide) to let
    LoRA wrap a layer class peft does not know, here qfine's INT4 base layer; it has no public alias."""
    register = getattr(lora_config, "_register_custom_module", None)
    if register is None:
        raise RuntimeError("peft's LoraConfig has no _register_custom_module any more (qfine.compat.peft)")
    register(mapping)
