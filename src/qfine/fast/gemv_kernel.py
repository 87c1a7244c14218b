"""A 4-bit (bitsandbytes NF4/FP4, double quantization included) matrix product for a few rows: the decode
step's y = x Wᵀ with x (m ≤ 64, k), W (n, k) packed, read once. CUDA only (Triton; on the CPU only under
Triton's interpreter, which the tests use).

At decode time a projection multiplies 1 to 64 token vectors (a batch of sequences, one token each) by a
weight read from memory, so its cost is the bytes of W: 0.5 per weight here against 2 for a dequantized bf16
copy, which bitsandbytes' ``matmul_4bit`` writes and reads again for more than one row.

:func:`matmul_4bit` is the entry point. Which kernel and launch setting serve a shape is measured once per
shape (:func:`candidates`, timed as replayed CUDA graphs): :mod:`qfine.fast.gemv_rows`' one-row and
tensor-core kernels, or bitsandbytes' own paths. :func:`matmul_4bit_group` does the same for q, k, v (gate,
up) in one launch. This module also holds the tile kernel that serves the shapes those do not fit and the
untimed small ones: (BLOCK_N, BLOCK_K) tiles of packed codes mapped to code-book values by one 8-byte gather
per byte from a 256-entry table of its two values, each block scaled by its absmax (with double
quantization: code8[q8]·absmax2 + offset, in fp32 as bitsandbytes computes it) and rounded to the activation
dtype, products accumulated in fp32 (tensor cores for 16 to 64 rows, fp32 multiply-adds for one). Its k
splits are added in a fixed order by a second small kernel. The epilogue adds, in fp32 before the one
rounding, the adapter's s·(x Aᵀ)Bᵀ, and optionally a residual after it (``residual + round(y)``, rounded
again: what ``h + o(x)`` gives in the activation dtype). The reference is dequantize-then-matmul
(``tests/test_engine.py``).
"""

from __future__ import annotations

import os
import weakref

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from qfine.fast import tune_cache
from qfine.fast.gemv_rows import _round_out, _sum_splits_kernel, fits, groupable, matmul_group, matmul_rows
from qfine.fast.mma_kernel import candidates as mma_candidates
from qfine.fast.mma_kernel import group_candidates, matmul_mma_silu, pair_candidates, precompile
from qfine.fast.mma_kernel import row_tile as _row_tile

MAX_ROWS = 64
# Triton's CPU interpreter (the tests' way to run these kernels without a GPU) computes fp32 dots exactly;
# on a GPU they would be TF32, so there only 16-bit activations are taken
_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
_DTYPES = (torch.float16, torch.bfloat16) + ((torch.float32,) if _INTERPRETED else ())


@triton.jit
def _weights(packed, pairs, absmax_q, code8, absmax2, offset, rn, n_ok, k0, k_end, k, k_bytes, dtype: tl.constexpr,
             BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, NESTED: tl.constexpr, BLOCK_N: tl.constexpr,
             BLOCK_K: tl.constexpr, EVEN: tl.constexpr):
    """W[rn, k0 : k0 + BLOCK_K] dequantized, (BLOCK_N, BLOCK_K) in ``dtype``; zero past k_end or n. With
    EVEN (every tile inside the row) the packed bytes are read without a k mask, as 16-byte vectors: the
    row offsets (rn · k_bytes) and tile starts are multiples of 16."""
    rb = tl.multiple_of(k0 // 2, 16) + tl.arange(0, BLOCK_K // 2)
    ptr = packed + (rn.to(tl.int64) * k_bytes)[:, None] + rb[None, :]
    if EVEN:
        byte = tl.load(ptr, mask=n_ok[:, None], other=0).to(tl.int32)
    else:
        byte = tl.load(ptr, mask=n_ok[:, None] & (rb[None, :] < k_end // 2), other=0).to(tl.int32)
    # (BLOCK_N, BLOCK_K // 2, 2) code values from the pair table, high nibble first
    w = tl.reshape(tl.load(pairs + byte[:, :, None] * 2 + tl.arange(0, 2)[None, None, :]), (BLOCK_N, BLOCK_K))
    kb = k0 + tl.arange(0, BLOCK_K // BLOCKSIZE) * BLOCKSIZE  # first weight of each absmax block
    blk = (rn.to(tl.int64)[:, None] * k + kb[None, :]) // BLOCKSIZE
    blk_ok = n_ok[:, None] & (kb[None, :] < k_end)  # a last k split's tiles may run past the row's end
    if NESTED:
        q8 = tl.load(absmax_q + blk, mask=blk_ok, other=0).to(tl.int32)
        amax = tl.load(code8 + q8) * tl.load(absmax2 + blk // BLOCKSIZE2, mask=blk_ok, other=0.0)
        amax = amax + tl.load(offset)
    else:
        amax = tl.load(absmax_q + blk, mask=blk_ok, other=0.0)
    w = tl.reshape(tl.reshape(w, (BLOCK_N, BLOCK_K // BLOCKSIZE, BLOCKSIZE)) * amax[:, :, None], (BLOCK_N, BLOCK_K))
    if not EVEN:
        rk = k0 + tl.arange(0, BLOCK_K)
        w = tl.where(rk[None, :] < k_end, w, 0.0)
    return w.to(dtype)


@triton.jit
def _gemv4_kernel(x, packed, pairs, absmax_q, code8, absmax2, offset, out, res, m, n, k, k_bytes,
                  k_per_split: tl.constexpr,
                  stride_xm, xa, stride_xa, lora_b, scale, r, BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr,
                  NESTED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                  LORA: tl.constexpr, BLOCK_R: tl.constexpr, SPLIT: tl.constexpr, RESIDUAL: tl.constexpr,
                  EVEN: tl.constexpr):
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
        w = _weights(packed, pairs, absmax_q, code8, absmax2, offset, rn, n_ok, k0, k_end, k, k_bytes, dtype,
                     BLOCKSIZE, BLOCKSIZE2, NESTED, BLOCK_N, BLOCK_K, EVEN)
        rk = tl.multiple_of(k0, 16) + tl.arange(0, BLOCK_K)
        if BLOCK_M == 1:  # one row: exact fp32 products (bf16·bf16 fits fp32), summed at the end
            if EVEN:  # no k mask: the loads stay vectors
                xs = tl.load(x + rk)
            else:
                xs = tl.load(x + rk, mask=rk < k_end, other=0.0)
            wide += w.to(tl.float32) * xs.to(tl.float32)[None, :]
        else:
            xp = x + rm[:, None] * stride_xm + rk[None, :]
            if EVEN:
                xs = tl.load(xp, mask=rm[:, None] < m, other=0.0)
            else:
                xs = tl.load(xp, mask=(rm[:, None] < m) & (rk[None, :] < k_end), other=0.0)
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
        where = rm[:, None] * n + rn[None, :]
        tl.store(out + where, _round_out(acc, res, where, ok, dtype, RESIDUAL), mask=ok)
    else:
        tl.store(out + pid_k.to(tl.int64) * m * n + rm[:, None] * n + rn[None, :], acc, mask=ok)


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
    """Tile sizes, k splits and warps for an (m ≤ 64, k) × (n, k)ᵀ product, without measuring: column tiles
    of 32 (16 when that alone does not give every SM two programs), k tiles of 256 (128 above 16 rows), and
    k split (evenly, in whole tiles) until there are about 4 programs per SM with ≥ 1,024 weights of k each."""
    block_n = 32 if triton.cdiv(n, 32) >= 2 * sms else 16
    block_k = 256 if m <= 16 else 128
    tiles = triton.cdiv(n, block_n)
    split = max(1, min(triton.cdiv(4 * sms, tiles), k // 1024))
    while split > 1 and (k % block_k or (k // block_k) % split):
        split -= 1
    return {"BLOCK_N": block_n, "BLOCK_K": block_k, "SPLIT": split, "num_warps": 4}


def candidates(m: int, n: int, k: int, blocksize: int = 64) -> list[dict]:
    """Launch settings worth timing for this shape, from :mod:`qfine.fast.gemv_rows` (the code book decoded
    by byte permutes; k splits summed by their last program, ``SERIAL``): for one row its CUDA-core kernel
    (``KERNEL`` "row", the fastest at every 8B shape on an H100) and its tensor-core kernel ("tc"), for more
    rows the tensor-core kernel; beside them bitsandbytes' own path: for one row its 4-bit matrix-vector
    kernel (``BNB_GEMV``), for more its dequantization to a 16-bit W then one cuBLAS product
    (``DEQUANTIZE``). This module's tile kernel serves the shapes none of these fits (:func:`launch_config`)."""
    out = [{"DEQUANTIZE": True}] if m > 1 else [{"BNB_GEMV": True}]
    new = [{"KERNEL": "tc", "BLOCK_N": bn, "SPLIT": split, "num_warps": 4, "PRMT": True, "SERIAL": split > 1}
           for bn in (64, 128) for split in (1, 2, 4, 8, 16)]
    if torch.cuda.is_available() and not _INTERPRETED:  # CUDA C++, compiled by NVRTC: not under the interpreter
        new += mma_candidates(m)
    if m == 1:
        new += [{"KERNEL": "row", "BLOCK_N": 16, "BLOCK_K": 512, "SPLIT": split, "num_warps": 4, "PRMT": True,
                 "PREFETCH": True} for split in (1, 2, 4)]
    out += [cfg for cfg in new if fits(cfg, m, k, blocksize)]
    return out if len(out) > 1 else out + [launch_config(m, n, k, 132)]


TUNE_MIN_WEIGHTS = 1 << 22  # weights below this use launch_config: timing would cost more than it saves
TUNED: dict[tuple, list] = {}  # key -> [(seconds, config), ...] fastest first, as measured


def graph_seconds(fn, launches: int = 20, repeat: int = 5) -> float:
    """GPU seconds per call of ``fn`` as a decode step runs it: ``launches`` calls captured in one CUDA
    graph and replayed (median of ``repeat`` replays after one), so Python and launch overhead, which a
    replayed step does not pay, are not counted. Raises RuntimeError if ``fn`` cannot be captured."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()  # compilation and allocations outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        for _ in range(launches):
            fn()
    times = []
    for _ in range(repeat + 1):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000 / launches)
    del graph
    return sorted(times[1:])[repeat // 2]


def _tuned_config(x2: torch.Tensor, weight, lora, residual) -> dict:
    """The fastest of :func:`candidates` for this shape on this device (:func:`graph_seconds`), timed once
    per (device, row tile height, n, k, dtype, quantization layout) outside any CUDA-graph capture (during a
    capture, an untimed shape gets :func:`launch_config`) and kept for later processes
    (:func:`qfine.fast.tune_cache.known`). A candidate whose result is not within bf16 rounding of
    bitsandbytes' own is left out."""
    state = weight.quant_state
    (n, k), m = state.shape, x2.shape[0]
    if n * k < TUNE_MIN_WEIGHTS or _INTERPRETED:
        return launch_config(m, n, k, _sms(x2.device))
    key = single_key(x2, weight, lora is not None)
    got = tune_cache.known(TUNED, key, x2.device)
    if got is None:
        if torch.cuda.is_current_stream_capturing():
            return launch_config(m, n, k, _sms(x2.device))
        want = _dequantized(x2, weight, lora, residual).float()
        settings = candidates(m, n, k, state.blocksize)
        precompile(x2, [(weight, lora)], residual, [cfg for cfg in settings if cfg.get("KERNEL") == "mma"])
        timed = _timed(settings,
                       lambda c: [matmul_4bit(x2, weight, lora, residual, config=c)], [want])
        if not timed:
            return launch_config(m, n, k, _sms(x2.device))
        got = tune_cache.measured(TUNED, key, x2.device, sorted(timed, key=lambda t: t[0]))
    return got[0][1]


def single_key(x2: torch.Tensor, weight, lora: bool) -> tuple:
    """The key :func:`matmul_4bit`'s measured setting for x2 (rows, k) and this weight is kept under."""
    state = weight.quant_state
    n, k = state.shape
    return (x2.device, _row_tile(x2.shape[0]), n, k, x2.dtype, state.blocksize, bool(state.nested), lora)


def group_key(x2: torch.Tensor, members: list[tuple]) -> tuple:
    """The key :func:`matmul_4bit_group`'s measured setting for x2 and these (weight, lora) pairs is kept under."""
    state = members[0][0].quant_state
    shapes = tuple(w.quant_state.shape[0] for w, _ in members)
    return ("group", x2.device, _row_tile(x2.shape[0]), shapes, x2.shape[1], x2.dtype, state.blocksize,
            bool(state.nested), members[0][1] is not None)


def silu_key(x2: torch.Tensor, gate: tuple) -> tuple:
    """The key :func:`matmul_4bit_silu`'s measured setting for x2 and this gate (weight, lora) is kept under."""
    state = gate[0].quant_state
    return ("silu", x2.device, _row_tile(x2.shape[0]), state.shape[0], x2.shape[1], x2.dtype, state.blocksize,
            bool(state.nested), gate[1] is not None)


def _rows(x: torch.Tensor, k: int) -> torch.Tensor:
    """x (..., k) as the kernels read it: (rows, k) with unit stride along k (one row contiguous)."""
    x2 = x.reshape(-1, k)
    if x2.stride(1) != 1 or (x2.shape[0] == 1 and not x2.is_contiguous()):
        x2 = x2.contiguous()
    return x2


def _timed(settings: list[dict], run, want: list[torch.Tensor]) -> list[tuple[float, dict]]:
    """[(seconds, setting)] (:func:`graph_seconds` of ``run(setting)``) for each setting whose outputs
    ``run(setting)`` are all within bf16 rounding (2e-2 of the largest value) of the fp32 ``want``: a wrong
    setting is never chosen, and one this device cannot build or capture is left out."""
    timed = []
    for cfg in settings:
        try:
            if not all((got.float() - w).abs().max() <= 2e-2 * w.abs().max() for got, w in zip(run(cfg), want)):
                continue
            timed.append((graph_seconds(lambda c=cfg: run(c)), cfg))
        except Exception:  # noqa: BLE001 - a setting this device cannot build or capture is not a candidate
            continue
    return timed


def _dequantized(x2: torch.Tensor, weight, lora, residual) -> torch.Tensor:
    """The same product through bitsandbytes (for one row without autograd its matrix-vector kernel, else
    dequantization and cuBLAS), rounded as peft rounds it (the base product and the adapter's term each
    in x's dtype, then added)."""
    import bitsandbytes.functional as bnbf

    if x2.shape[0] == 1 and not torch.is_grad_enabled():  # bitsandbytes' matrix-vector kernel
        y = bnbf.gemv_4bit(x2, weight.data.t(), state=weight.quant_state)
    else:
        y = F.linear(x2, bnbf.dequantize_4bit(weight.data, weight.quant_state).to(x2.dtype))
    if lora is not None:
        xa, b, scale = lora
        y = y + (F.linear(xa.reshape(x2.shape[0], -1), b) * scale).to(y.dtype)
    return y if residual is None else residual.reshape(y.shape) + y


def matmul_4bit(x: torch.Tensor, weight, lora: tuple | None = None, residual: torch.Tensor | None = None,
                config: dict | None = None) -> torch.Tensor:
    """x (..., k) @ Wᵀ for a bitsandbytes ``Params4bit`` W (n, k): (..., n) in x's dtype; with ``lora`` =
    (xa (rows, r), B (n, r), s), plus s · xa Bᵀ, accumulated in fp32 with the product before the one
    rounding to x's dtype (xa = x Aᵀ, computed by the caller in the adapter's dtype); with ``residual``
    (..., n) in x's dtype, residual + that rounded product, rounded again. ``config``: one of
    :func:`candidates` or :func:`launch_config`'s; when None, the fastest measured for this shape.

    Requires :func:`usable`. Capturable in a CUDA graph (no host synchronisation, fixed launch shape)."""
    state = weight.quant_state
    n, k = state.shape
    x2 = _rows(x, k)
    m = x2.shape[0]
    cfg = config or _tuned_config(x2, weight, lora, residual)
    if cfg.get("DEQUANTIZE") or cfg.get("BNB_GEMV"):
        return _dequantized(x2, weight, lora, residual).reshape(*x.shape[:-1], n)
    if cfg.get("KERNEL"):
        return matmul_rows(x2, weight, lora, residual, cfg, _INTERPRETED).reshape(*x.shape[:-1], n)
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
        x2, weight.data, _pairs(state), state.absmax, code8, absmax2, offset, part, res, m, n, k, k // 2, per,
        x2.stride(0), xa, xa.stride(0), lora_b, float(scale), r, BLOCKSIZE=state.blocksize, BLOCKSIZE2=blocksize2,
        NESTED=nested, BLOCK_M=block_m, BLOCK_N=cfg["BLOCK_N"], BLOCK_K=block_k, LORA=lora is not None,
        BLOCK_R=max(16, triton.next_power_of_2(r)), SPLIT=split, RESIDUAL=residual is not None,
        EVEN=k % per == 0, num_warps=cfg["num_warps"])
    if split > 1:
        block = 1024
        _sum_splits_kernel[(triton.cdiv(m * n, block),)](part, out, res, m * n, SPLIT=split,
                                                         RESIDUAL=residual is not None, BLOCK=block)
    return out.reshape(*x.shape[:-1], n)


GROUP_DEFAULT = {"KERNEL": "tc", "BLOCK_N": 64, "SPLIT": 1, "num_warps": 4, "PRMT": True}


def matmul_4bit_group(x: torch.Tensor, members: list[tuple]) -> list[torch.Tensor] | None:
    """[x @ Wᵢᵀ (+ sᵢ·xaᵢ Bᵢᵀ)] for the (weight, lora) pairs of projections that read one input (q, k, v;
    gate, up) in one launch (:func:`qfine.fast.gemv_rows.matmul_group`), each (..., nᵢ) in x's dtype; or
    None where one launch does not serve them (:func:`qfine.fast.gemv_rows.groupable`), where the weights are
    too small to be worth timing (:data:`TUNE_MIN_WEIGHTS`), or where, as measured once per shape like
    :func:`matmul_4bit`'s settings, it is not faster than a call per projection. Requires :func:`usable` for
    each weight."""
    k = x.shape[-1]
    x2 = _rows(x, k)
    if not groupable(x2, members):
        return None
    m, state = x2.shape[0], members[0][0].quant_state
    shapes = tuple(w.quant_state.shape[0] for w, _ in members)
    cfg = GROUP_DEFAULT  # the interpreter's (the CPU tests of the grouped path); on a GPU only when measured
    if not _INTERPRETED:
        if sum(shapes) * k < TUNE_MIN_WEIGHTS:
            return None
        key = group_key(x2, members)
        got = tune_cache.known(TUNED, key, x2.device)
        if got is None:
            if torch.cuda.is_current_stream_capturing():
                return None
            got = tune_cache.measured(TUNED, key, x2.device, _time_group(x2, members, m, k, state.blocksize))
        cfg = got[0][1]
    if cfg.get("SEPARATE") or not fits(cfg, m, k, state.blocksize):
        return None
    return [y.reshape(*x.shape[:-1], y.shape[-1]) for y in matmul_group(x2, members, cfg, _INTERPRETED)]


def _time_group(x2: torch.Tensor, members: list[tuple], m: int, k: int, blocksize: int) -> list:
    """[(seconds, setting)] fastest first: one call per projection (``SEPARATE``, each at its own measured
    setting) against one grouped launch per tensor-core setting whose outputs are within bf16 rounding of
    the separate calls'."""
    separate = [matmul_4bit(x2, w, lora).float() for w, lora in members]
    timed = [(graph_seconds(lambda: [matmul_4bit(x2, w, lora) for w, lora in members]), {"SEPARATE": True})]
    settings = [cfg for cfg in candidates(m, sum(w.quant_state.shape[0] for w, _ in members), k, blocksize)
                if cfg.get("KERNEL") == "tc" and fits(cfg, m, k, blocksize)]
    if torch.cuda.is_available() and not _INTERPRETED:
        grouped = [cfg for cfg in group_candidates(m) if fits(cfg, m, k, blocksize)]
        precompile(x2, members, None, grouped)
        settings += grouped
    timed += _timed(settings, lambda c: matmul_group(x2, members, c, _INTERPRETED), separate)
    return sorted(timed, key=lambda t: t[0])


def matmul_4bit_silu(x: torch.Tensor, gate: tuple, up: tuple) -> torch.Tensor | None:
    """silu(x Wgᵀ + sg·xag Bgᵀ) · (x Wuᵀ + su·xau Buᵀ), (..., n) in x's dtype, for the (weight, lora) pairs of
    a gated MLP's gate and up projections in one launch of :func:`qfine.fast.mma_kernel.matmul_mma_silu`; or
    None where that does not serve them (not CUDA, more than 16 rows, different shapes, too small to time)
    or, as measured once per shape, is not faster than the two products and the activation apart."""
    k = x.shape[-1]
    x2 = _rows(x, k)
    m, state = x2.shape[0], gate[0].quant_state
    n = state.shape[0]
    if (_INTERPRETED or not x2.is_cuda or m > 16 or up[0].quant_state.shape != state.shape
            or 2 * n * k < TUNE_MIN_WEIGHTS or (gate[1] is None) != (up[1] is None)):
        return None
    key = silu_key(x2, gate)
    got = tune_cache.known(TUNED, key, x2.device)
    if got is None:
        if torch.cuda.is_current_stream_capturing():
            return None

        def apart():
            return F.silu(matmul_4bit(x2, *gate)) * matmul_4bit(x2, *up)

        timed = [(graph_seconds(apart), {"SEPARATE": True})]
        settings = [cfg for cfg in pair_candidates(m) if fits(cfg, m, k, state.blocksize)]
        precompile(x2, [gate, up], None, settings, pair=True)
        timed += _timed(settings, lambda c: [matmul_mma_silu(x2, gate, up, c)], [apart().float()])
        got = tune_cache.measured(TUNED, key, x2.device, sorted(timed, key=lambda t: t[0]))
    cfg = got[0][1]
    if cfg.get("SEPARATE"):
        return None
    return matmul_mma_silu(x2, gate, up, cfg).reshape(*x.shape[:-1], n)
