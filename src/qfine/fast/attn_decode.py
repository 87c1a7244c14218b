"""Attention of one new token per sequence over a static KV cache (the decode step), split along the cache:
the generation engine's replacement for a masked ``scaled_dot_product_attention`` there. CUDA only (Triton;
on the CPU under Triton's interpreter, which the tests use).

A masked SDPA call at the decode step reads the whole cache and pays for a general kernel (≈ 11 µs per layer at
8B shapes on an H200, twenty times the time to read the cache). Here program (b, kv head, split) takes the
``GROUP`` query heads that share its kv head and one run of BLOCK_L (16) cache slots, skips it when no slot in
it is visible (key slot j is seen by row b iff pad[b] ≤ j ≤ slot), and writes its softmax partial — the running
maximum m, the sum l of exp(s − m) and the (GROUP, D) sum of exp(s − m)·v — in fp32; the last of a (b, kv
head)'s programs to finish adds the splits' partials of all its query heads (each rescaled by exp(mᵢ − M)), a
chunk of splits per load, and divides once (a second kernel does where no counter can be had: a capture that
would have to allocate one).
Scores are fp32 products of the 16-bit q and k; the probabilities meet v in fp32 (no rounding of p, unlike
flash attention's kernels). Given the step's own k and v, the program whose run holds the current slot
writes them into the cache there (one launch fewer per tensor and layer) and every program takes that slot's
k, v from them, never from the cache, which another program may be writing.
"""

from __future__ import annotations

import warnings

import torch
import triton
import triton.language as tl

from qfine.fast.gemv_rows import _counter

ADD_TILE = 8192  # fp32 values of partials read per load when they are added (64 a thread of 4 warps)
LAST_ADDS = {"ok": True}  # False once the variant whose last program adds the partials failed to build here


@triton.jit
def _split_kernel(q, keys, values, new_k, new_v, pad, slot, part, stats, out, counter, cos, sin, scale, length,
                  stride_kb, stride_kh, stride_kl, kv_heads, SPLITS: tl.constexpr, GROUP: tl.constexpr,
                  GROUP_P: tl.constexpr, D: tl.constexpr, BLOCK_L: tl.constexpr, NEW: tl.constexpr,
                  LAST_ADDS: tl.constexpr, CHUNK: tl.constexpr, ROPE: tl.constexpr):
    """Partials of program (b·kv_heads + h, split) of SPLITS: part (b, kv, SPLITS, GROUP, D), stats (b, kv,
    SPLITS, GROUP, 2) = (m, l); a split with no visible slot writes m = −inf, l = 0, zeros. NEW: new_k, new_v (b, kv,
    D) are the current slot's k and v, written into the cache by the program whose run holds the slot.
    LAST_ADDS: the last of a (b, h)'s programs to finish (counted in ``counter``, which it resets) adds their
    partials into ``out`` (:func:`_add_splits`), instead of a second kernel. ROPE: q and new_k come before
    RoPE, which :func:`_rope` applies with cos, sin (length, D) at position slot − pad[b]."""
    bh, sp = tl.program_id(0), tl.program_id(1)
    b, h = bh // kv_heads, bh % kv_heads
    first, last = tl.load(pad + b), tl.load(slot)
    rg, rd = tl.arange(0, GROUP_P), tl.arange(0, D)
    rl = sp * BLOCK_L + tl.arange(0, BLOCK_L)
    g_ok = rg < GROUP
    at = (bh * SPLITS + sp) * GROUP_P  # this program's first (split, group) row of part and stats
    start = sp * BLOCK_L
    if (start <= last) & (start + BLOCK_L > first):
        # q (b, kv·GROUP, D): this kv head's GROUP query heads
        q_at = q + (bh * GROUP + rg)[:, None] * D
        qs = tl.load(q_at + rd[None, :], mask=g_ok[:, None], other=0.0)
        if ROPE:
            qs = _rope(qs, q_at, rd[None, :], g_ok[:, None], cos, sin, last - first, D)
        qs = qs.to(tl.float32)
        base = b.to(tl.int64) * stride_kb + h * stride_kh
        seen = (rl >= first) & (rl <= last) & (rl < length)  # slots not seen are not read
        kv_at = base + rl[:, None] * stride_kl + rd[None, :]
        from_cache = seen
        if NEW:
            from_cache = seen & (rl != last)
        ks = tl.load(keys + kv_at, mask=from_cache[:, None], other=0.0).to(tl.float32)
        vs = tl.load(values + kv_at, mask=from_cache[:, None], other=0.0).to(tl.float32)  # requested with k
        if NEW:
            kn, vn = tl.load(new_k + bh * D + rd), tl.load(new_v + bh * D + rd)
            if ROPE:
                kn = _rope(kn, new_k + bh * D, rd, rd < D, cos, sin, last - first, D)
            cur = (rl == last)[:, None]
            ks = tl.where(cur, kn.to(tl.float32)[None, :], ks)
            vs = tl.where(cur, vn.to(tl.float32)[None, :], vs)
            if last < start + BLOCK_L:  # this run holds the slot: its program writes the cache there
                tl.store(keys + base + last * stride_kl + rd, kn)
                tl.store(values + base + last * stride_kl + rd, vn)
        s = tl.sum(qs[:, None, :] * ks[None, :, :], 2) * scale  # (GROUP_P, BLOCK_L)
        s = tl.where(seen[None, :], s, float("-inf"))
        m = tl.max(s, 1)
        p = tl.exp(s - m[:, None])
        p = tl.where(seen[None, :], p, 0.0)
        acc = tl.sum(p[:, :, None] * vs[None, :, :], 1)  # (GROUP_P, D)
        tl.store(part + (at + rg)[:, None] * D + rd[None, :], acc)
        tl.store(stats + (at + rg) * 2, m)
        tl.store(stats + (at + rg) * 2 + 1, tl.sum(p, 1))
    else:
        tl.store(part + (at + rg)[:, None] * D + rd[None, :], tl.zeros((GROUP_P, D), dtype=tl.float32))
        tl.store(stats + (at + rg) * 2, tl.full((GROUP_P,), float("-inf"), tl.float32))
        tl.store(stats + (at + rg) * 2 + 1, tl.zeros((GROUP_P,), dtype=tl.float32))
    if LAST_ADDS:
        # release this program's partial, acquire the others' (read past L1: other programs wrote them)
        if tl.atomic_add(counter + bh, 1, sem="acq_rel") == SPLITS - 1:
            _add_splits(part, stats, out, bh, SPLITS, GROUP, GROUP_P, D, CHUNK)
            tl.atomic_xchg(counter + bh, 0)


@triton.jit
def _rope(x, x_at, rd, ok, cos, sin, pos, D: tl.constexpr):
    """x·cos + rotate_half(x)·sin at position pos (0 where negative: a padding row), in fp32 and rounded to
    x's dtype once, as the model's compiled RoPE: x (…, D) loaded from x_at + rd, rotate_half(x)[i] =
    −x[i + D/2] for i < D/2, else x[i − D/2]."""
    pos = tl.maximum(pos, 0)
    half = rd < D // 2
    other = tl.load(x_at + tl.where(half, rd + D // 2, rd - D // 2), mask=ok, other=0.0).to(tl.float32)
    c = tl.load(cos + pos * D + rd).to(tl.float32)
    s = tl.load(sin + pos * D + rd).to(tl.float32)
    return (x.to(tl.float32) * c + tl.where(half, -other, other) * s).to(x.dtype)


@triton.jit
def _add_splits(part, stats, out, bh, SPLITS: tl.constexpr, GROUP: tl.constexpr, GROUP_P: tl.constexpr,
                D: tl.constexpr, CHUNK: tl.constexpr):
    """out[bh·GROUP + g] (D,) = Σᵢ exp(mᵢ − M)·accᵢ / Σᵢ exp(mᵢ − M)·lᵢ over the SPLITS splits i of (bh, g), for
    every query head g of kv head bh at once, CHUNK splits a load: one pass, the sums rescaled whenever a chunk
    raises the running maximum M (so that the loads of a chunk wait on nothing but the previous chunk's sums)."""
    rd, rg = tl.arange(0, D), tl.arange(0, GROUP_P)
    big = tl.full((GROUP_P,), float("-inf"), tl.float32)
    total = tl.zeros((GROUP_P,), dtype=tl.float32)
    acc = tl.zeros((GROUP_P, D), dtype=tl.float32)
    for c0 in range(0, SPLITS, CHUNK):
        rs = c0 + tl.arange(0, CHUNK)
        ok = (rs < SPLITS)[:, None]
        at = (bh * SPLITS + rs)[:, None] * GROUP_P + rg[None, :]  # (CHUNK, GROUP_P)
        m = tl.load(stats + at * 2, mask=ok, other=float("-inf"), cache_modifier=".cg")
        ls = tl.load(stats + at * 2 + 1, mask=ok, other=0.0, cache_modifier=".cg")
        vs = tl.load(part + at[:, :, None] * D + rd[None, None, :], mask=ok[:, :, None], other=0.0,
                     cache_modifier=".cg")
        now = tl.maximum(big, tl.max(m, 0))
        keep = tl.where(big > float("-inf"), tl.exp(big - now), 0.0)  # the earlier sums' rescale
        w = tl.where(m > float("-inf"), tl.exp(m - now[None, :]), 0.0)
        total = total * keep + tl.sum(w * ls, 0)
        acc = acc * keep[:, None] + tl.sum(w[:, :, None] * vs, 0)
        big = now
    tl.store(out + (bh * GROUP + rg)[:, None] * D + rd[None, :], (acc / total[:, None]).to(out.dtype.element_ty),
             mask=(rg < GROUP)[:, None])


@triton.jit
def _combine_kernel(part, stats, out, SPLITS: tl.constexpr, GROUP: tl.constexpr, GROUP_P: tl.constexpr,
                    D: tl.constexpr, CHUNK: tl.constexpr):
    """out (b, kv·GROUP, D) in out's dtype for program b·kv_heads + h: :func:`_add_splits` as a kernel of its
    own, where the split kernel's last program cannot add them."""
    _add_splits(part, stats, out, tl.program_id(0), SPLITS, GROUP, GROUP_P, D, CHUNK)


def decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, pad: torch.Tensor,
                     slot: torch.Tensor, scale: float, block_l: int = 16, new: tuple | None = None,
                     rope: tuple | None = None) -> torch.Tensor:
    """softmax(q kᵀ · scale) v for q (b, heads, 1, d) over cache slots j with pad[b] ≤ j ≤ slot (``slot`` a
    one-element long tensor, ``pad`` (b,) long; both read on the device, so a CUDA graph replays any step),
    keys/values (b, kv heads, length, d) with heads = kv heads · group. ``new``: this step's (k, v), each
    (b, kv heads, 1, d) in the cache's dtype, written into the cache at ``slot`` by the same launch (else
    the cache must hold them already). ``rope``: (cos, sin), each (length, d), when q and the new k come
    before RoPE, which the launch applies at position slot − pad[b] (k as the cache then holds it). Returns
    (b, heads, 1, d) in q's dtype. Capturable in a CUDA graph."""
    b, heads, _, d = q.shape
    kv, length = keys.shape[1], keys.shape[2]
    group = heads // kv
    group_p = max(1, triton.next_power_of_2(group))
    splits = triton.cdiv(length, block_l)
    chunk = max(1, min(triton.next_power_of_2(splits), ADD_TILE // (group_p * d)))  # splits added per load
    qc = q.reshape(b, heads, d).contiguous()
    part = torch.empty(b, kv, splits, group_p, d, dtype=torch.float32, device=q.device)
    stats = torch.empty(b, kv, splits, group_p, 2, dtype=torch.float32, device=q.device)
    out = torch.empty(b, heads, 1, d, dtype=q.dtype, device=q.device)
    if keys.stride(3) != 1 or values.stride() != keys.stride():
        raise ValueError("decode_attention reads keys and values of one layout, d contiguous")
    new_k, new_v = (qc, qc) if new is None else [t.reshape(b, kv, d).contiguous() for t in new]
    if new is not None and not (new_k.dtype == new_v.dtype == keys.dtype == values.dtype):
        raise ValueError("the step's k and v are written into the cache in its dtype")
    if rope is not None and (new is None or any(t.shape != (length, d) or t.stride(1) != 1 for t in rope)):
        raise ValueError("RoPE in the launch needs the step's k, v and cos, sin tables (length, d)")
    cos, sin = rope if rope is not None else (qc, qc)

    def launch(counter):
        _split_kernel[(b * kv, splits)](qc, keys, values, new_k, new_v, pad, slot, part, stats, out,
                                        qc if counter is None else counter, cos, sin, float(scale), length,
                                        keys.stride(0), keys.stride(1), keys.stride(2), kv, SPLITS=splits, GROUP=group,
                                        GROUP_P=group_p, D=d, BLOCK_L=block_l, NEW=new is not None,
                                        LAST_ADDS=counter is not None, CHUNK=chunk, ROPE=rope is not None,
                                        num_warps=4)

    counter = _counter(q.device, b * kv) if LAST_ADDS["ok"] else None
    try:
        launch(counter)
    except Exception as e:  # noqa: BLE001 - compiled on first use: a toolchain that cannot build it is told once
        if counter is None:
            raise
        warnings.warn(f"split attention: the partials are added by a second kernel ({type(e).__name__}: {e})")
        LAST_ADDS["ok"], counter = False, None
        launch(None)
    if counter is None:
        _combine_kernel[(b * kv,)](part, stats, out, SPLITS=splits, GROUP=group, GROUP_P=group_p, D=d, CHUNK=chunk,
                                   num_warps=4)
    return out
