"""Dequantize a frozen base weight for one GEMM.

``dequantize`` is the one entry point the fused functions use. NF4 weights on CUDA go through the
one-launch Triton kernel of :mod:`.nf4_kernel` (double quantization included); everything else —
FP4, CPU, or ``QFINE_TRITON_NF4=0`` — through bitsandbytes' own ``dequantize_4bit``, which is also
the reference the kernel is tested against.
"""

from __future__ import annotations

import os

import torch


def _triton_nf4(w: torch.Tensor, state, dtype: torch.dtype) -> bool:
    if not (w.is_cuda and state.quant_type == "nf4" and state.dtype == dtype and state.blocksize % 2 == 0):
        return False
    if os.environ.get("QFINE_TRITON_NF4", "1") == "0" or state.shape[0] * state.shape[1] % 2:
        return False
    tensors = [state.code, state.absmax] + ([state.offset, state.state2.code, state.state2.absmax]
                                            if state.nested else [])
    return all(isinstance(t, torch.Tensor) and t.device == w.device for t in tensors)


def dequantize(linear: torch.nn.Module, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """The (out, in) weight of a plain or bitsandbytes 4-bit linear in ``dtype``.

    A 16-bit weight already in ``dtype`` is returned as is (no copy) unless ``out`` is given; a 4-bit
    one is dequantized into a new buffer, or into ``out``: an (out, in) tensor with contiguous rows
    such as a row block of a stacked weight or the leading columns of a wider one. The caller frees
    the buffer right after its GEMM.
    """
    w = linear.weight
    state = getattr(w, "quant_state", None)
    if state is None:
        if out is not None:
            return out.copy_(w)
        return w if w.dtype == dtype else w.to(dtype)
    import bitsandbytes as bnb

    from ..loading import ensure_not_repacked

    ensure_not_repacked(w)
    if _triton_nf4(w, state, dtype) and (out is None or (out.dtype == dtype and out.stride(1) == 1)):
        from .nf4_kernel import dequantize_nf4

        return dequantize_nf4(w.data, state, out=out)
    if out is not None and out.dtype == state.dtype and w.is_cuda and out.is_contiguous():  # no CPU kernel for .out
        return bnb.functional.dequantize_4bit(w.data, state, out=out)
    full = bnb.functional.dequantize_4bit(w.data, state)
    if out is not None:
        return out.copy_(full)
    return full if full.dtype == dtype else full.to(dtype)


def stacked(linears, dtype: torch.dtype, extra_cols: int = 0) -> torch.Tensor:
    """Weights of linears sharing one input, stacked along the output dim: (Σ out, in) in ``dtype``,
    or (Σ out, in + extra_cols) with the extra columns left for the caller to fill.

    One GEMM against the stack replaces one per projection (q, k, v → one; gate, up → one).
    """
    if len(linears) == 1 and not extra_cols:
        return dequantize(linears[0], dtype)
    rows = [lin.out_features for lin in linears]
    ref = linears[0].weight
    cols = linears[0].in_features
    w = torch.empty(sum(rows), cols + extra_cols, dtype=dtype, device=ref.device)
    start = 0
    for lin, n in zip(linears, rows):
        dequantize(lin, dtype, out=w[start:start + n, :cols])
        start += n
    return w
