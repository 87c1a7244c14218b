"""QA-LoRA's adapter side (arXiv 2309.14717) over the INT4 base of :mod:`qfine.quant.int4`.

LoRA A sees the input pooled per group, as peft's ``QALoraLinearVariant`` computes it (the adapter is
saved in peft's format: ``use_qalora``, ``qalora_group_size``, lora_A of shape (r, in/L))::

    y = x Wᵀ + s · (p(x) Aᵀ) Bᵀ,   p(x)[g] = (in/L) · mean(x[g·L:(g+1)·L])

so the update's weight s · (BA)[o, g] · (in/L) / L is the same for every column of a group, and the
merge adds it to m[o, g]: codes and scales stay byte-identical, nothing is requantized.
"""

from __future__ import annotations

import functools

import torch
from peft.tuners.lora import LoraLayer
from peft.tuners.lora.variants import QALoraLinearVariant

from qfine.compat.peft import register_custom_module
from qfine.quant.int4 import Int4Linear
from qfine.util.errors import QfineError


@functools.cache
def lora_layer_class():
    """peft's LoRA layer for :class:`Int4Linear` bases (registered through :func:`register`)."""

    class Int4LoraLinear(torch.nn.Module, LoraLayer):
        """LoRA (pooled, with ``use_qalora``) over an :class:`Int4Linear`; peft's variant does the math."""

        def __init__(self, base_layer, adapter_name, config, r=0, lora_alpha=1, **kwargs):
            super().__init__()
            LoraLayer.__init__(self, base_layer)
            if config.use_dora:
                raise ValueError("DoRA over a QA-LoRA base is not supported")
            self._active_adapter = adapter_name
            self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config)

        def resolve_lora_variant(self, *, config, **kwargs):
            return QALoraLinearVariant() if config.use_qalora else None

        def forward(self, x, *args, **kwargs):
            result = self.base_layer(x)
            if self.disable_adapters:
                return result
            dtype = result.dtype  # fp32 adapters must not widen a bf16 model's activations (peft casts back too)
            for name in self.active_adapters:
                if name not in self.lora_A:
                    continue
                a, b = self.lora_A[name], self.lora_B[name]
                xa = x.to(a.weight.dtype)
                if name in self.lora_variant:
                    result = self.lora_variant[name].forward(self, active_adapter=name, x=xa, result=result)
                else:
                    result = result + b(a(self.lora_dropout[name](xa))) * self.scaling[name]
            return result.to(dtype)

    return Int4LoraLinear


def register(lora_config) -> None:
    """Let peft wrap :class:`Int4Linear` layers under ``lora_config``."""
    register_custom_module(lora_config, {Int4Linear: lora_layer_class()})


def pooled_delta(layer, adapter: str) -> torch.Tensor:
    """The per-group update s · (BA) · (in/L) / L, fp32 (out, in/L), of a QA-LoRA layer (module docstring)."""
    a = layer.lora_A[adapter].weight.float()
    b = layer.lora_B[adapter].weight.float()
    groups = a.shape[1]
    return layer.scaling[adapter] * (b @ a) * groups / layer.qalora_group_size[adapter]


def full_delta(layer, adapter: str) -> torch.Tensor:
    """The same update as a full (out, in) fp32 weight: each group's value repeated over its columns."""
    return pooled_delta(layer, adapter).repeat_interleave(layer.qalora_group_size[adapter], dim=1)


def is_qalora(layer, adapter: str) -> bool:
    return adapter in getattr(layer, "qalora_group_size", {})


def folded_mins(layer) -> torch.Tensor:
    """The minimums m + Σ pooled updates of a LoRA layer over an :class:`Int4Linear` (fp32, (out, in/L)):
    with them the plain 4-bit layer computes what the adapted one does. Every active adapter must be
    QA-LoRA's with the base's group size (a plain LoRA update varies inside a group and cannot fold)."""
    base = layer.get_base_layer()
    mins = base.mins.float().clone()
    active = [layer.active_adapters] if isinstance(layer.active_adapters, str) else layer.active_adapters
    for name in (a for a in active if a in layer.lora_A):
        if not is_qalora(layer, name) or layer.qalora_group_size[name] != base.group:
            raise QfineError(f"adapter {name!r} is not QA-LoRA with group size {base.group}: its update cannot be "
                             f"folded into the 4-bit zero points (merge to 16-bit with --dtype instead)")
        mins += pooled_delta(layer, name).to(mins.device)
    return mins
