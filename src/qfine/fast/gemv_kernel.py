"""A 4-bit (bitsandbytes NF4/FP4, double quantization included) matrix product for a few rows: the decode
step's y = x Wᵀ with x (m ≤ 64, k), W (n, k) packed, read once. CUDA only (Triton).

At decode time a projection multiplies 1 to 64 token vectors (a batch of sequences, one token each) by a
weight read from memory, so its cost is the bytes of W: 0.5 per weight here against 2 for a dequantized bf16
copy, which bitsandbytes' ``matmul_4bit`` writes and reads again for more than one row. Each program reads
(BLOCK_N, BLOCK_K) tiles of packed codes (two per byte, high nibble first, row-major as bitsandbytes stores
them), maps each byte through a 256-entry table of its two code-book values (one 8-byte gather per byte), scales
each block of BLOCKSIZE weights by its absmax (with double quantization: code8[q8]·absmax2 + offset, in fp32
as bitsandbytes computes it), rounds the weights to the activation dtype — the values bitsandbytes'
dequantization gives — and accumulates the products in fp32: on tensor cores for 16 to 64 rows (padded to a
power of two), as fp32 multiply-adds for one row.

A weight too narrow to give every SM a few programs splits its k range over programs; their partial sums
(split, m, n) fp32 are added in a fixed order by a second small kernel, so the result never depends on
scheduling. The epilogue adds, in fp32 before the one rounding, the adapter's s·(x Aᵀ)Bᵀ, and optionally a
residual after it (``residual + round(y)``, rounded again: what ``h + o(x)`` gives in the activation dtype).

The reference is dequantize-then-matmul (``tests/test_engine.py``).
"""

from __future__ import annotations

import os
import weakref

import torch
import triton
import triton.language as tl

MAX_ROWS = 64
# Triton's CPU interpreter (the tests' way to run these kernels without a GPU) computes fp32 dots exactly;
# on a GPU they would be TF32, so there only 16-bit activations are taken
_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
_DTYPES = (torch.float16, torch.bfloat16) + ((torch.float32,) if _INTERPRETED else ())


@triton.jit
def _weights(packed, pairs, absmax_q, code8, absmax2, offset, rn, n_ok, k0, k_end, k, dtype: tl.constexpr,
             BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, NESTED: tl.constexpr, BLOCK_N: tl.constexpr,
             BLOCK_K: tl.constexpr):
    """W[rn, k0 : k0 + BLOCK_K] dequantized, (BLOCK_N, BLOCK_K) in ``dtype``; zero past k_end or n."""
    rb = k0 // 2 + tl.arange(0, BLOCK_K // 2)
    row_bytes = (rn.to(tl.int64) * k) // 2
    byte = tl.load(packed + row_bytes[:, None] + rb[None, :], mask=n_ok[:, None] & (rb[None, :] < k_end // 2),
                   other=0).to(tl.int32)
    # (BLOCK_N, BLOCK_K // 2, 2) code values, high nibble first: weights k0 .. k0 + BLOCK_K of each row
    w = tl.load(pairs + byte[:, :, None] * 2 + tl.arange(0, 2)[None, None, :])
    w = tl.reshape(w, (BLOCK_N, BLOCK_K))
    kb = k0 + tl.arange(0, BLOCK_K // BLOCKSIZE) * BLOCKSIZE  # first weight of each absmax block
    blk = (rn.to(tl.int64)[:, None] * k + kb[None, :]) // BLOCKSIZE
    blk_ok = n_ok[:, None] & (kb[None, :] < k_end)  # a last k split's tiles may run past the row's end
    if NESTED:
        q8 = tl.load(absmax_q + blk, mask=blk_ok, other=0).to(tl.int32)
        amax = tl.load(code8 + q8) * tl.load(absmax2 + blk // BLOCKSIZE2, mask=blk_ok, other=0.0)
        amax = amax + tl.load(offset)
    else:
        amax = tl.load(absmax_q + blk, mask=blk_ok, other=0.0)
    w = tl.reshape(w, (BLOCK_N, BLOCK_K // BLOCKSIZE, BLOCKSIZE)) * amax[:, :, None]
    rk = k0 + tl.arange(0, BLOCK_K)
    return tl.where(rk[None, :] < k_end, tl.reshape(w, (BLOCK_N, BLOCK_K)), 0.0).to(dtype)


@triton.jit
def _gemv4_kernel(x, packed, pairs, absmax_q, code8, absmax2, offset, out, res, m, n, k, k_per_split: tl.constexpr,
                  stride_xm, xa, stride_xa, lora_b, scale, r, BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr,
                  NESTED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                  LORA: tl.constexpr, BLOCK_R: tl.constexpr, SPLIT: tl.constexpr, RESIDUAL: tl.constexpr):
    pid_n, pid_k = tl.program_id(0), tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.arange(0, BLOCK_M)
    n_ok = rn < n
    dtype = x.dtype.element_ty
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, k)
    if BLOCK_M == 1:
        wide = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kk in range(0, k_per_split, BLOCK_K):
        k0 = k_start + kk
        w = _weights(packed, pairs, absmax_q, code8, absmax2, offset, rn, n_ok, k0, k_end, k, dtype, BLOCKSIZE,
                     BLOCKSIZE2, NESTED, BLOCK_N, BLOCK_K)
        rk = k0 + tl.arange(0, BLOCK_K)
        if BLOCK_M == 1:  # one row: exact fp32 products (bf16·bf16 fits fp32), summed at the end
            xs = tl.load(x + rk, mask=rk < k_end, other=0.0)
            wide += w.to(tl.float32) * xs.to(tl.float32)[None, :]
        else:
            xs = tl.load(x + rm[:, None] * stride_xm + rk[None, :], mask=(rm[:, None] < m) & (rk[None, :] < k_end),
                         other=0.0)
            acc += tl.dot(xs, tl.trans(w))
    if BLOCK_M == 1:
        acc = tl.reshape(tl.sum(wide, 1), (1, BLOCK_N))
    if LORA:
        if pid_k == 0:  # the adapter's s·(x Aᵀ) Bᵀ, in fp32, added once (by the first k split)
            rr = tl.arange(0, BLOCK_R)
            xar = tl.load(xa + rm[:, None] * stride_xa + rr[None, :], mask=(rm[:, None] < m) & (rr[None, :] < r),
                          other=0.0).to(tl.float32)
            br = tl.load(lora_b + rn[:, None] * r + rr[None, :], mask=n_ok[:, None] & (rr[None, :] < r),
                         other=0.0).to(tl.float32)
            if BLOCK_M == 1:
                acc += tl.reshape(tl.sum(br * xar, 1), (1, BLOCK_N)) * scale
            else:
                acc += tl.dot(xar, tl.trans(br), input_precision="ieee") * scale
    ok = (rm[:, None] < m) & n_ok[None, :]
    if SPLIT == 1:
        y = acc.to(dtype)
        if RESIDUAL:
            y = (tl.load(res + rm[:, None] * n + rn[None, :], mask=ok, other=0.0).to(tl.float32)
                 + y.to(tl.float32)).to(dtype)
        tl.store(out + rm[:, None] * n + rn[None, :], y, mask=ok)
    else:
        tl.store(out + pid_k.to(tl.int64) * m * n + rm[:, None] * n + rn[None, :], acc, mask=ok)


@triton.jit
def _sum_splits_kernel(part, out, res, size, SPLIT: tl.constexpr, RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    """out = round(Σ_s part[s]) (+ residual, rounded again), the splits added in order 0, 1, …"""
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = i < size
    total = tl.load(part + i, mask=ok, other=0.0)
    for s in range(1, SPLIT):
        total += tl.load(part + s * size + i, mask=ok, other=0.0)
    y = total.to(out.dtype.element_ty)
    if RESIDUAL:
        y = (tl.load(res + i, mask=ok, other=0.0).to(tl.float32) + y.to(tl.float32)).to(out.dtype.element_ty)
    tl.store(out + i, y, mask=ok)


def usable(weight, x: torch.Tensor) -> bool:
    """Whether :func:`matmul_4bit` takes this bitsandbytes 4-bit weight and input: CUDA (or Triton's
    interpreter), at most :data:`MAX_ROWS` rows, 16-bit activations (fp32 too when interpreted), rows a
    whole number of absmax blocks, block size 64..128."""
    state = getattr(weight, "quant_state", None)
    if state is None or not (x.is_cuda or _INTERPRETED) or x.dtype not in _DTYPES:
        return False
    rows = x.numel() // x.shape[-1]
    n, k = state.shape
    return (rows <= MAX_ROWS and state.blocksize in (64, 128) and k % state.blocksize == 0
            and x.shape[-1] == k and weight.device == x.device)


_PAIRS: dict[int, tuple] = {}  # id(quant state) -> (weak reference to it, table); states are unhashable


def _pairs(state) -> torch.Tensor:
    """(512,) fp32 for a quant state: for each packed byte b, code[b >> 4] then code[b & 15] (its two
    weights in order, read by one 8-byte load). Built once per state (on its first, uncaptured call), so
    a CUDA graph replays the same table."""
    ref, table = _PAIRS.get(id(state), (None, None))
    if ref is None or ref() is not state:
        for key in [key for key, (r, _) in _PAIRS.items() if r() is None]:
            del _PAIRS[key]
        code, byte = state.code.float(), torch.arange(256, device=state.code.device)
        table = torch.stack([code[byte >> 4], code[byte & 15]], 1).reshape(512)
        _PAIRS[id(state)] = (weakref.ref(state), table)
    return table


def _sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 8


def launch_config(m: int, n: int, k: int, sms: int) -> dict:
    """Tile sizes, k splits and warps for an (m ≤ 64, k) × (n, k)ᵀ product: column tiles of 32 (16 when
    that alone does not give every SM two programs), k tiles of 256, and k split until there are about
    4 programs per SM with at least 1,024 weights of k per program."""
    block_n = 32 if triton.cdiv(n, 32) >= 2 * sms else 16
    block_k = 256 if m <= 16 else 128
    tiles = triton.cdiv(n, block_n)
    split = max(1, min(triton.cdiv(4 * sms, tiles), k // 1024))
    return {"BLOCK_N": block_n, "BLOCK_K": block_k, "SPLIT": split, "num_warps": 4}


def matmul_4bit(x: torch.Tensor, weight, lora: tuple | None = None, residual: torch.Tensor | None = None,
                config: dict | None = None) -> torch.Tensor:
    """x (..., k) @ Wᵀ for a bitsandbytes ``Params4bit`` W (n, k): (..., n) in x's dtype; with ``lora`` =
    (xa (rows, r), B (n, r), s), plus s · xa Bᵀ, accumulated in fp32 with the product before the one
    rounding to x's dtype (xa = x Aᵀ, computed by the caller in the adapter's dtype); with ``residual``
    (..., n) in x's dtype, residual + that rounded product, rounded again. ``config``: see
    :func:`launch_config` (its choice when None).

    Requires :func:`usable`. Capturable in a CUDA graph (no host synchronisation, fixed launch shape)."""
    state = weight.quant_state
    n, k = state.shape
    x2 = x.reshape(-1, k)
    if x2.stride(1) != 1 or (x2.shape[0] == 1 and not x2.is_contiguous()):
        x2 = x2.contiguous()
    m = x2.shape[0]
    cfg = config or launch_config(m, n, k, _sms(x.device))
    block_k = cfg["BLOCK_K"]
    per = triton.cdiv(triton.cdiv(k, cfg["SPLIT"]), block_k) * block_k
    split = triton.cdiv(k, per)
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    part = out if split == 1 else torch.empty(split, m, n, dtype=torch.float32, device=x.device)
    res = out
    if residual is not None:
        res = residual.reshape(m, n)
        res = res if res.is_contiguous() else res.contiguous()
    nested = bool(state.nested)
    code8 = state.state2.code if nested else state.code
    absmax2 = state.state2.absmax if nested else state.absmax
    offset = state.offset if nested else state.absmax
    blocksize2 = state.state2.blocksize if nested else 256
    xa, lora_b, scale = lora if lora is not None else (x2, x2, 0.0)
    r = xa.shape[-1] if lora is not None else 1
    if lora is not None:
        xa = xa.reshape(m, r)
        xa, lora_b = (xa if xa.stride(1) == 1 else xa.contiguous()), lora_b.contiguous()
    block_m = 1 if m == 1 else max(16, triton.next_power_of_2(m))
    _gemv4_kernel[(triton.cdiv(n, cfg["BLOCK_N"]), split)](
        x2, weight.data, _pairs(state), state.absmax, code8, absmax2, offset, part, res, m, n, k, per,
        x2.stride(0), xa, xa.stride(0), lora_b, float(scale), r, BLOCKSIZE=state.blocksize, BLOCKSIZE2=blocksize2,
        NESTED=nested, BLOCK_M=block_m, BLOCK_N=cfg["BLOCK_N"], BLOCK_K=block_k, LORA=lora is not None,
        BLOCK_R=max(16, triton.next_power_of_2(r)), SPLIT=split, RESIDUAL=residual is not None,
        num_warps=cfg["num_warps"])
    if split > 1:
        block = 1024
        _sum_splits_kernel[(triton.cdiv(m * n, block),)](part, out, res, m * n, SPLIT=split,
                                                         RESIDUAL=residual is not None, BLOCK=block)
    return out.reshape(*x.shape[:-1], n)


@triton.jit
def _lora_down_kernel(x, a0, a1, a2, out, m, k: tl.constexpr, stride_xm, r0, r1, r_all, BLOCK_M: tl.constexpr,
                      BLOCK_K: tl.constexpr):
    """Column j of out (m, r_all) = x (m, k) · row j of [A0; A1; A2] (fp32 products and sum)."""
    j = tl.program_id(0)
    if j < r0:
        row = a0 + j * k
    elif j < r0 + r1:
        row = a1 + (j - r0) * k
    else:
        row = a2 + (j - r0 - r1) * k
    rm = tl.arange(0, BLOCK_M)
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for k0 in range(0, k, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(row + rk, mask=rk < k, other=0.0).to(tl.float32)
        xs = tl.load(x + rm[:, None] * stride_xm + rk[None, :], mask=(rm[:, None] < m) & (rk[None, :] < k),
                     other=0.0).to(tl.float32)
        acc += xs * a[None, :]
    tl.store(out + rm * r_all + j, tl.sum(acc, 1).to(out.dtype.element_ty), mask=rm < m)


def lora_down(x: torch.Tensor, mats: list[torch.Tensor]) -> list[torch.Tensor]:
    """x (..., k) @ Aᵢᵀ for up to three adapter matrices Aᵢ (rᵢ, k) of one dtype, in one launch: views
    (rows, rᵢ) of one (rows, Σrᵢ) output in A's dtype, each x.to(A.dtype) @ Aᵢᵀ computed in fp32 and rounded
    once (what peft's lora_A gives up to the order of the sum). For at most :data:`MAX_ROWS` rows."""
    k = x.shape[-1]
    x2 = x.reshape(-1, k)
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    ranks = [a.shape[0] for a in mats]
    total = sum(ranks)
    out = torch.empty(m, total, dtype=mats[0].dtype, device=x.device)
    a = [t if t.is_contiguous() else t.contiguous() for t in mats] + [mats[0]] * (3 - len(mats))
    r = ranks + [0] * (3 - len(ranks))
    block_m = triton.next_power_of_2(max(m, 1))
    _lora_down_kernel[(total,)](x2, a[0], a[1], a[2], out, m, k, x2.stride(0), r[0], r[1], total, BLOCK_M=block_m,
                                BLOCK_K=max(32, 2048 // block_m), num_warps=4)
    views, start = [], 0
    for rank in ranks:
        views.append(out[:, start:start + rank])
        start += rank
    return views
