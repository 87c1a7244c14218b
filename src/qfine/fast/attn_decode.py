"""Attention of one new token per sequence over a static KV cache (the decode step), split along the cache:
the generation engine's replacement for a masked ``scaled_dot_product_attention`` there. CUDA only (Triton;
on the CPU under Triton's interpreter, which the tests use).

A masked SDPA call at the decode step reads the whole cache and pays for a general kernel (≈ 11 µs per layer at
8B shapes on an H200, twenty times the time to read the cache). Here program (b, kv head, split) takes the
``GROUP`` query heads that share its kv head and STEPS runs of BLOCK_L (16) cache slots, skips it when no slot
in it is visible (key slot j is seen by row b iff pad[b] ≤ j ≤ slot), and writes its softmax partial — the
running maximum m, the sum l of exp(s − m) and the (GROUP, D) sum of exp(s − m)·v — in fp32; the last of a (b,
kv head)'s programs to finish adds the splits' partials of all its query heads (each rescaled by exp(mᵢ − M)),
a chunk of splits per load, and divides once (or a second kernel does: where no counter can be had, a capture
that would have to allocate one, or where that is faster). How many runs a program takes and who adds the
partials is timed once per shape on the GPU (:func:`tuned`): more runs a program mean fewer partials to add
but longer programs.

Scores are fp32 products of the 16-bit q and k; the probabilities meet v in fp32 (no rounding of p, unlike
flash attention's kernels). Given the step's own k and v, the program whose run holds the current slot
writes them into the cache there (one launch fewer per tensor and layer) and every program takes that slot's
k, v from them, never from the cache, which another program may be writing. Given cos and sin, the launch
applies RoPE to q and the new k itself (the model's compiled RoPE kernels fewer). Given the A of o's LoRA
adapter, the programs that add the partials also compute o's down-product of the output (the launch of its
own fewer).
"""

from __future__ import annotations

import os
import warnings

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from qfine.fast import tune_cache
from qfine.fast.gemv_rows import _counter
from qfine.fast.mma_kernel import triton_launch

ADD_TILE = 8192  # fp32 values of partials read per load when they are added (64 a thread of 4 warps)
LAST_ADDS = {"ok": True}  # False once the variant whose last program adds the partials failed to build here
# the runs of 32 and 64 slots with matrix products, offered to the tuner with QFINE_ATTN_DOT=1: off until
# their GPU test has passed on a GPU
DOT = {"on": os.environ.get("QFINE_ATTN_DOT") == "1"}


@triton.jit
def _split_kernel(q, keys, values, new_k, new_v, pad, slot, part, stats, out, counter, cos, sin, scale, length,
                  stride_kb, stride_kh, stride_kl, kv_heads, a, dpart, xa, r, SPLITS: tl.constexpr,
                  GROUP: tl.constexpr, GROUP_P: tl.constexpr, D: tl.constexpr, BLOCK_L: tl.constexpr,
                  STEPS: tl.constexpr, NEW: tl.constexpr, LAST_ADDS: tl.constexpr, CHUNK: tl.constexpr,
                  ROPE: tl.constexpr, DOWN: tl.constexpr, BLOCK_R: tl.constexpr, RC: tl.constexpr,
                  KV_P: tl.constexpr, EARLY: tl.constexpr, DOT: tl.constexpr, GROUP_M: tl.constexpr):
    """Partials of program (b·kv_heads + h, split) of SPLITS, a split being STEPS runs of BLOCK_L slots (a
    running maximum across them): part (b, kv, SPLITS, GROUP, D), stats (b, kv, SPLITS, GROUP, 2) = (m, l); a
    split with no visible slot writes m = −inf, l = 0, zeros. NEW: new_k, new_v (b, kv, D) are the current
    slot's k and v, written into the cache by the program whose run holds the slot. LAST_ADDS: the last of a
    (b, h)'s programs to finish (counted in ``counter``, which it resets) adds their partials into ``out``
    (:func:`_add_splits`), instead of a second kernel. ROPE: q and new_k come before RoPE, which
    :func:`_rope` applies with cos, sin (length, D) at position slot − pad[b]. DOWN: that program then also
    adds its heads' share of the next projection's LoRA down-product (:func:`_down_share`). EARLY: launched
    as a programmatic dependent launch (:data:`qfine.fast.mma_kernel.EARLY`): it lets the next kernel start
    at once, requests its first run of the cache, then waits for the kernel before. DOT: both products as
    matrix products of GROUP_M (≥ 16) query rows, the rows past GROUP zero: q·kᵀ of the 16-bit values with
    fp32 sums, p·v of fp32 p and v (runs of 32 or 64 slots, whose products as broadcasts would not fit in
    registers); else GROUP_M = GROUP_P and the products are broadcasts summed in fp32."""
    if EARLY:  # the next kernel (o's 4-bit product) may start: it reads nothing of ours before its own wait
        tl.extra.cuda.gdc_launch_dependents()
    bh, sp = tl.program_id(0), tl.program_id(1)
    b, h = bh // kv_heads, bh % kv_heads
    first, last = tl.load(pad + b), tl.load(slot)  # written before the step's first kernel
    rg, rd = tl.arange(0, GROUP_P), tl.arange(0, D)
    at = (bh * SPLITS + sp) * GROUP_P  # this program's first (split, group) row of part and stats
    start = sp * BLOCK_L * STEPS
    visible = (start <= last) & (start + BLOCK_L * STEPS > first)
    base = b.to(tl.int64) * stride_kb + h * stride_kh
    # the first run's cached k and v, requested before the wait: no kernel of this step writes the cache's
    # earlier slots (the current one is taken from new_k, new_v)
    rl0 = start + tl.arange(0, BLOCK_L)
    cached0 = (rl0 >= first) & (rl0 <= last) & (rl0 < length) & visible
    if NEW:
        cached0 = cached0 & (rl0 != last)
    kv0 = base + rl0[:, None] * stride_kl + rd[None, :]
    ks0 = tl.load(keys + kv0, mask=cached0[:, None], other=0.0)
    vs0 = tl.load(values + kv0, mask=cached0[:, None], other=0.0)
    if EARLY:  # q, the step's k, v and every write wait for the kernel before (q, k, v's 4-bit product)
        tl.extra.cuda.gdc_wait()
    if visible:
        # q (b, kv·GROUP, D): this kv head's GROUP query heads, as GROUP_M rows
        rm = tl.arange(0, GROUP_M)
        m_ok = rm < GROUP
        q_at = q + (bh * GROUP + rm)[:, None] * D
        qs = tl.load(q_at + rd[None, :], mask=m_ok[:, None], other=0.0)
        if ROPE:
            qs = _rope(qs, q_at, rd[None, :], m_ok[:, None], cos, sin, last - first, D)
        if not DOT:  # DOT: the products of the 16-bit values are exact, their sums fp32
            qs = qs.to(tl.float32)
        if NEW:
            kn, vn = tl.load(new_k + bh * D + rd), tl.load(new_v + bh * D + rd)
            if ROPE:
                kn = _rope(kn, new_k + bh * D, rd, rd < D, cos, sin, last - first, D)
        m = tl.full((GROUP_M,), float("-inf"), tl.float32)
        total = tl.zeros((GROUP_M,), dtype=tl.float32)
        acc = tl.zeros((GROUP_M, D), dtype=tl.float32)
        for step in tl.static_range(STEPS):
            run = start + step * BLOCK_L
            rl = run + tl.arange(0, BLOCK_L)
            seen = (rl >= first) & (rl <= last) & (rl < length)  # slots not seen are not read
            kv_at = base + rl[:, None] * stride_kl + rd[None, :]
            if step == 0:
                ks, vs = ks0, vs0
            else:
                from_cache = seen
                if NEW:
                    from_cache = seen & (rl != last)
                ks = tl.load(keys + kv_at, mask=from_cache[:, None], other=0.0)
                vs = tl.load(values + kv_at, mask=from_cache[:, None], other=0.0)  # with k
            if NEW:
                cur = (rl == last)[:, None]
                ks = tl.where(cur, kn[None, :], ks)
                vs = tl.where(cur, vn[None, :], vs)
                if (run <= last) & (last < run + BLOCK_L):  # this run holds the slot: it writes the cache there
                    tl.store(keys + base + last * stride_kl + rd, kn)
                    tl.store(values + base + last * stride_kl + rd, vn)
            vs = vs.to(tl.float32)
            if DOT:
                s = tl.dot(qs, tl.trans(ks), input_precision="ieee") * scale  # (GROUP_M, BLOCK_L)
            else:
                s = tl.sum(qs[:, None, :] * ks.to(tl.float32)[None, :, :], 2) * scale
            s = tl.where(seen[None, :], s, float("-inf"))
            now = tl.maximum(m, tl.max(s, 1))
            ref = tl.where(now > float("-inf"), now, 0.0)  # nothing seen yet: any finite reference
            keep = tl.exp(m - ref)  # 0 while nothing was summed (m = −inf)
            p = tl.where(seen[None, :], tl.exp(s - ref[:, None]), 0.0)
            total = total * keep + tl.sum(p, 1)
            if DOT:
                acc = acc * keep[:, None] + tl.dot(p, vs, input_precision="ieee")  # (GROUP_M, D)
            else:
                acc = acc * keep[:, None] + tl.sum(p[:, :, None] * vs[None, :, :], 1)
            m = now
        kept = rm < GROUP_P  # the partials' rows (GROUP_P a split)
        tl.store(part + (at + rm)[:, None] * D + rd[None, :], acc, mask=kept[:, None])
        tl.store(stats + (at + rm) * 2, m, mask=kept)
        tl.store(stats + (at + rm) * 2 + 1, total, mask=kept)
    else:
        tl.store(part + (at + rg)[:, None] * D + rd[None, :], tl.zeros((GROUP_P, D), dtype=tl.float32))
        tl.store(stats + (at + rg) * 2, tl.full((GROUP_P,), float("-inf"), tl.float32))
        tl.store(stats + (at + rg) * 2 + 1, tl.zeros((GROUP_P,), dtype=tl.float32))
    if LAST_ADDS:
        # release this program's partial, acquire the others' (read past L1: other programs wrote them)
        if tl.atomic_add(counter + bh, 1, sem="acq_rel") == SPLITS - 1:
            vals = _add_splits(part, stats, out, bh, SPLITS, GROUP, GROUP_P, D, CHUNK)
            tl.atomic_xchg(counter + bh, 0)
            if DOWN:
                _down_share(vals, a, dpart, counter + tl.num_programs(0), xa, b, h, kv_heads, r, GROUP, GROUP_P, D,
                            BLOCK_R, RC, KV_P)


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
        ref = tl.where(now > float("-inf"), now, 0.0)  # no split seen yet: any finite reference
        keep = tl.exp(big - ref)  # the earlier sums' rescale (0 while there are none)
        w = tl.exp(m - ref[None, :])  # 0 for a split that saw nothing (m = −inf)
        total = total * keep + tl.sum(w * ls, 0)
        acc = acc * keep[:, None] + tl.sum(w[:, :, None] * vs, 0)
        big = now
    rounded = (acc / total[:, None]).to(out.dtype.element_ty)
    tl.store(out + (bh * GROUP + rg)[:, None] * D + rd[None, :], rounded, mask=(rg < GROUP)[:, None])
    return tl.where((rg < GROUP)[:, None], rounded.to(tl.float32), 0.0)


@triton.jit
def _down_share(vals, a, dpart, counter, xa, b, h, kv_heads, r, GROUP: tl.constexpr, GROUP_P: tl.constexpr,
                D: tl.constexpr, BLOCK_R: tl.constexpr, RC: tl.constexpr, KV_P: tl.constexpr):
    """Row b of xa (b, r) = out_b · Aᵀ for A (r, kv_heads·GROUP·D), the LoRA down-product of the projection
    that reads the attention's output (o), from its kv heads' shares. vals (GROUP_P, D) fp32 is kv head h's
    output as rounded (zero past GROUP); rounded to A's dtype here, its share Σ vals · A[:, h's columns]
    (fp32, RC rows of A a load) goes to dpart (b, kv_heads, BLOCK_R). The last share of row b (counted in
    ``counter`` + b, which it resets) adds the kv_heads shares in one load and rounds once to A's dtype."""
    rg, rd = tl.arange(0, GROUP_P), tl.arange(0, D)
    cols = (h * GROUP + rg)[:, None] * D + rd[None, :]  # (GROUP_P, D): this kv head's columns of A
    g_ok = (rg < GROUP)[:, None]
    width = kv_heads * GROUP * D
    vals = vals.to(a.dtype.element_ty).to(tl.float32)  # as peft's lora_A(x.to(A.dtype))
    for r0 in tl.static_range(0, BLOCK_R, RC):
        rj = r0 + tl.arange(0, RC)
        av = tl.load(a + rj[:, None, None] * width + cols[None, :, :], mask=(rj < r)[:, None, None] & g_ok[None],
                     other=0.0).to(tl.float32)
        tl.store(dpart + (b * kv_heads + h) * BLOCK_R + rj, tl.sum(tl.sum(av * vals[None, :, :], 2), 1))
    # release this share, acquire the others' (read past L1: other programs wrote them)
    if tl.atomic_add(counter + b, 1, sem="acq_rel") == kv_heads - 1:
        rk, ra = tl.arange(0, KV_P), tl.arange(0, BLOCK_R)
        shares = tl.load(dpart + (b * kv_heads + rk)[:, None] * BLOCK_R + ra[None, :], mask=(rk < kv_heads)[:, None],
                         other=0.0, cache_modifier=".cg")
        tl.store(xa + b * r + ra, tl.sum(shares, 0).to(xa.dtype.element_ty), mask=ra < r)
        tl.atomic_xchg(counter + b, 0)


@triton.jit
def _combine_kernel(part, stats, out, counter, kv_heads, a, dpart, xa, r, SPLITS: tl.constexpr,
                    GROUP: tl.constexpr, GROUP_P: tl.constexpr, D: tl.constexpr, CHUNK: tl.constexpr,
                    DOWN: tl.constexpr, BLOCK_R: tl.constexpr, RC: tl.constexpr, KV_P: tl.constexpr,
                    EARLY: tl.constexpr):
    """out (b, kv·GROUP, D) in out's dtype for program b·kv_heads + h: :func:`_add_splits` as a kernel of its
    own: where the split kernel's last program cannot add them, or where the tuner found this faster. DOWN:
    and its share of the LoRA down-product (:func:`_down_share`, counted in ``counter``). EARLY: as the split
    kernel's, waiting at once (everything it reads, the split kernel wrote)."""
    if EARLY:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    bh = tl.program_id(0)
    vals = _add_splits(part, stats, out, bh, SPLITS, GROUP, GROUP_P, D, CHUNK)
    if DOWN:
        _down_share(vals, a, dpart, counter, xa, bh // kv_heads, bh % kv_heads, kv_heads, r, GROUP, GROUP_P, D,
                    BLOCK_R, RC, KV_P)


def decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, pad: torch.Tensor,
                     slot: torch.Tensor, scale: float, block_l: int = 16, new: tuple | None = None,
                     rope: tuple | None = None, config: dict | None = None, down: torch.Tensor | None = None):
    """softmax(q kᵀ · scale) v for q (b, heads, 1, d) over cache slots j with pad[b] ≤ j ≤ slot (``slot`` a
    one-element long tensor, ``pad`` (b,) long; both read on the device, so a CUDA graph replays any step),
    keys/values (b, kv heads, length, d) with heads = kv heads · group. ``new``: this step's (k, v), each
    (b, kv heads, 1, d) in the cache's dtype, written into the cache at ``slot`` by the same launch (else
    the cache must hold them already). ``rope``: (cos, sin), each (length, d), when q and the new k come
    before RoPE, which the launch applies at position slot − pad[b] (k as the cache then holds it).
    ``config``: {"steps": runs of ``block_l`` slots a program takes, "last_adds": whether the split kernel's
    last program adds the partials, optionally "block": slots a run instead of ``block_l`` and "dot": the
    products as matrix products}; by default the fastest of :func:`settings` for this shape, timed once
    on the GPU outside a capture (:func:`tuned`). Returns (b, heads, 1, d) in q's dtype. ``down``: A (r,
    heads·d) of the LoRA adapter on the projection that reads the output (o); then returns (output, xa) with
    xa (b, r) = output.reshape(b, heads·d).to(A.dtype) @ Aᵀ, computed in fp32 by the launch that adds the
    splits (each kv head's share, then the last share of a row adds them) and rounded once to A's dtype:
    one launch fewer than a down-product of its own. Capturable in a CUDA graph."""
    d, length = q.shape[-1], keys.shape[2]
    if keys.stride(3) != 1 or values.stride() != keys.stride():
        raise ValueError("decode_attention reads keys and values of one layout, d contiguous")
    if new is not None and not (new[0].dtype == new[1].dtype == keys.dtype == values.dtype):
        raise ValueError("the step's k and v are written into the cache in its dtype")
    if rope is not None and (new is None or any(t.shape != (length, d) or t.stride(1) != 1 for t in rope)):
        raise ValueError("RoPE in the launch needs the step's k, v and cos, sin tables (length, d)")
    if down is not None and (down.dim() != 2 or down.shape[1] != q.shape[1] * d or down.stride(1) != 1):
        raise ValueError("the down-product's A is (r, heads·d) with unit column stride")
    args = (q, keys, values, pad, slot, scale, block_l, new, rope, down)
    return _run(*args, config if config is not None else tuned(*args))


def settings(length: int, block_l: int = 16) -> list[dict]:
    """The launch settings :func:`tuned` times: 1, 2, 4 or 8 runs a program (leaving at least 2 splits), and
    where :data:`DOT` is on, one run of 32 or 64 slots with matrix products (``block``, ``dot``; leaving at
    least 2 splits); each with the partials added by the last program (where that variant builds here) or by
    a second kernel."""
    runs = triton.cdiv(length, block_l)
    adds = (True, False) if LAST_ADDS["ok"] else (False,)
    out = [{"steps": n, "last_adds": la} for n in (1, 2, 4, 8) if n == 1 or 2 * n <= runs for la in adds]
    return out + [{"steps": 1, "last_adds": la, "block": size, "dot": True}
                  for size in (32, 64) if DOT["on"] and 2 * size <= length for la in adds]


TUNED: dict[tuple, list] = {}  # shape key -> [(seconds, setting)], fastest first


def tuned(q, keys, values, pad, slot, scale, block_l, new, rope, down=None) -> dict:
    """The fastest of :func:`settings` for this call's shape on its device, timed once as replayed CUDA graphs
    (:func:`qfine.fast.gemv_kernel.graph_seconds`) by the first call outside a capture, or read from an
    earlier process's timings (:mod:`qfine.fast.tune_cache`); before that, and off the GPU, one run a program
    with the last program adding."""
    key = (q.device, q.shape, keys.shape, q.dtype, keys.dtype, block_l, new is None, rope is None,
           None if down is None else (down.shape, down.dtype))
    default = {"steps": 1, "last_adds": LAST_ADDS["ok"]}
    if not q.is_cuda:
        return default
    got = tune_cache.known(TUNED, key, q.device)
    if got is not None:
        return got[0][1]
    if torch.cuda.is_current_stream_capturing():
        return default
    from qfine.fast.gemv_kernel import graph_seconds

    args = (q, keys, values, pad, slot, scale, block_l, new, rope, down)
    timed = []
    for cfg in settings(keys.shape[2], block_l):
        try:
            timed.append((graph_seconds(lambda cfg=cfg: _run(*args, cfg)), cfg))
        except Exception:  # noqa: BLE001 - a setting that does not build or cannot be captured is not chosen
            continue
    if not timed:
        TUNED[key] = [(0.0, default)]
        return default
    return tune_cache.measured(TUNED, key, q.device, sorted(timed, key=lambda t: t[0]))[0][1]


def _run(q, keys, values, pad, slot, scale, block_l, new, rope, down, config):
    """:func:`decode_attention` with the launch setting ``config``."""
    b, heads, _, d = q.shape
    kv, length = keys.shape[1], keys.shape[2]
    group = heads // kv
    group_p = max(1, triton.next_power_of_2(group))
    steps, dot = config["steps"], bool(config.get("dot"))
    block_l = config.get("block", block_l)
    splits = triton.cdiv(length, block_l * steps)
    chunk = max(1, min(triton.next_power_of_2(splits), ADD_TILE // (group_p * d)))  # splits added per load
    qc = q.reshape(b, heads, d).contiguous()
    part = torch.empty(b, kv, splits, group_p, d, dtype=torch.float32, device=q.device)
    stats = torch.empty(b, kv, splits, group_p, 2, dtype=torch.float32, device=q.device)
    out = torch.empty(b, heads, 1, d, dtype=q.dtype, device=q.device)
    new_k, new_v = (qc, qc) if new is None else [t.reshape(b, kv, d).contiguous() for t in new]
    cos, sin = rope if rope is not None else (qc, qc)
    # the down-product's shares (b, kv, BLOCK_R) and result; counters: one per (b, kv head), then one per row
    r = 0 if down is None else down.shape[0]
    block_r = max(1, triton.next_power_of_2(r))
    counters = _counter(q.device, b * kv + b)
    fused = down is not None and counters is not None
    a, dpart, xa = qc, qc, qc
    if fused:
        a, dpart = down, torch.empty(b, kv, block_r, dtype=torch.float32, device=q.device)
        xa = torch.empty(b, r, dtype=down.dtype, device=q.device)
    # the constexprs both kernels take, and the launch options (programmatic dependent launch or not)
    common = dict(SPLITS=splits, GROUP=group, GROUP_P=group_p, D=d, CHUNK=chunk, DOWN=fused, BLOCK_R=block_r,
                  RC=max(1, min(block_r, ADD_TILE // (group_p * d))), KV_P=triton.next_power_of_2(kv),
                  **triton_launch(q.device))

    def split(counter):
        _split_kernel[(b * kv, splits)](qc, keys, values, new_k, new_v, pad, slot, part, stats, out,
                                        qc if counter is None else counter, cos, sin, float(scale), length,
                                        keys.stride(0), keys.stride(1), keys.stride(2), kv, a, dpart, xa, r,
                                        BLOCK_L=block_l, STEPS=steps, NEW=new is not None,
                                        LAST_ADDS=counter is not None, ROPE=rope is not None, DOT=dot,
                                        GROUP_M=max(16, group_p) if dot else group_p, **common)

    counter = counters if config["last_adds"] and LAST_ADDS["ok"] else None
    try:
        split(counter)
    except Exception as e:  # noqa: BLE001 - compiled on first use: a toolchain that cannot build it is told once
        if counter is None:
            raise
        warnings.warn(f"split attention: the partials are added by a second kernel ({type(e).__name__}: {e})")
        LAST_ADDS["ok"], counter = False, None
        split(None)
    if counter is None:
        _combine_kernel[(b * kv,)](part, stats, out, qc if counters is None else counters[b * kv:], kv, a, dpart, xa,
                                   r, **common)
    if down is None:
        return out
    if not fused:  # no counter could be had (a capture would have to allocate one): the product apart
        return out, F.linear(out.reshape(b, heads * d).to(down.dtype), down)
    return out, xa
