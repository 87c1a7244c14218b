"""LoftQ initialisation of LoRA adapters on a 4-bit base (arXiv 2310.08659, in its one-shot form).

The frozen base keeps its ordinary quantization Q = quant(W) (so the saved adapter fits the base any
loader produces from the same checkpoint); only the adapter is initialised, from the truncated SVD of
the quantization error, so that the model starts as close to the 16-bit one as rank r allows::

    E = W − dequant(Q)                 (out, in), fp32, W read from the base's safetensors
    E ≈ U_r diag(S_r) V_rᵀ             best rank-r approximation (Eckart–Young)
    B = U_r diag(√S_r) / √s,  A = diag(√S_r) V_rᵀ / √s     so that s · B A = U_r S_r V_rᵀ

with s the layer's LoRA scaling (alpha / r, or alpha / √r with rsLoRA). peft's
``replace_lora_weights_loftq`` does the same SVD but assumes s = 1 and a CUDA device; this one honours
the scaling, runs on the layer's own device, and re-derives DoRA's magnitude so a DoRA model also
starts at dequant(Q) + s·BA.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import bitsandbytes as bnb
import torch
from peft.tuners.lora import LoraLayer

from qfine.models.weights import pristine_reader
from qfine.quant import KINDS

_PREFIX = "base_model.model."


@dataclass
class LoftqReport:
    """Squared Frobenius norms summed over the initialised layers."""

    layers: int
    weight_sq: float      # Σ ‖W‖²
    before_sq: float      # Σ ‖W − dequant(Q)‖²
    after_sq: float       # Σ ‖W − dequant(Q) − s·BA‖²

    @property
    def before(self) -> float:
        """Relative quantization error ‖W − Ŵ‖ / ‖W‖ with the default (zero) update."""
        return math.sqrt(self.before_sq / self.weight_sq)

    @property
    def after(self) -> float:
        """The same with the LoftQ update added."""
        return math.sqrt(self.after_sq / self.weight_sq)

    def line(self) -> str:
        return (f"LoftQ initialisation of {self.layers} layers: relative weight error of the 4-bit base "
                f"{self.before:.4f} → {self.after:.4f} with the adapter's starting update "
                f"({100 * (1 - self.after / self.before):.1f}% less)")


@torch.no_grad()
def loftq_init(model: torch.nn.Module, read: Callable[[str], torch.Tensor], adapter: str = "default") -> LoftqReport:
    """Set ``adapter``'s A and B in every LoRA layer over a 4-bit base of the ``PeftModel`` ``model``.

    ``read`` maps a base state-dict key (``model.layers.0.mlp.up_proj.weight``) to the 16-bit tensor
    the base was quantized from (:func:`qfine.export.merge.pristine_reader`).
    """


    report = LoftqReport(0, 0.0, 0.0, 0.0)
    for name, layer in model.named_modules():
        if not isinstance(layer, LoraLayer) or adapter not in layer.lora_A:
            continue
        base = layer.get_base_layer()
        if not isinstance(base, bnb.nn.Linear4bit):
            continue
        key = name.removeprefix(_PREFIX) + ".weight"
        q = KINDS.dequantize(base)
        w = read(key).to(q.device, torch.float32)
        if w.shape != q.shape:
            raise ValueError(f"{key}: checkpoint weight {tuple(w.shape)} is not the layer's {tuple(q.shape)}")
        err = w - q
        u, sv, vh = torch.linalg.svd(err, full_matrices=False)
        r, s = layer.r[adapter], float(layer.scaling[adapter])
        root = sv[:r].sqrt() / math.sqrt(s)
        b, a = u[:, :r] * root, root[:, None] * vh[:r]
        a_w, b_w = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
        a_w.copy_(a.to(a_w.dtype))
        b_w.copy_(b.to(b_w.dtype))
        update = s * (b_w.float() @ a_w.float())  # as stored: what the forward will add
        if adapter in getattr(layer, "lora_magnitude_vector", {}):
            # DoRA scales each output row to its magnitude: start it at the norm of the corrected weight
            mag = layer.lora_magnitude_vector[adapter].weight
            mag.copy_(torch.linalg.norm(q + update, dim=1).to(mag.dtype))
        report.layers += 1
        report.weight_sq += float(w.square().sum())
        report.before_sq += float(err.square().sum())
        report.after_sq += float((err - update).square().sum())
    if not report.layers:
        raise ValueError("LoftQ found no LoRA layer over a 4-bit base")
    return report


def start_loftq(model: torch.nn.Module, source: str) -> str:
    """LoftQ-initialise ``model``'s default adapter from the base ``source``'s weights; the report line."""

    return loftq_init(model, pristine_reader(source, need="lora.init loftq")).line()
