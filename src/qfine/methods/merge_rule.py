"""The exact merge rule of one adapted layer: the fp32 weight that computes what peft's layer computes.

``W_merged = dequant(W).float() + Σ_active scaling · (B.float() @ A.float())`` (DoRA: each output row
rescaled to its trained magnitude; QA-LoRA: the pooled update spread over its groups). Writers
(:mod:`qfine.export.merge`) and in-memory merges (:func:`qfine.methods.lora.merge_adapter`) both use it.
"""

from __future__ import annotations

import torch
from peft.tuners.lora import LoraLayer
from peft.utils import ModulesToSaveWrapper

from qfine.methods.qalora import full_delta, is_qalora


def lora_delta(layer, adapter: str) -> torch.Tensor:
    """``scaling · B @ A`` in fp32 for one peft LoRA linear layer: (out_features, in_features) (for
    QA-LoRA, the pooled update spread over each group's columns)."""
    if is_qalora(layer, adapter):
        return full_delta(layer, adapter)
    a = layer.lora_A[adapter].weight.float()
    b = layer.lora_B[adapter].weight.float()
    delta = b @ a
    if getattr(layer, "fan_in_fan_out", False):
        delta = delta.T
    return layer.scaling[adapter] * delta


def merged_weight(layer, w: torch.Tensor) -> torch.Tensor:
    """The fp32 weight (out, in) that computes what peft's ``layer`` computes (bias aside) over the
    base weight ``w`` with its active adapters, LoRA and DoRA alike.

    LoRA adds ΔW = s·BA. DoRA (arXiv 2402.09353, as peft runs it) rescales each output row to a
    trained magnitude m: its output is f ⊙ (W + ΔW) x with f = m / ‖W + ΔW‖ (row norms), written
    here as the increment (f − 1) ⊙ W + f ⊙ ΔW over W, so several active adapters add up as in
    peft's forward, where each one's term is computed against the base weight alone.
    """
    total = w
    for adapter in _active_adapters(layer):
        delta = lora_delta(layer, adapter).to(w.device)
        if adapter in getattr(layer, "lora_magnitude_vector", {}):
            f = layer.lora_magnitude_vector[adapter].weight.float().to(w.device) / torch.linalg.norm(w + delta, dim=1)
            total = total + (f - 1)[:, None] * w + f[:, None] * delta
        else:
            total = total + delta
    return total


def _active_adapters(layer) -> list[str]:
    active = layer.active_adapters
    return [a for a in ([active] if isinstance(active, str) else active) if a in layer.lora_A]


def _adapted(module) -> bool:
    return isinstance(module, (LoraLayer, ModulesToSaveWrapper))


def unties_embeddings(base: torch.nn.Module) -> bool:
    """Whether a model with tied input/output embeddings trained one of them on its own (LoRA on it,
    or a full copy in ``modules_to_save``): the two then differ, and the merge must write both and
    untie them in the config, or a reload would re-tie them and drop one side's training."""
    if not getattr(base.config, "tie_word_embeddings", False):
        return False
    heads = [getattr(base, f, lambda: None)() for f in ("get_input_embeddings", "get_output_embeddings")]
    wrapped = [m for _, m in base.named_modules() if _adapted(m)]
    return any(h is not None and (h in wrapped or any(h is getattr(w, "base_layer", None) or
                                                      h is getattr(w, "original_module", None) for w in wrapped))
               for h in heads)
