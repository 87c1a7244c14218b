"""One-launch NF4 dequantization (double quantization included) as a Triton kernel. CUDA only.

bitsandbytes dequantizes a double-quantized NF4 weight in three launches: the 8-bit absmax codes
through their own blockwise table, ``+= offset``, then the 4-bit codes. Here one kernel reads each
packed byte (two 4-bit codes, high nibble first), its block's 8-bit absmax code, the second-level
absmax and the offset, and writes both 16-bit values — every input byte read once, every output
written once. Arithmetic as bitsandbytes does it, in fp32: absmax = code8[q8]·absmax2 + offset,
w = nf4[q4]·absmax, rounded once to the output dtype. The reference is bitsandbytes'
``dequantize_4bit`` (``tests/test_gpu_fast.py`` compares them).

The output may be the leading columns of a wider row-major buffer (row stride ``ld`` ≥ columns): the
fused LoRA layers dequantize W straight into [W | B] (lora.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_BYTES_PER_PROGRAM = 2048  # 4096 outputs per program


@triton.jit
def _nf4_kernel(packed, code4, absmax_q, code8, absmax2, offset, out, n_bytes, cols, ld,
                BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, NESTED: tl.constexpr, BYTES: tl.constexpr,
                DENSE: tl.constexpr):
    pid = tl.program_id(0)
    idx = pid.to(tl.int64) * BYTES + tl.arange(0, BYTES)
    mask = idx < n_bytes
    byte = tl.load(packed + idx, mask=mask, other=0).to(tl.int32)
    block = (idx * 2) // BLOCKSIZE  # both codes of a byte share a block (BLOCKSIZE is even)
    if NESTED:
        q8 = tl.load(absmax_q + block, mask=mask, other=0).to(tl.int32)
        scale2 = tl.load(absmax2 + block // BLOCKSIZE2, mask=mask, other=0.0)
        amax = tl.load(code8 + q8, mask=mask, other=0.0) * scale2
        amax = amax + tl.load(offset)
    else:
        amax = tl.load(absmax_q + block, mask=mask, other=0.0)
    hi = tl.load(code4 + (byte >> 4), mask=mask, other=0.0) * amax
    lo = tl.load(code4 + (byte & 15), mask=mask, other=0.0) * amax
    vals = tl.interleave(hi, lo).to(out.dtype.element_ty)
    o = pid.to(tl.int64) * (2 * BYTES) + tl.arange(0, 2 * BYTES)  # logical (row-major, dense) index
    if DENSE:
        addr = o
    else:
        row = o // cols
        addr = row * ld + (o - row * cols)
    tl.store(out + addr, vals, mask=o < 2 * n_bytes)


def dequantize_nf4(data: torch.Tensor, state, out: torch.Tensor | None = None) -> torch.Tensor:
    """The (out_features, in_features) weight of bitsandbytes NF4 ``data`` (packed uint8) with its
    ``QuantState``, in ``state.dtype``; into ``out`` if given: that shape and dtype, rows contiguous
    (``out.stride(1) == 1``), row stride ≥ in_features (a view of a wider buffer is fine)."""
    rows, cols = state.shape
    if out is None:
        out = torch.empty(rows, cols, dtype=state.dtype, device=data.device)
    assert out.shape == (rows, cols) and out.stride(1) == 1 and out.stride(0) >= cols, "out: rows must be contiguous"
    n_bytes = rows * cols // 2
    nested = bool(state.nested)
    if nested:
        s2 = state.state2
        args = (state.absmax, s2.code, s2.absmax, state.offset)
        blocksize2 = s2.blocksize
    else:
        args = (state.absmax, state.absmax, state.absmax, state.absmax)  # unused pointers
        blocksize2 = 1
    grid = (triton.cdiv(n_bytes, _BYTES_PER_PROGRAM),)
    ld = out.stride(0)
    _nf4_kernel[grid](data, state.code, *args, out, n_bytes, cols, ld, BLOCKSIZE=state.blocksize,
                      BLOCKSIZE2=blocksize2, NESTED=nested, BYTES=_BYTES_PER_PROGRAM, DENSE=ld == cols)
    return out
