"""Two 4-bit (bitsandbytes NF4/FP4) decode-step products that read one absmax block of each weight row per
inner step, chosen per shape by :mod:`qfine.fast.gemv_kernel`'s tuner:

- ``row``: one token row, y (1, n) = x Wᵀ on CUDA cores. Each program owns BLOCK_N weight rows and walks k
  in BLOCK_K steps, loading the next step's packed words before decoding this one's (``PREFETCH``), so a
  program keeps two loads in flight. Products are summed per absmax block and scaled once per block. A bf16
  x can be read as int32 pairs (``XPAIRS``: half the loads).
- ``tc``: 1 to 64 token rows on tensor cores with W as the left operand: acc (BLOCK_N, BLOCK_M) += (W_blk ·
  x_blkᵀ) · absmax, one absmax block (64 or 128 weights) per step. The scale is applied to the fp32 block
  product, not to every weight, so a weight is only decoded, never rescaled or re-rounded. One launch can
  serve two or three weights of one input (``GROUP``: q, k, v; gate, up), and k splits can be summed by each
  column tile's last program (``SERIAL``) instead of a second kernel.

Packed codes are read as int32 words (8 weights). Both kernels take the code book's values rounded to the
activation dtype (as bitsandbytes' own matrix-vector kernel holds them), either by a 16-entry gather or, on
CUDA (``PRMT``), with no memory access at all: the table's 32 bytes live in eight registers and byte
permutes (``prmt``) pick four codes' low and high bytes at once (:mod:`qfine.fast.prmt_decode`). Products
and sums are fp32; the adapter's s·(x Aᵀ)Bᵀ and the residual are added in the epilogue
(:func:`_round_out`, shared with :mod:`qfine.fast.gemv_kernel`'s tile kernel), and k splits not summed
serially are added in a fixed order by :func:`_sum_splits_kernel`.
"""

from __future__ import annotations

import weakref

import torch
import triton
import triton.language as tl

from qfine.fast import mma_kernel
from qfine.fast.prmt_decode import code_words, decode_asm

ASM_F32, ASM_PAIRS = decode_asm("f32"), decode_asm("pairs")


@triton.jit
def _round_out(acc, res, where, ok, dtype: tl.constexpr, RESIDUAL: tl.constexpr):
    """The fp32 ``acc`` rounded to ``dtype``; with RESIDUAL, res[where] + that, rounded again (what
    ``h + proj(x)`` gives in the activation dtype)."""
    y = acc.to(dtype)
    if RESIDUAL:
        y = (tl.load(res + where, mask=ok, other=0.0).to(tl.float32) + y.to(tl.float32)).to(dtype)
    return y


@triton.jit
def _sum_splits_kernel(part, out, res, size, SPLIT: tl.constexpr, RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    """out = round(Σ_s part[s]) (+ residual, rounded again), the splits added in order 0, 1, …"""
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = i < size
    total = tl.load(part + i, mask=ok, other=0.0)
    for s in range(1, SPLIT):
        total += tl.load(part + s * size + i, mask=ok, other=0.0)
    tl.store(out + i, _round_out(total, res, i, ok, out.dtype.element_ty, RESIDUAL), mask=ok)


@triton.jit
def _decode8(word, code, t0, t1, t2, t3, t4, t5, t6, t7, PRMT: tl.constexpr, ASM: tl.constexpr,
             F32: tl.constexpr):
    """The eight weights of each int32 ``word`` of packed codes (weight i sits at k offset i of the word) as
    eight tensors shaped like ``word``: code values in ``code``'s dtype, or in fp32 with ``F32``. With
    ``PRMT``, by byte permutes of the eight table words t0..t7 (:func:`qfine.fast.prmt_decode.code_words`,
    read once per program by the caller)."""
    if PRMT:
        if F32:
            w0, w1, w2, w3, w4, w5, w6, w7 = tl.inline_asm_elementwise(
                ASM, "=r,=r,=r,=r,=r,=r,=r,=r,r,r,r,r,r,r,r,r,r", [word, t0, t1, t2, t3, t4, t5, t6, t7],
                is_pure=True, pack=1,
                dtype=(tl.float32, tl.float32, tl.float32, tl.float32, tl.float32, tl.float32, tl.float32,
                       tl.float32))
        else:
            dt = code.dtype.element_ty
            w0, w1, w2, w3, w4, w5, w6, w7 = tl.inline_asm_elementwise(
                ASM, "=h,=h,=h,=h,=h,=h,=h,=h,r,r,r,r,r,r,r,r,r", [word, t0, t1, t2, t3, t4, t5, t6, t7],
                is_pure=True, pack=1, dtype=(dt, dt, dt, dt, dt, dt, dt, dt))
    else:  # byte j holds weight 2j in its high nibble, 2j + 1 in its low one
        w0 = tl.load(code + ((word >> 4) & 15))
        w1 = tl.load(code + (word & 15))
        w2 = tl.load(code + ((word >> 12) & 15))
        w3 = tl.load(code + ((word >> 8) & 15))
        w4 = tl.load(code + ((word >> 20) & 15))
        w5 = tl.load(code + ((word >> 16) & 15))
        w6 = tl.load(code + ((word >> 28) & 15))
        w7 = tl.load(code + ((word >> 24) & 15))
        if F32:
            w0, w1, w2, w3 = w0.to(tl.float32), w1.to(tl.float32), w2.to(tl.float32), w3.to(tl.float32)
            w4, w5, w6, w7 = w4.to(tl.float32), w5.to(tl.float32), w6.to(tl.float32), w7.to(tl.float32)
    return w0, w1, w2, w3, w4, w5, w6, w7


@triton.jit
def _decode_pairs(word, code, t0, t1, t2, t3, t4, t5, t6, t7, PRMT: tl.constexpr, ASM: tl.constexpr):
    """The weights of each int32 ``word`` as four pair tensors (word's shape, 2): pair j holds weights 2j and
    2j + 1, in the code book's dtype. With ``PRMT`` (:func:`qfine.fast.prmt_decode.decode_asm` "pairs") each
    pair is one register, filled by byte permutes."""
    if PRMT:
        dt = code.dtype.element_ty
        p0, p1, p2, p3 = tl.inline_asm_elementwise(
            ASM, "=r,=r,=r,=r,r,r,r,r,r,r,r,r,r,r,r,r,r,r,r,r,r,r",
            [tl.join(word, word), t0, t1, t2, t3, t4, t5, t6, t7], is_pure=True, pack=2, dtype=(dt, dt, dt, dt))
    else:
        w0, w1, w2, w3, w4, w5, w6, w7 = _decode8(word, code, t0, t1, t2, t3, t4, t5, t6, t7, False, "", False)
        p0, p1, p2, p3 = tl.join(w0, w1), tl.join(w2, w3), tl.join(w4, w5), tl.join(w6, w7)
    return p0, p1, p2, p3


@triton.jit
def _absmax(absmax_q, code8, absmax2, offset, blk, NESTED: tl.constexpr, BLOCKSIZE2: tl.constexpr):
    """The fp32 absmax of blocks ``blk`` (with double quantization: code8[q8]·absmax2 + offset, as
    bitsandbytes computes it)."""
    if NESTED:
        q8 = tl.load(absmax_q + blk).to(tl.int32)
        amax = tl.load(code8 + q8) * tl.load(absmax2 + blk // BLOCKSIZE2) + tl.load(offset)
    else:
        amax = tl.load(absmax_q + blk).to(tl.float32)
    return amax


@triton.jit
def _row_kernel(x, x_pairs, packed, code, tab, absmax_q, code8, absmax2, offset, out, res, xa, lora_b, scale, n, k,
                k_words, r,
                K_SPLIT: tl.constexpr, BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, NESTED: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, LORA: tl.constexpr, BLOCK_R: tl.constexpr,
                SPLIT: tl.constexpr, RESIDUAL: tl.constexpr, PRMT: tl.constexpr, ASM: tl.constexpr,
                PREFETCH: tl.constexpr, XPAIRS: tl.constexpr = False):
    """y (1, n) = x W ᵀ for one token row. ``packed`` is read as int32 words (8 weights each) in tiles of
    (BLOCK_N rows, NB absmax blocks, WB words); a block's products are summed, then scaled by its absmax."""
    pid_n, pid_k = tl.program_id(0), tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = rn < n
    row = tl.where(n_ok, rn, 0).to(tl.int64)  # rows past n read row 0: every load stays unmasked
    dtype = x.dtype.element_ty
    WB: tl.constexpr = BLOCKSIZE // 8
    NB: tl.constexpr = BLOCK_K // BLOCKSIZE
    k_start = pid_k * K_SPLIT
    nb, wb = tl.arange(0, NB), tl.arange(0, WB)
    wptr = packed + (row * k_words + k_start // 8)[:, None, None] + (nb * WB)[None, :, None] + wb[None, None, :]
    blk = (row * (k // BLOCKSIZE) + k_start // BLOCKSIZE)[:, None] + nb[None, :]
    xp = x + k_start + (nb * BLOCKSIZE)[:, None] + (wb * 8)[None, :]  # (NB, WB): weight 0 of each word
    xpairs = x_pairs + (k_start + (nb * BLOCKSIZE)[:, None] + (wb * 8)[None, :]) // 2
    acc = tl.zeros((BLOCK_N, NB), dtype=tl.float32)
    t0, t1, t2, t3 = tl.load(tab), tl.load(tab + 1), tl.load(tab + 2), tl.load(tab + 3)
    t4, t5, t6, t7 = tl.load(tab + 4), tl.load(tab + 5), tl.load(tab + 6), tl.load(tab + 7)
    if PREFETCH:
        word = tl.load(wptr)
    for kk in range(0, K_SPLIT, BLOCK_K):
        if PREFETCH:  # the next step's words are requested before this step's are decoded
            nxt = tl.load(wptr + (kk + BLOCK_K) // 8, mask=kk + BLOCK_K < K_SPLIT, other=0)
        else:
            word = tl.load(wptr + kk // 8)
        w0, w1, w2, w3, w4, w5, w6, w7 = _decode8(word, code, t0, t1, t2, t3, t4, t5, t6, t7, PRMT, ASM, True)
        if XPAIRS:  # bf16 x read as int32 pairs: a pair's first value is its low half
            xk = xpairs + kk // 2
            v = tl.load(xk)
            p = w0 * (v << 16).to(tl.float32, bitcast=True)[None, :, :]
            p += w1 * (v & -65536).to(tl.float32, bitcast=True)[None, :, :]
            v = tl.load(xk + 1)
            p += w2 * (v << 16).to(tl.float32, bitcast=True)[None, :, :]
            p += w3 * (v & -65536).to(tl.float32, bitcast=True)[None, :, :]
            v = tl.load(xk + 2)
            p += w4 * (v << 16).to(tl.float32, bitcast=True)[None, :, :]
            p += w5 * (v & -65536).to(tl.float32, bitcast=True)[None, :, :]
            v = tl.load(xk + 3)
            p += w6 * (v << 16).to(tl.float32, bitcast=True)[None, :, :]
            p += w7 * (v & -65536).to(tl.float32, bitcast=True)[None, :, :]
        else:
            xk = xp + kk
            p = w0 * tl.load(xk).to(tl.float32)[None, :, :]
            p += w1 * tl.load(xk + 1).to(tl.float32)[None, :, :]
            p += w2 * tl.load(xk + 2).to(tl.float32)[None, :, :]
            p += w3 * tl.load(xk + 3).to(tl.float32)[None, :, :]
            p += w4 * tl.load(xk + 4).to(tl.float32)[None, :, :]
            p += w5 * tl.load(xk + 5).to(tl.float32)[None, :, :]
            p += w6 * tl.load(xk + 6).to(tl.float32)[None, :, :]
            p += w7 * tl.load(xk + 7).to(tl.float32)[None, :, :]
        amax = _absmax(absmax_q, code8, absmax2, offset, blk + kk // BLOCKSIZE, NESTED, BLOCKSIZE2)
        acc += tl.sum(p, 2) * amax
        if PREFETCH:
            word = nxt
    y = tl.sum(acc, 1)
    if LORA:
        if pid_k == 0:  # the adapter's s·(x Aᵀ) Bᵀ in fp32, added once
            rr = tl.arange(0, BLOCK_R)
            xar = tl.load(xa + rr, mask=rr < r, other=0.0).to(tl.float32)
            br = tl.load(lora_b + row[:, None] * r + rr[None, :], mask=rr[None, :] < r, other=0.0).to(tl.float32)
            y += tl.sum(br * xar[None, :], 1) * scale
    if SPLIT == 1:
        tl.store(out + rn, _round_out(y, res, rn, n_ok, dtype, RESIDUAL), mask=n_ok)
    else:
        tl.store(out + pid_k.to(tl.int64) * n + rn, y, mask=n_ok)


@triton.jit
def _tc_kernel(x, code, tab, code8, packed, absmax_q, absmax2, offset, out, final, lora_b, scale, n, xa_col, r,
               packed1, absmax_q1, absmax2_1, offset1, out1, final1, lora_b1, scale1, n1, xa_col1, r1,
               packed2, absmax_q2, absmax2_2, offset2, out2, final2, lora_b2, scale2, n2, xa_col2, r2,
               tiles0, tiles01, res, xa, counter, m, k, k_words, stride_xm, stride_xa, K_SPLIT: tl.constexpr,
               BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, NESTED: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr, LORA: tl.constexpr, BLOCK_R: tl.constexpr, SPLIT: tl.constexpr,
               RESIDUAL: tl.constexpr, PRMT: tl.constexpr, ASM: tl.constexpr, SERIAL: tl.constexpr,
               GROUP: tl.constexpr, SUB: tl.constexpr = 1):
    """y (m, n) = x W ᵀ, acc (BLOCK_N, BLOCK_M) += (W_blk · x_blkᵀ) · absmax per absmax block: one product
    per block, its WB words decoded into a (BLOCK_N, BLOCKSIZE) left operand; SUB blocks per loop step.

    With ``GROUP`` 2 or 3, one launch serves that many weights of one input (q, k, v; gate, up): column
    tiles [0, tiles0) are the first weight's, [tiles0, tiles01) the second's, the rest the third's; each
    weight has its own packed codes, absmax, output, adapter B (its columns xa_col.. of ``xa``) and scale.
    With k splits, each program writes its fp32 partial to ``out`` (split, m, n); with ``SERIAL`` the last of
    a column tile's programs to finish (counted in ``counter``, which it resets) adds them in split order
    into ``final``: no second kernel, and a sum that does not depend on which program finished last."""
    tile, pid_k = tl.program_id(0), tl.program_id(1)
    pid_n = tile
    if GROUP > 1:
        if tile >= tiles0:
            pid_n = tile - tiles0
            packed, absmax_q, absmax2, offset, out, final = packed1, absmax_q1, absmax2_1, offset1, out1, final1
            lora_b, scale, n, xa_col, r = lora_b1, scale1, n1, xa_col1, r1
            if GROUP > 2:
                if tile >= tiles01:
                    pid_n = tile - tiles01
                    packed, absmax_q, absmax2, offset = packed2, absmax_q2, absmax2_2, offset2
                    out, final, lora_b, scale, n, xa_col, r = out2, final2, lora_b2, scale2, n2, xa_col2, r2
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.arange(0, BLOCK_M)
    n_ok, m_ok = rn < n, rm < m
    row = tl.where(n_ok, rn, 0).to(tl.int64)
    dtype = x.dtype.element_ty
    WB: tl.constexpr = BLOCKSIZE // 8
    k_start = pid_k * K_SPLIT
    wb = tl.arange(0, WB)
    wptr = packed + (row * k_words + k_start // 8)[:, None] + wb[None, :]
    blk = row * (k // BLOCKSIZE) + k_start // BLOCKSIZE
    xp = x + rm[None, :] * stride_xm + k_start + tl.arange(0, BLOCKSIZE)[:, None]  # x_blkᵀ (BLOCKSIZE, BLOCK_M)
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    t0, t1, t2, t3 = tl.load(tab), tl.load(tab + 1), tl.load(tab + 2), tl.load(tab + 3)
    t4, t5, t6, t7 = tl.load(tab + 4), tl.load(tab + 5), tl.load(tab + 6), tl.load(tab + 7)
    for k0 in range(0, K_SPLIT, BLOCKSIZE * SUB):
        for sub in tl.static_range(SUB):
            kk = k0 + sub * BLOCKSIZE
            p0, p1, p2, p3 = _decode_pairs(tl.load(wptr + kk // 8), code, t0, t1, t2, t3, t4, t5, t6, t7, PRMT, ASM)
            # (BLOCK_N, WB, 2, 2, 2) with weight 4c + 2b + a at [..., a, b, c]: reversed, each word's 8 in order
            w = tl.join(tl.join(p0, p1), tl.join(p2, p3))
            xt = tl.load(xp + kk, mask=m_ok[None, :], other=0.0)
            d = tl.dot(tl.reshape(tl.permute(w, (0, 1, 4, 3, 2)), (BLOCK_N, BLOCKSIZE)), xt)
            acc += d * _absmax(absmax_q, code8, absmax2, offset, blk + kk // BLOCKSIZE, NESTED, BLOCKSIZE2)[:, None]
    if LORA:
        if pid_k == 0:
            rr = tl.arange(0, BLOCK_R)
            xar = tl.load(xa + xa_col + rm[:, None] * stride_xa + rr[None, :],
                          mask=m_ok[:, None] & (rr[None, :] < r), other=0.0).to(tl.float32)
            br = tl.load(lora_b + row[:, None] * r + rr[None, :], mask=rr[None, :] < r, other=0.0).to(tl.float32)
            acc += tl.dot(br, tl.trans(xar), input_precision="ieee") * scale
    ok = n_ok[:, None] & m_ok[None, :]
    where = rm[None, :] * n + rn[:, None]
    if SPLIT == 1:
        tl.store(out + where, _round_out(acc, res, where, ok, dtype, RESIDUAL), mask=ok)
    else:
        tl.store(out + pid_k.to(tl.int64) * m * n + where, acc, mask=ok)
        if SERIAL:
            # release this program's partial, acquire the others' (read past L1: they were written elsewhere)
            if tl.atomic_add(counter + tile, 1, sem="acq_rel") == SPLIT - 1:
                total = tl.load(out + where, mask=ok, other=0.0, cache_modifier=".cg")
                for s in tl.static_range(1, SPLIT):
                    total += tl.load(out + s * m * n + where, mask=ok, other=0.0, cache_modifier=".cg")
                tl.store(final + where, _round_out(total, res, where, ok, dtype, RESIDUAL), mask=ok)
                tl.atomic_xchg(counter + tile, 0)


def _sum_splits(part, out, res, size: int, split: int, residual: bool) -> None:
    """out = round(Σ part[s]) (+ residual, rounded again): :func:`_sum_splits_kernel` launched."""
    _sum_splits_kernel[(triton.cdiv(size, 1024),)](part, out, res, size, SPLIT=split, RESIDUAL=residual, BLOCK=1024)


_COUNTERS: dict[torch.device, torch.Tensor] = {}  # per device: zeros, one per column tile, reset by the kernel


def _counter(device: torch.device, tiles: int) -> torch.Tensor | None:
    """A zeroed int32 counter per column tile for a serial split sum, shared by every call on the device (the
    calls of a decode step run one after another on one stream, and each leaves its counters at zero); None
    when a larger buffer would have to be allocated during a CUDA-graph capture."""
    have = _COUNTERS.get(device)
    if have is None or have.numel() < tiles:
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            return None
        _COUNTERS[device] = have = torch.zeros(max(tiles, 1024), dtype=torch.int32, device=device)
    return have


_TABLES: dict[int, tuple] = {}  # id(quant state) -> (weak reference to it, {dtype: (code, words)})


def _tables(state, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The code book as a (16,) tensor in ``dtype`` and, for 16-bit dtypes, its
    :func:`qfine.fast.prmt_decode.code_words` as an int32 tensor (fp32: the code book again, unused), built
    once per quant state on its first, uncaptured call."""
    ref, by_dtype = _TABLES.get(id(state), (None, None))
    if ref is None or ref() is not state:
        for key in [key for key, (r, _) in _TABLES.items() if r() is None]:
            del _TABLES[key]
        by_dtype = {}
        _TABLES[id(state)] = (weakref.ref(state), by_dtype)
    if dtype not in by_dtype:
        code = state.code.float().to(dtype)
        words = code
        if dtype in (torch.float16, torch.bfloat16):
            words = torch.tensor([w - (1 << 32) if w >= 1 << 31 else w for w in code_words(state.code, dtype)],
                                 dtype=torch.int32, device=code.device)
        by_dtype[dtype] = (code, words)
    return by_dtype[dtype]


def fits(cfg: dict, m: int, k: int, blocksize: int) -> bool:
    """Whether a ``row``/``tc``/``mma`` setting serves this shape: whole steps in every k split (no masks on k)."""
    if cfg["KERNEL"] == "mma":
        return mma_kernel.fits(cfg, m, k, blocksize)
    step = cfg["BLOCK_K"] if cfg["KERNEL"] == "row" else blocksize * cfg.get("SUB", 1)
    return (cfg["KERNEL"] != "row" or m == 1) and k % (step * cfg["SPLIT"]) == 0 and step % blocksize == 0


def _quant_args(weight) -> tuple:
    """(packed as int32 words, absmax (q8 or fp32), second-level absmax, offset) of a 4-bit weight."""
    state = weight.quant_state
    nested = bool(state.nested)
    return (weight.data.reshape(-1).view(torch.int32), state.absmax, state.state2.absmax if nested else state.absmax,
            state.offset if nested else state.absmax)


def _common(x2: torch.Tensor, state, cfg: dict, lora: bool, r: int, residual: bool, interpreted: bool) -> dict:
    """The constexpr launch arguments shared by both kernels."""
    row = cfg["KERNEL"] == "row"
    # the row kernel's "f32" decode puts 16 bits in a float's high half: the value itself only for bf16
    prmt = (bool(cfg.get("PRMT")) and not interpreted
            and x2.dtype in ((torch.bfloat16,) if row else (torch.bfloat16, torch.float16)))
    nested = bool(state.nested)
    return dict(K_SPLIT=state.shape[1] // cfg["SPLIT"], BLOCKSIZE=state.blocksize,
                BLOCKSIZE2=state.state2.blocksize if nested else 256, NESTED=nested, BLOCK_N=cfg["BLOCK_N"],
                LORA=lora, BLOCK_R=max(16, triton.next_power_of_2(r)), SPLIT=cfg["SPLIT"], RESIDUAL=residual,
                PRMT=prmt, ASM=(ASM_F32 if row else ASM_PAIRS) if prmt else "", num_warps=cfg["num_warps"],
                num_stages=cfg.get("num_stages", 3))


def groupable(x2: torch.Tensor, members: list[tuple]) -> bool:
    """Whether :func:`matmul_group` serves these (weight, lora) pairs: 2 or 3 weights of one k, block size,
    nesting and code book, every one with an adapter or none, and the adapters' xa column views of one
    (rows, Σr) tensor (as :func:`qfine.fast.lora_down.lora_down` returns them)."""
    if not 2 <= len(members) <= 3:
        return False
    states = [w.quant_state for w, _ in members]
    first = states[0]
    # the code book by its quant type: comparing the tensors would wait for the GPU (not allowed in a capture)
    if any(s.shape[1] != first.shape[1] or s.blocksize != first.blocksize or bool(s.nested) != bool(first.nested)
           or s.quant_type != first.quant_type for s in states[1:]):
        return False
    loras = [lora for _, lora in members]
    if all(lora is None for lora in loras):
        return True
    if any(lora is None for lora in loras):
        return False
    xas = [lora[0].reshape(x2.shape[0], -1) for lora in loras]
    base = xas[0]
    return all(xa.untyped_storage().data_ptr() == base.untyped_storage().data_ptr() and xa.dtype == base.dtype
               and (x2.shape[0] == 1 or xa.stride(0) == base.stride(0)) and xa.stride(1) == 1
               and xa.data_ptr() >= base.data_ptr()
               for xa in xas)


def matmul_rows(x2: torch.Tensor, weight, lora, residual, cfg: dict, interpreted: bool) -> torch.Tensor:
    """(m, n) = x2 (m, k) @ Wᵀ (+ adapter, + residual) with the ``row`` or ``tc`` kernel; ``cfg`` as from
    :func:`qfine.fast.gemv_kernel.candidates` and :func:`fits`. Capturable in a CUDA graph."""
    if cfg["KERNEL"] == "tc":
        return _launch_tc(x2, [(weight, lora)], residual, cfg, interpreted)[0]
    if cfg["KERNEL"] == "mma":
        return mma_kernel.matmul_mma(x2, weight, lora, residual, cfg, _sum_splits)
    state = weight.quant_state
    (n, k), m = state.shape, x2.shape[0]
    split = cfg["SPLIT"]
    out = torch.empty(m, n, dtype=x2.dtype, device=x2.device)
    part = out if split == 1 else torch.empty(split, m, n, dtype=torch.float32, device=x2.device)
    res = out if residual is None else residual.reshape(m, n).contiguous()
    xa, lora_b, scale = lora if lora is not None else (x2, x2, 0.0)
    r = xa.shape[-1] if lora is not None else 1
    if lora is not None:
        xa, lora_b = xa.reshape(m, r).contiguous(), lora_b.contiguous()
    code, words = _tables(state, x2.dtype)
    packed, absmax_q, absmax2, offset = _quant_args(weight)
    code8 = state.state2.code if state.nested else state.code
    xpairs = bool(cfg.get("XPAIRS")) and x2.dtype == torch.bfloat16 and x2.is_contiguous()
    _row_kernel[(triton.cdiv(n, cfg["BLOCK_N"]), split)](
        x2, x2.view(torch.int32) if xpairs else x2, packed, code, words, absmax_q, code8, absmax2, offset, part,
        res, xa, lora_b, float(scale), n, k, k // 8, r, BLOCK_K=cfg["BLOCK_K"], PREFETCH=bool(cfg.get("PREFETCH")),
        XPAIRS=xpairs,
        **_common(x2, state, cfg, lora is not None, r, residual is not None, interpreted))
    if split > 1:
        _sum_splits_kernel[(triton.cdiv(m * n, 1024),)](part, out, res, m * n, SPLIT=split,
                                                        RESIDUAL=residual is not None, BLOCK=1024)
    return out


def matmul_group(x2: torch.Tensor, members: list[tuple], cfg: dict, interpreted: bool) -> list[torch.Tensor]:
    """[x2 @ Wᵢᵀ (+ sᵢ·xaᵢ Bᵢᵀ)] for 2 or 3 (weight, lora) pairs of one input (:func:`groupable`), in one
    launch of the ``tc`` or ``mma`` kernel. Capturable in a CUDA graph."""
    if cfg["KERNEL"] == "mma":
        return mma_kernel.matmul_mma_group(x2, members, cfg)
    return _launch_tc(x2, members, None, cfg, interpreted)


def _launch_tc(x2: torch.Tensor, members: list[tuple], residual, cfg: dict, interpreted: bool) -> list[torch.Tensor]:
    state = members[0][0].quant_state
    k, m, split, bn = state.shape[1], x2.shape[0], cfg["SPLIT"], cfg["BLOCK_N"]
    code, words = _tables(state, x2.dtype)
    code8 = state.state2.code if state.nested else state.code
    res = x2 if residual is None else residual.reshape(m, -1).contiguous()
    lora = members[0][1] is not None
    xa = members[0][1][0].reshape(m, -1) if lora else x2
    if lora and len(members) == 1 and xa.stride(1) != 1:
        # the kernel reads xa's rows at stride_xa with unit column stride; each member's columns start at
        # its own view's offset from xa, so the copy replaces the member's view
        xa = xa.contiguous()
        members = [(members[0][0], (xa, *members[0][1][1:]))]
    per, outs, tiles = [], [], []
    for weight, lo in members:
        n = weight.quant_state.shape[0]
        out = torch.empty(m, n, dtype=x2.dtype, device=x2.device)
        part = out if split == 1 else torch.empty(split, m, n, dtype=torch.float32, device=x2.device)
        b, scale, col, r = x2, 0.0, 0, 1
        if lo is not None:
            xai, b, scale = lo
            r = xai.shape[-1]
            col = (xai.data_ptr() - xa.data_ptr()) // xa.element_size()
            b = b.contiguous()
        per.append((*_quant_args(weight), part, out, b, float(scale), n, col, r))
        outs.append(out)
        tiles.append(triton.cdiv(n, bn))
    while len(per) < 3:
        per.append(per[0])
    total = sum(tiles)
    counter = _counter(x2.device, total) if split > 1 and cfg.get("SERIAL") else None
    r_max = max(p[-1] for p in per)
    _tc_kernel[(total, split)](
        x2, code, words, code8, *per[0], *per[1], *per[2], tiles[0], tiles[0] + (tiles[1] if len(tiles) > 1 else 0),
        res, xa, counter if counter is not None else x2, m, k, k // 8, x2.stride(0), xa.stride(0),
        BLOCK_M=max(16, triton.next_power_of_2(m)), SERIAL=counter is not None, GROUP=len(members),
        SUB=cfg.get("SUB", 1),
        **_common(x2, state, cfg, lora, r_max, residual is not None, interpreted))
    if split > 1 and counter is None:
        for (*_, part, out, _b, _s, n, _c, _r), _ in zip(per, members):
            _sum_splits_kernel[(triton.cdiv(m * n, 1024),)](part, out, res, m * n, SPLIT=split,
                                                            RESIDUAL=residual is not None, BLOCK=1024)
    return outs
