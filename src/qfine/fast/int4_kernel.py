"""One-launch dequantization of :class:`qfine.quant.int4.Int4Linear` weights as a Triton kernel. CUDA only.

The storage is group-wise asymmetric INT4 (GGUF Q4_1's x = d·q + m): codes (out, in/2) uint8 with
column 2k in the low nibble and 2k+1 in the high one, scales d and minimums m (out, in/L) fp32. One
program reads 2048 packed bytes, each byte's group scale and minimum (both columns of a byte share a
group: L is even), and writes 4096 values, computed in fp32 and rounded once to the output dtype, as
:func:`qfine.quant.int4.dequantize_groups` (the reference, compared in ``tests/test_gpu_fast.py``) does.

As for NF4 (:mod:`.nf4_kernel`) the output may be the leading columns of a wider row-major buffer, so
the fused LoRA layers dequantize W straight into [W | B].
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_BYTES_PER_PROGRAM = 2048


@triton.jit
def _int4_kernel(codes, scales, mins, out, n_bytes, cols, ld, GROUP: tl.constexpr, BYTES: tl.constexpr,
                 DENSE: tl.constexpr):
    pid = tl.program_id(0)
    idx = pid.to(tl.int64) * BYTES + tl.arange(0, BYTES)
    mask = idx < n_bytes
    byte = tl.load(codes + idx, mask=mask, other=0).to(tl.int32)
    first = idx * 2                      # logical index of the byte's even column
    row = first // cols
    group = row * (cols // GROUP) + (first - row * cols) // GROUP
    d = tl.load(scales + group, mask=mask, other=0.0)
    m = tl.load(mins + group, mask=mask, other=0.0)
    lo = (byte & 15).to(tl.float32) * d + m
    hi = (byte >> 4).to(tl.float32) * d + m
    vals = tl.interleave(lo, hi).to(out.dtype.element_ty)
    o = pid.to(tl.int64) * (2 * BYTES) + tl.arange(0, 2 * BYTES)
    if DENSE:
        addr = o
    else:
        r = o // cols
        addr = r * ld + (o - r * cols)
    tl.store(out + addr, vals, mask=o < 2 * n_bytes)


def dequantize_int4(codes: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, dtype: torch.dtype,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """The (out_features, in_features) weight in ``dtype`` from contiguous codes/scales/minimums (the
    :class:`~qfine.quant.int4.Int4Linear` buffers); into ``out`` if given: that shape and dtype, rows
    contiguous, row stride ≥ in_features."""
    rows, cols = codes.shape[0], codes.shape[1] * 2
    group = cols // scales.shape[1]
    if out is None:
        out = torch.empty(rows, cols, dtype=dtype, device=codes.device)
    assert out.shape == (rows, cols) and out.stride(1) == 1 and out.stride(0) >= cols, "out: rows must be contiguous"
    assert codes.is_contiguous() and scales.is_contiguous() and mins.is_contiguous()
    n_bytes = rows * cols // 2
    grid = (triton.cdiv(n_bytes, _BYTES_PER_PROGRAM),)
    ld = out.stride(0)
    _int4_kernel[grid](codes, scales, mins, out, n_bytes, cols, ld, GROUP=group, BYTES=_BYTES_PER_PROGRAM,
                       DENSE=ld == cols)
    return out
