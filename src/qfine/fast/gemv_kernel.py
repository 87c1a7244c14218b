"""A 4-bit (bitsandbytes NF4/FP4, double quantization included) matrix product for a few rows: the decode
step's y = x Wᵀ with x (m ≤ 64, k), W (n, k) packed, read once. CUDA only (Triton).

At decode time a projection multiplies 1 to 64 token vectors (a batch of sequences, one token each) by a
weight read from memory, so its cost is the bytes of W: 0.5 per weight here against 2 for a dequantized bf16
copy, which bitsandbytes' ``matmul_4bit`` writes and reads again for more than one row. Each program reads a
(BLOCK_N, BLOCK_K) tile of packed codes (two per byte, high nibble first, row-major as bitsandbytes stores
them), maps them through the 16-entry code book, scales each block of BLOCKSIZE weights by its absmax (with
double quantization: code8[q8]·absmax2 + offset, in fp32 as bitsandbytes computes it), rounds the weights to
the activation dtype — the values bitsandbytes' dequantization gives — and accumulates the tile product in
fp32 (tensor cores, rows padded to 16, 32 or 64). The k range is split across programs so that even a
4096-row weight keeps every SM streaming; the partial sums (split, m, n) fp32 are added in a fixed order
after, so the result does not depend on scheduling.

The reference is dequantize-then-matmul (``tests/test_engine.py``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_ROWS = 64
_BLOCK_N, _BLOCK_K = 64, 128


@triton.jit
def _gemv4_kernel(x, packed, code4, absmax_q, code8, absmax2, offset, part, m, n, k, k_per_split: tl.constexpr,
                  stride_xm, xa, lora_b, scale, r, BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr,
                  NESTED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                  LORA: tl.constexpr, BLOCK_R: tl.constexpr):
    pid_n, pid_k = tl.program_id(0), tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.arange(0, BLOCK_M)
    n_ok = rn < n
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, k)
    row_bytes = (rn.to(tl.int64) * k) // 2  # byte offset of each weight row
    for kk in range(0, k_per_split, BLOCK_K):
        k0 = k_start + kk
        rb = k0 // 2 + tl.arange(0, BLOCK_K // 2)
        b_ok = n_ok[:, None] & (rb[None, :] < k_end // 2)
        byte = tl.load(packed + row_bytes[:, None] + rb[None, :], mask=b_ok, other=0).to(tl.int32)
        hi = tl.load(code4 + (byte >> 4))
        lo = tl.load(code4 + (byte & 15))
        w = tl.interleave(hi, lo)  # (BLOCK_N, BLOCK_K): weights k0 .. k0 + BLOCK_K of each row
        blk = (rn.to(tl.int64)[:, None] * k + k0 + tl.arange(0, BLOCK_K // BLOCKSIZE)[None, :] * BLOCKSIZE) // BLOCKSIZE
        blk_ok = n_ok[:, None]
        if NESTED:
            q8 = tl.load(absmax_q + blk, mask=blk_ok, other=0).to(tl.int32)
            amax = tl.load(code8 + q8) * tl.load(absmax2 + blk // BLOCKSIZE2, mask=blk_ok, other=0.0)
            amax = amax + tl.load(offset)
        else:
            amax = tl.load(absmax_q + blk, mask=blk_ok, other=0.0)
        w = tl.reshape(w, (BLOCK_N, BLOCK_K // BLOCKSIZE, BLOCKSIZE)) * amax[:, :, None]
        rk = k0 + tl.arange(0, BLOCK_K)
        w = tl.where(rk[None, :] < k_end, tl.reshape(w, (BLOCK_N, BLOCK_K)), 0.0).to(x.dtype.element_ty)
        xs = tl.load(x + rm[:, None] * stride_xm + rk[None, :], mask=(rm[:, None] < m) & (rk[None, :] < k_end),
                     other=0.0)
        acc += tl.dot(xs, tl.trans(w))
    if LORA:
        if pid_k == 0:  # the adapter's s·(x Aᵀ) Bᵀ, in fp32, added once (by the first k split)
            rr = tl.arange(0, BLOCK_R)
            xar = tl.load(xa + rm[:, None] * r + rr[None, :], mask=(rm[:, None] < m) & (rr[None, :] < r),
                          other=0.0).to(tl.float32)
            br = tl.load(lora_b + rn[:, None] * r + rr[None, :], mask=n_ok[:, None] & (rr[None, :] < r),
                         other=0.0).to(tl.float32)
            acc += tl.dot(xar, tl.trans(br), input_precision="ieee") * scale
    out = part + pid_k.to(tl.int64) * m * n + rm[:, None] * n + rn[None, :]
    tl.store(out, acc, mask=(rm[:, None] < m) & n_ok[None, :])


def usable(weight, x: torch.Tensor) -> bool:
    """Whether :func:`matmul_4bit` takes this bitsandbytes 4-bit weight and input: CUDA, at most
    :data:`MAX_ROWS` rows, 16-bit activations, rows a whole number of absmax blocks, block size 64..128."""
    state = getattr(weight, "quant_state", None)
    if state is None or not x.is_cuda or x.dtype not in (torch.float16, torch.bfloat16):
        return False
    rows = x.numel() // x.shape[-1]
    n, k = state.shape
    return (rows <= MAX_ROWS and state.blocksize in (64, 128) and k % state.blocksize == 0
            and x.shape[-1] == k and weight.device == x.device)


def _splits(n: int, k: int, device: torch.device) -> int:
    """Programs along k per column tile: enough that the grid covers every SM about 4 times over."""
    tiles = triton.cdiv(n, _BLOCK_N)
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    want = max(1, (4 * sms + tiles - 1) // tiles)
    return max(1, min(want, k // _BLOCK_K))


def matmul_4bit(x: torch.Tensor, weight, lora: tuple | None = None) -> torch.Tensor:
    """x (..., k) @ Wᵀ for a bitsandbytes ``Params4bit`` W (n, k): (..., n) in x's dtype; with ``lora`` =
    (xa (rows, r), B (n, r), s), plus s · xa Bᵀ, accumulated in fp32 with the product before the one
    rounding to x's dtype (xa = x Aᵀ, computed by the caller in the adapter's dtype).

    Requires :func:`usable`. Capturable in a CUDA graph (no host synchronisation, fixed launch shape)."""
    state = weight.quant_state
    n, k = state.shape
    x2 = x.reshape(-1, k)
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    splits = _splits(n, k, x.device)
    per = triton.cdiv(triton.cdiv(k, splits), _BLOCK_K) * _BLOCK_K
    splits = triton.cdiv(k, per)
    part = torch.empty(splits, m, n, dtype=torch.float32, device=x.device)
    nested = bool(state.nested)
    absmax_q = state.absmax
    code8 = state.state2.code if nested else state.code
    absmax2 = state.state2.absmax if nested else state.absmax
    offset = state.offset if nested else state.absmax
    blocksize2 = state.state2.blocksize if nested else 256
    xa, lora_b, scale = lora if lora is not None else (x2, x2, 0.0)
    r = xa.shape[-1] if lora is not None else 1
    if lora is not None:
        xa, lora_b = xa.reshape(m, r).contiguous(), lora_b.contiguous()
    _gemv4_kernel[(triton.cdiv(n, _BLOCK_N), splits)](
        x2, weight.data, state.code, absmax_q, code8, absmax2, offset, part, m, n, k, per, x2.stride(0), xa, lora_b,
        float(scale), r, BLOCKSIZE=state.blocksize, BLOCKSIZE2=blocksize2, NESTED=nested,
        BLOCK_M=max(16, triton.next_power_of_2(m)), BLOCK_N=_BLOCK_N, BLOCK_K=_BLOCK_K, LORA=lora is not None,
        BLOCK_R=max(16, triton.next_power_of_2(r)), num_warps=4)
    y = part[0] if splits == 1 else part.sum(0)
    return y.to(x.dtype).reshape(*x.shape[:-1], n)
