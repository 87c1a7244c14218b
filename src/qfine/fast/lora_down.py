"""The LoRA down-products of a decode step, x Aᵢᵀ for the (up to three) adapters that read one input (q, k,
v; gate, up; o; down) in one launch, and optionally the RMSNorm that makes that input. CUDA only (Triton; on
the CPU under Triton's interpreter, which the tests use).

At batch 1 a product reads a few hundred KiB of A (r × k fp32 per adapter) for one row of x: one program per
output would leave most of the GPU idle, so :func:`_row_kernel` splits k over many programs, each taking one
chunk of k for every output; the last program to finish adds the fp32 partials. With the norm, every program
computes the row's RMS statistics itself (the row is a few KiB) and writes its own chunk of the normalised
row, which the 4-bit kernels then read: one launch in place of the norm's and the products'.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qfine.fast.gemv_rows import _counter
from qfine.fast.mma_kernel import triton_launch

TILE = 8192  # fp32 values a program holds at once (64 a thread of 4 warps)


@triton.jit
def _kernel(x, a0, a1, a2, out, m, k: tl.constexpr, stride_xm, r0, r1, r_all, BLOCK_M: tl.constexpr,
            BLOCK_K: tl.constexpr, EARLY: tl.constexpr):
    """Column j of out (m, r_all) = x (m, k) · row j of [A0; A1; A2] (fp32 products and sum). EARLY: launched
    as a programmatic dependent launch (:data:`qfine.fast.mma_kernel.EARLY`): it lets the 4-bit kernel after
    it start now, and waits for the kernel before it before reading x or writing."""
    if EARLY:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
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


@triton.jit
def _row_kernel(x, norm_w, x_out, eps, a0, a1, a2, part, out, counter, k: tl.constexpr, r0, r1, r_all,
                CHUNK: tl.constexpr, SPLIT: tl.constexpr, SPLIT_P: tl.constexpr, BLOCK_R: tl.constexpr,
                NORM: tl.constexpr, K_P: tl.constexpr, EARLY: tl.constexpr):
    """One row: out (r_all,) = [A0; A1; A2] xₙ over k, program s taking k chunk s for every output, its fp32
    partial written to part[s]; the last program to finish (counted in ``counter``, which it resets) reads
    all SPLIT partials in one (SPLIT_P, BLOCK_R) load, adds them and rounds once. NORM: xₙ = norm_w ·
    round(x · rstd), rstd = 1/√(mean(x²) + eps) over the whole row in fp32 (Llama's RMSNorm, rounded as its
    module rounds), each program writing its chunk of xₙ to x_out; else xₙ = x. EARLY: as for :func:`_kernel`,
    the chunk of A (the bulk of the program's reads) and of norm_w requested before the wait."""
    if EARLY:
        tl.extra.cuda.gdc_launch_dependents()
    s = tl.program_id(0)
    rj = tl.arange(0, BLOCK_R)
    ok = rj < r_all
    row = tl.where(rj < r0, a0 + rj * k, tl.where(rj < r0 + r1, a1 + (rj - r0) * k, a2 + (rj - r0 - r1) * k))
    rk = s * CHUNK + tl.arange(0, CHUNK)
    a = tl.load(row[:, None] + rk[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
    if NORM:  # the norm's weights too: no kernel of the step writes them
        nw = tl.load(norm_w + rk).to(tl.float32)
    if EARLY:
        tl.extra.cuda.gdc_wait()
    xs = tl.load(x + rk)
    if NORM:
        rf = tl.arange(0, K_P)
        whole = tl.load(x + rf, mask=rf < k, other=0.0).to(tl.float32)
        rstd = tl.rsqrt(tl.sum(whole * whole, 0) / k + eps)
        normed = (xs.to(tl.float32) * rstd).to(x.dtype.element_ty)
        xs = (nw * normed.to(tl.float32)).to(x.dtype.element_ty)
        tl.store(x_out + rk, xs)
    tl.store(part + s * r_all + rj, tl.sum(a * xs.to(tl.float32)[None, :], 1), mask=ok)
    # release this partial, acquire the others' (read past L1: other programs wrote them)
    if tl.atomic_add(counter, 1, sem="acq_rel") == SPLIT - 1:
        rs = tl.arange(0, SPLIT_P)
        parts = tl.load(part + rs[:, None] * r_all + rj[None, :], mask=(rs < SPLIT)[:, None] & ok[None, :],
                        other=0.0, cache_modifier=".cg")
        tl.store(out + rj, tl.sum(parts, 0).to(out.dtype.element_ty), mask=ok)
        tl.atomic_xchg(counter, 0)


def _split(m: int, k: int, block_r: int) -> int | None:
    """The chunk of k a program of :func:`_row_kernel` takes for this product, or None where that kernel does
    not serve it (more than one row, k not whole chunks, or more partials than one load holds)."""
    # a (BLOCK_R, CHUNK) tile of A, and no more than k
    chunk = min(max(32, min(256 if k > 4096 else 128, TILE // block_r)), triton.next_power_of_2(k))
    if m != 1 or k % chunk or triton.next_power_of_2(k // chunk) * block_r > TILE:
        return None
    return chunk


def lora_down(x: torch.Tensor, mats: list[torch.Tensor], norm: tuple | None = None):
    """x (..., k) @ Aᵢᵀ for up to three adapter matrices Aᵢ (rᵢ, k) of one dtype, in one launch: views
    (rows, rᵢ) of one (rows, Σrᵢ) output in A's dtype, each x.to(A.dtype) @ Aᵢᵀ computed in fp32 and rounded
    once (what peft's lora_A gives up to the order of the sum). One row (a decode step at batch 1) is split
    along k over many programs (:func:`_row_kernel`).

    ``norm``: (weight (k,), eps) of a Llama-style RMSNorm applied to x first, in the same launch; then
    returns (views, normalised x) — or None where the launch cannot serve it (more than one row, or k not
    whole chunks), for the caller to run the norm itself."""
    k = x.shape[-1]
    x2 = x.reshape(-1, k)
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    ranks = [a.shape[0] for a in mats]
    total = sum(ranks)
    block_r = max(16, triton.next_power_of_2(total))
    chunk = _split(m, k, block_r)
    # every program of the norm reads the whole row
    counter = None if chunk is None or (norm is not None and k > TILE) else _counter(x.device, 1)
    if norm is not None and counter is None:
        return None
    out = torch.empty(m, total, dtype=mats[0].dtype, device=x.device)
    a = [t if t.is_contiguous() else t.contiguous() for t in mats] + [mats[0]] * (3 - len(mats))
    r = ranks + [0] * (3 - len(ranks))
    x_out = torch.empty_like(x2) if norm is not None else x2
    launch = triton_launch(x.device)
    if counter is not None:
        split = k // chunk
        part = torch.empty(split, total, dtype=torch.float32, device=x.device)
        weight, eps = norm if norm is not None else (x2, 0.0)
        _row_kernel[(split,)](x2, weight, x_out, float(eps), a[0], a[1], a[2], part, out, counter, k, r[0], r[1],
                              total, CHUNK=chunk, SPLIT=split, SPLIT_P=triton.next_power_of_2(split),
                              BLOCK_R=block_r, NORM=norm is not None, K_P=triton.next_power_of_2(k), **launch)
    else:
        block_m = triton.next_power_of_2(max(m, 1))
        _kernel[(total,)](x2, a[0], a[1], a[2], out, m, k, x2.stride(0), r[0], r[1], total, BLOCK_M=block_m,
                          BLOCK_K=max(32, 2048 // block_m), **launch)
    views, start = [], 0
    for rank in ranks:
        views.append(out[:, start:start + rank])
        start += rank
    return views if norm is None else (views, x_out.view(x.shape))
