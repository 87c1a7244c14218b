"""bitsandbytes LLM.int8(): ``bnb.nn.Linear8bitLt``, one byte per weight and an fp32 scale per output row.

Its matmul looks for outlier columns on the host, so a CUDA graph cannot capture it (``host_sync``).
"""

from __future__ import annotations

import bitsandbytes as bnb
import torch

from qfine.quant.registry import BaseWeight, Settings


def dequantize(linear: torch.nn.Module) -> torch.Tensor:
    w = linear.weight
    scb = getattr(w, "SCB", None)
    if scb is None:
        scb = linear.state.SCB
    return w.data.float() * (scb.float().unsqueeze(1) / 127.0)


def stored_bytes(out: int, inp: int, s: Settings) -> float:
    return out * inp + 4 * out


def extra_bytes_over_nf4(params: int, rows: int, nf4_bytes_per_weight: float) -> float:
    """Bytes an int8 layer takes beyond its NF4 form: 1 byte per weight + an fp32 scale per row."""
    return params * (1 - nf4_bytes_per_weight) + 4 * rows


def from_weight(w: torch.Tensor, bias: torch.Tensor | None, device) -> torch.nn.Module:
    """A ``Linear8bitLt`` quantized from a 16-bit weight (out, in) on ``device`` (bitsandbytes quantizes
    on the move to a GPU)."""
    new = bnb.nn.Linear8bitLt(w.shape[1], w.shape[0], bias=bias is not None, has_fp16_weights=False, threshold=6.0)
    new.weight = bnb.nn.Int8Params(w.contiguous(), requires_grad=False, has_fp16_weights=False)
    if bias is not None:
        new.bias = torch.nn.Parameter(bias.detach().clone(), requires_grad=False)
    return new.to(device)


KIND = BaseWeight(name="int8", config_names=("int8",), matches=lambda m: isinstance(m, bnb.nn.Linear8bitLt),
                  dequantize=dequantize, stored_bytes=stored_bytes, host_sync=True)
