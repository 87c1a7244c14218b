"""Dequantize a frozen base weight for one GEMM.

``dequantize`` is the one entry point the fused functions use. For bitsandbytes 4-bit weights it
calls bitsandbytes' own ``dequantize_4bit`` (the reference); a single-kernel Triton replacement
belongs here, behind the same signature, with a test against it.
"""

from __future__ import annotations

import torch


def dequantize(linear: torch.nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """The (out, in) weight of a plain or bitsandbytes 4-bit linear in ``dtype``.

    A 16-bit weight already in ``dtype`` is returned as is (no copy); a 4-bit one is dequantized
    into a new buffer, which the caller frees right after its GEMM.
    """
    w = linear.weight
    state = getattr(w, "quant_state", None)
    if state is None:
        return w if w.dtype == dtype else w.to(dtype)
    import bitsandbytes as bnb

    if getattr(state, "packing_format_for_cpu", False):
        raise RuntimeError("4-bit weight repacked by bitsandbytes' AVX512-BF16 CPU path; "
                           "load the model with qfine.load_model")
    out = bnb.functional.dequantize_4bit(w.data, state)
    return out if out.dtype == dtype else out.to(dtype)
