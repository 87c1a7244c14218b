"""LoRA dropout fused into the LoRA GEMMs, as Triton kernels. CUDA only.

The three products of an adapter group that see the dropped input drop(x) = keep · x / (1 − p)
(lora.py: ``_lora_in``, ``_lora_da``, ``_add_lora_dx``) run here without ever writing drop(x):

* :func:`lora_in`   xa[:, i]  = drop_i(x) A_iᵀ                       (T, N·r), x read once for all N
* :func:`lora_da`   dA_i      = (dy B_s)_iᵀ drop_i(x)                 (N·r, d) fp32, x read once
* :func:`add_lora_dx` dx     += Σ_i drop_i'((dy B_s)_i A_i)           in place, dx read and written once

Each of the N ≤ 3 adapters sharing the input (q, k, v; gate, up) has its own mask, the hash of
:func:`qfine.fast.ops.keep_mask` computed in uint32 (whose multiplies wrap as the reference's
``& 0xFFFFFFFF`` does, so the bits are the same as the CPU's). The unfused form on the GPU wrote each
dropped input and read it back, and ran the int64 hash three times per projection: ≈ 80 ms of an
8B step of 340 ms (docs/benchmarks.md, 2026-12-01).

Numerics: the dropped input is rounded to the compute dtype before its GEMM, as the reference does;
products accumulate in fp32 (fp32 inputs use IEEE products, not TF32). dA's partial sums over token
blocks are added in a fixed order (no atomics), so a step is reproducible bit for bit. The
reference is the plain PyTorch code in lora.py (``tests/test_dropout_kernel.py`` compares them).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl


@triton.jit
def _mix32(x):
    """ops._mix32 on uint32 values: two xor-shift-multiply rounds (the multiplies wrap mod 2³²), with
    ops._HASH_MUL (a mismatch fails the mask test in tests/test_dropout_kernel.py)."""
    x = ((x >> 16) ^ x) * 0x45D9F3B
    x = ((x >> 16) ^ x) * 0x45D9F3B
    return (x >> 16) ^ x


@triton.jit
def _row_hash(seeds, index, rows):
    """The per-row half of keep_mask: mix32(row ^ mix32(seed)) for int rows (BT,) → uint32 (BT,)."""
    seed = (tl.load(seeds + index) & 0xFFFFFFFF).to(tl.uint32)
    return _mix32(rows.to(tl.uint32) ^ _mix32(seed))


@triton.jit
def _dropped(v, rowh, cols, THR: tl.constexpr):
    """v (BT, BD) where keep_mask keeps the element, else 0 (v already scaled by 1 / (1 − p))."""
    h = _mix32(rowh[:, None] ^ cols.to(tl.uint32)[None, :])
    return tl.where(h.to(tl.int64) >= THR, v, 0.0)


@triton.jit
def _lora_in_kernel(x, ldx, a, seeds, part, T, D, S0, S1, S2, D_SPLIT: tl.constexpr,
                    N: tl.constexpr, R: tl.constexpr, BR: tl.constexpr, THR: tl.constexpr, SCALE: tl.constexpr,
                    BT: tl.constexpr, BD: tl.constexpr, PREC: tl.constexpr):
    """part[k, rows, i·R:(i+1)·R] = drop_i(x[rows, cols_k]) A_i[:, cols_k]ᵀ over the k-th slice of
    the input columns (the slices are summed afterwards, in order)."""
    pid_t, pid_k = tl.program_id(0), tl.program_id(1)
    rows = pid_t * BT + tl.arange(0, BT)
    rmask = rows < T
    rr = tl.arange(0, BR)
    h0 = _row_hash(seeds, S0, rows)
    acc0 = tl.zeros((BT, BR), tl.float32)
    if N > 1:
        h1 = _row_hash(seeds, S1, rows)
        acc1 = tl.zeros((BT, BR), tl.float32)
    if N > 2:
        h2 = _row_hash(seeds, S2, rows)
        acc2 = tl.zeros((BT, BR), tl.float32)
    for j in range(0, D_SPLIT, BD):  # the last piece masked past D
        cols = pid_k * D_SPLIT + j + tl.arange(0, BD)
        cmask = cols < D
        xt = tl.load(x + rows.to(tl.int64)[:, None] * ldx + cols[None, :], mask=rmask[:, None] & cmask[None, :],
                     other=0.0)
        xs = xt.to(tl.float32) * SCALE
        amask = (rr < R)[None, :] & cmask[:, None]
        at = tl.load(a + rr[None, :] * D + cols[:, None], mask=amask, other=0.0)  # A_0ᵀ tile (BD, BR)
        acc0 += tl.dot(_dropped(xs, h0, cols, THR).to(xt.dtype), at, input_precision=PREC)
        if N > 1:
            at = tl.load(a + (R + rr)[None, :] * D + cols[:, None], mask=amask, other=0.0)
            acc1 += tl.dot(_dropped(xs, h1, cols, THR).to(xt.dtype), at, input_precision=PREC)
        if N > 2:
            at = tl.load(a + (2 * R + rr)[None, :] * D + cols[:, None], mask=amask, other=0.0)
            acc2 += tl.dot(_dropped(xs, h2, cols, THR).to(xt.dtype), at, input_precision=PREC)
    out = part + pid_k * T * (N * R) + rows.to(tl.int64)[:, None] * (N * R) + rr[None, :]
    omask = rmask[:, None] & (rr < R)[None, :]
    tl.store(out, acc0, mask=omask)
    if N > 1:
        tl.store(out + R, acc1, mask=omask)
    if N > 2:
        tl.store(out + 2 * R, acc2, mask=omask)


@triton.jit
def _lora_da_kernel(g, ldg, x, ldx, seeds, part, T, D, S0, S1, S2, T_SPLIT: tl.constexpr,
                    N: tl.constexpr, R: tl.constexpr, BR: tl.constexpr, THR: tl.constexpr, SCALE: tl.constexpr,
                    BT: tl.constexpr, BD: tl.constexpr, PREC: tl.constexpr):
    """part[k, i·R:(i+1)·R, cols] = g_i[rows_k]ᵀ drop_i(x[rows_k, cols]) over the k-th slice of the
    tokens, g_i the i-th R columns of g = dy B_s."""
    pid_d, pid_k = tl.program_id(0), tl.program_id(1)
    cols = pid_d * BD + tl.arange(0, BD)
    cmask = cols < D
    rr = tl.arange(0, BR)
    acc0 = tl.zeros((BR, BD), tl.float32)
    if N > 1:
        acc1 = tl.zeros((BR, BD), tl.float32)
    if N > 2:
        acc2 = tl.zeros((BR, BD), tl.float32)
    for j in range(0, T_SPLIT, BT):  # the last piece masked past T
        rows = pid_k * T_SPLIT + j + tl.arange(0, BT)
        rmask = rows < T
        r64 = rows.to(tl.int64)[:, None]
        xt = tl.load(x + r64 * ldx + cols[None, :], mask=rmask[:, None] & cmask[None, :], other=0.0)
        xs = xt.to(tl.float32) * SCALE
        gmask = rmask[:, None] & (rr < R)[None, :]
        gt = tl.load(g + r64 * ldg + rr[None, :], mask=gmask, other=0.0)  # (BT, BR)
        xd = _dropped(xs, _row_hash(seeds, S0, rows), cols, THR).to(xt.dtype)
        acc0 += tl.dot(tl.trans(gt), xd, input_precision=PREC)
        if N > 1:
            gt = tl.load(g + r64 * ldg + (R + rr)[None, :], mask=gmask, other=0.0)
            xd = _dropped(xs, _row_hash(seeds, S1, rows), cols, THR).to(xt.dtype)
            acc1 += tl.dot(tl.trans(gt), xd, input_precision=PREC)
        if N > 2:
            gt = tl.load(g + r64 * ldg + (2 * R + rr)[None, :], mask=gmask, other=0.0)
            xd = _dropped(xs, _row_hash(seeds, S2, rows), cols, THR).to(xt.dtype)
            acc2 += tl.dot(tl.trans(gt), xd, input_precision=PREC)
    out = part + pid_k * (N * R) * D + rr[:, None] * D + cols[None, :]
    omask = (rr < R)[:, None] & cmask[None, :]
    tl.store(out, acc0, mask=omask)
    if N > 1:
        tl.store(out + R * D, acc1, mask=omask)
    if N > 2:
        tl.store(out + 2 * R * D, acc2, mask=omask)


@triton.jit
def _add_lora_dx_kernel(dx, lddx, g, ldg, a, seeds, T, D, S0, S1, S2,
                        N: tl.constexpr, R: tl.constexpr, BR: tl.constexpr, THR: tl.constexpr,
                        SCALE: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr, PREC: tl.constexpr):
    """dx[rows, cols] += Σ_i keep_i · (g_i A_i)[rows, cols] / (1 − p), in place."""
    pid_t, pid_d = tl.program_id(0), tl.program_id(1)
    rows = pid_t * BT + tl.arange(0, BT)
    cols = pid_d * BD + tl.arange(0, BD)
    rmask, cmask = rows < T, cols < D
    rr = tl.arange(0, BR)
    r64 = rows.to(tl.int64)[:, None]
    gmask = rmask[:, None] & (rr < R)[None, :]
    amask = (rr < R)[:, None] & cmask[None, :]
    gt = tl.load(g + r64 * ldg + rr[None, :], mask=gmask, other=0.0)
    at = tl.load(a + rr[:, None] * D + cols[None, :], mask=amask, other=0.0)
    acc = _dropped(tl.dot(gt, at, input_precision=PREC), _row_hash(seeds, S0, rows), cols, THR)
    if N > 1:
        gt = tl.load(g + r64 * ldg + (R + rr)[None, :], mask=gmask, other=0.0)
        at = tl.load(a + (R + rr)[:, None] * D + cols[None, :], mask=amask, other=0.0)
        acc += _dropped(tl.dot(gt, at, input_precision=PREC), _row_hash(seeds, S1, rows), cols, THR)
    if N > 2:
        gt = tl.load(g + r64 * ldg + (2 * R + rr)[None, :], mask=gmask, other=0.0)
        at = tl.load(a + (2 * R + rr)[:, None] * D + cols[None, :], mask=amask, other=0.0)
        acc += _dropped(tl.dot(gt, at, input_precision=PREC), _row_hash(seeds, S2, rows), cols, THR)
    ptr = dx + r64 * lddx + cols[None, :]
    xmask = rmask[:, None] & cmask[None, :]
    cur = tl.load(ptr, mask=xmask, other=0.0)
    tl.store(ptr, (cur.to(tl.float32) + acc * SCALE).to(cur.dtype), mask=xmask)


# --- launch ------------------------------------------------------------------------------------------

def _meta(adapters) -> tuple[int, int, float, list[int]]:
    """(N, r, p, seed indices) of a pack's adapters [(A_i, r slice, p, seed index)], which
    :func:`applies` has checked share one rank and one p."""
    n = len(adapters)
    r = adapters[0][0].shape[0]
    idx = [j for _, _, _, j in adapters] + [0] * (3 - n)
    return n, r, adapters[0][2], idx


def applies(x2d: torch.Tensor, a_all: torch.Tensor | None, adapters) -> bool:
    """Whether the kernels serve this pack (the caller has checked the device: CUDA, or Triton's CPU
    interpreter under TRITON_INTERPRET=1 for tests): 1–3 adapters with one rank ≤ 128 and one p > 0,
    stacked contiguously in ``a_all`` (N·r, d), inputs with unit column stride."""
    if a_all is None or not adapters or len(adapters) > 3:
        return False
    r, p = adapters[0][0].shape[0], adapters[0][2]
    same = all(ad[0].shape[0] == r and ad[2] == p for ad in adapters)
    return (same and 0 < p < 1 and r <= 128 and a_all.shape[0] == len(adapters) * r and a_all.is_contiguous()
            and x2d.stride(1) == 1 and x2d.dtype == a_all.dtype)


def _consts(p: float, r: int, dtype: torch.dtype) -> dict:
    return dict(BR=max(16, triton.next_power_of_2(r)), THR=int(round(p * 2**32)), SCALE=1.0 / (1.0 - p),
                PREC="ieee" if dtype == torch.float32 else None)


@functools.cache
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def _splits(blocks: int, length: int, step: int, device) -> tuple[int, int]:
    """(pieces, elements per piece, a multiple of ``step``) to give ≈ 2 programs per SM when
    ``blocks`` programs alone would leave SMs idle."""
    sms = _sm_count(device)
    pieces = max(1, min(triton.cdiv(2 * sms, max(blocks, 1)), triton.cdiv(length, step)))
    per = triton.cdiv(triton.cdiv(length, pieces), step) * step
    return triton.cdiv(length, per), per


def lora_in(x2d: torch.Tensor, a_all: torch.Tensor, seeds: torch.Tensor, adapters) -> torch.Tensor:
    """(T, N·r) in x's dtype: column block i is drop_i(x) A_iᵀ (drop_i: adapter i's mask)."""
    n, r, p, idx = _meta(adapters)
    t, d = x2d.shape
    bt, bd = 64, 64
    k, per = _splits(triton.cdiv(t, bt), d, bd, x2d.device)
    part = torch.empty(k, t, n * r, device=x2d.device, dtype=torch.float32)
    _lora_in_kernel[(triton.cdiv(t, bt), k)](x2d, x2d.stride(0), a_all, seeds, part, t, d, *idx, D_SPLIT=per, N=n, R=r,
                                             BT=bt, BD=bd, **_consts(p, r, x2d.dtype))
    return (part[0] if k == 1 else part.sum(0)).to(x2d.dtype)


def lora_da(g: torch.Tensor, x2d: torch.Tensor, seeds: torch.Tensor, adapters) -> torch.Tensor:
    """(N·r, d) fp32: row block i is g_iᵀ drop_i(x), g (T, N·r) = dy B_s (unit column stride)."""
    n, r, p, idx = _meta(adapters)
    t, d = x2d.shape
    bt, bd = 64, 64
    k, per = _splits(triton.cdiv(d, bd), t, bt, x2d.device)
    part = torch.empty(k, n * r, d, device=x2d.device, dtype=torch.float32)
    _lora_da_kernel[(triton.cdiv(d, bd), k)](g, g.stride(0), x2d, x2d.stride(0), seeds, part, t, d, *idx,
                                             T_SPLIT=per, N=n, R=r, BT=bt, BD=bd, **_consts(p, r, x2d.dtype))
    return part[0] if k == 1 else part.sum(0)


def add_lora_dx(dx: torch.Tensor, g: torch.Tensor, a_all: torch.Tensor, seeds: torch.Tensor, adapters) -> torch.Tensor:
    """dx (T, d) += Σ_i drop_i'(g_i A_i), in place (dx may be a view with row stride ≥ d); returns dx."""
    n, r, p, idx = _meta(adapters)
    t, d = dx.shape
    bt, bd = 64, 128
    _add_lora_dx_kernel[(triton.cdiv(t, bt), triton.cdiv(d, bd))](dx, dx.stride(0), g, g.stride(0), a_all, seeds, t,
                                                                  d, *idx, N=n, R=r, BT=bt, BD=bd,
                                                                  **_consts(p, r, dx.dtype))
    return dx
