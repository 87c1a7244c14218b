"""Keep some decoder layers' frozen weights dequantized on the GPU, within a memory budget.

Every fused layer dequantizes its 4-bit weights for each GEMM and frees them again: once in the
forward and once in the backward (once more in a checkpoint recompute). That is ~0.5 ms a step for
one Llama-3-8B layer on an H100 (16 ms of a 277 ms step for all 32 at 2 × 2048). Memory left over
under a card's limit can hold some layers' weights already dequantized instead (0.41 GiB per 8B
layer in bf16); those layers then skip the dequantize. The buffers are built in exactly the layout
the fused functions ask :func:`.nf4.stacked` for (:func:`.lora.weight_groups`), from the first
layer on, and dropped by :func:`release_dequantized` when training ends.
"""

from __future__ import annotations

import torch

from qfine.fast import nf4
from qfine.fast.lora import weight_groups
from qfine.fast.swap import FastDecoderLayer, causal_lm

GiB = 2**30


def _layers(model) -> list:
    layers = getattr(getattr(causal_lm(model), "model", None), "layers", None)
    return [layer for layer in layers if isinstance(layer, FastDecoderLayer)] if layers is not None else []


def keep_dequantized(model, budget_gib: float, dtype: torch.dtype) -> tuple[int, float]:
    """Dequantize the frozen weights of the fused decoder layers of ``model`` into ``dtype`` and keep
    them, first layer first, while their total stays within ``budget_gib``. Returns (layers kept, GiB
    held). A layer whose projections cannot be fused now (see :meth:`FastDecoderLayer.projections`)
    stops the walk; 16-bit weights already in ``dtype`` need no buffer and cost nothing."""
    budget, used, count = int(budget_gib * GiB), 0, 0
    for layer in _layers(model):
        projs = layer.projections()
        if projs is None:
            break
        groups = weight_groups(projs)
        need = sum(nf4.kept_bytes(linears, dtype, extra) for linears, extra in groups)
        if used + need > budget:
            break
        for linears, extra in groups:
            used += nf4.keep(linears, dtype, extra)
        count += 1
    return count, used / GiB


def release_dequantized(model) -> None:
    """Drop every kept buffer of ``model``'s fused layers (their memory returns to the allocator)."""
    for layer in _layers(model):
        for module in layer.modules():  # every linear that may head a kept group, adapters as they are now or not
            nf4.release([module])
