"""GGML's K-quants (Q4_K, Q5_K, Q6_K) written in numpy, vectorised over all blocks of a tensor.

The ``gguf`` package reads these formats (``gguf.quants.dequantize``) but cannot write them. Each
function here takes rows of float32 whose length is a multiple of 256 and returns the bytes of the
blocks, laid out exactly as that dequantizer (and llama.cpp) reads them:

* **Q4_K** — 144 bytes per 256 values: fp16 ``d`` and ``dmin``, 12 bytes packing eight 6-bit scales
  and eight 6-bit mins, 128 bytes of 4-bit quants. Sub-block j (32 values) decodes as
  ``d·sc_j·q − dmin·m_j``, q ∈ [0, 15].
* **Q5_K** — 176 bytes: as Q4_K plus 32 bytes holding the fifth bit of every quant; q ∈ [0, 31].
* **Q6_K** — 210 bytes: 128 bytes of low 4 bits, 64 bytes of high 2 bits, sixteen int8 scales (one per
  16 values), fp16 ``d``: ``d·sc_j·(q − 32)``, q ∈ [0, 63].

The encoders search scales as llama.cpp's reference quantizers do (``quantize_row_q*_K_ref`` of
ggml-quants.c, llama.cpp 80fb11a; the algorithm carries over, vectorised here): per 32-value
sub-block of Q4_K/Q5_K, candidate inverse scales around ``nmax / (max − min)`` each give levels, a
weighted least-squares fit of scale and min to them (weights ``rms(sub-block) + |x|``), and the fit
with the least weighted error wins; Q6_K's 16-value sub-blocks try inverse scales around
``−32 / x_absmax`` with weights ``x²``. The sub-block scales (and mins) are then rounded onto the 6-bit
(Q6_K: 8-bit) grid under the block's fp16 scale and every value takes its nearest level, which may
clip a value the fit judged cheaper to clip. ``bench/kquant_error.py`` compares the error with
llama.cpp's own encoder, compiled from the source node-llama-cpp ships.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

QK_K = 256


def _blocks(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.shape[-1] % QK_K:
        raise ValueError(f"K-quants need rows of a multiple of {QK_K} values, not {x.shape[-1]}")
    return x.reshape(-1, QK_K)


def _pack_scales_mins(sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    """Eight 6-bit scales and mins per block → the 12-byte layout of Q4_K/Q5_K."""
    sc, mn = sc.astype(np.uint8), mn.astype(np.uint8)
    out = np.empty((sc.shape[0], 12), dtype=np.uint8)
    out[:, 0:4] = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    out[:, 4:8] = mn[:, :4] | ((mn[:, 4:] >> 4) << 6)
    out[:, 8:12] = (sc[:, 4:] & 0x0F) | ((mn[:, 4:] & 0x0F) << 4)
    return out


_CHUNK = 8192  # sub-blocks per pass of the search: its arrays stay in the CPU's cache


def _each_chunk(fn, rows: np.ndarray, size: int) -> list:
    """``fn`` over ``rows`` in chunks of ``size``, on every core (numpy releases the GIL in its loops)."""
    chunks = [rows[i: i + size] for i in range(0, len(rows), size)]
    if len(chunks) == 1:
        return [fn(chunks[0])]
    with ThreadPoolExecutor(max_workers=min(len(chunks), os.cpu_count() or 1)) as pool:
        return list(pool.map(fn, chunks))


def _qkx2(sub: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int,
          w: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """llama.cpp's ``make_qkx2_quants`` (``w`` None: weights ``rms(sub-block) + |x|``) or, with weights
    ``w`` (n, 32), ``make_qkx3_quants``, for every sub-block at once: ``sub`` (n, 32) → (scale, min)
    per sub-block with x ≈ scale·q − min, q ∈ [0, nmax], min ≥ 0."""
    both = sub if w is None else np.concatenate([sub, w], axis=1)
    parts = _each_chunk(lambda part: _qkx2_chunk(part, nmax, rmin, rdelta, nstep, w is not None), both, _CHUNK)
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def _qkx2_chunk(part, nmax, rmin, rdelta, nstep, weighted):
    n = part.shape[1] // 2 if weighted else part.shape[1]
    sub = part[:, :n]
    w = part[:, n:] if weighted else np.sqrt((sub * sub).mean(axis=1, keepdims=True)) + np.abs(sub)
    lo = np.minimum(sub.min(axis=1), 0.0)
    span = sub.max(axis=1) - lo
    flat = span <= 0
    span = np.where(flat, np.float32(1), span)
    shifted = sub - lo[:, None]
    wx = w * sub
    # weighted sums in float64: a fit's error comes from them without another pass over the values,
    # E = s²·Σwl² + 2sm·Σwl − 2s·Σwlx + m²·Σw − 2m·Σwx + Σwx²
    sum_w, sum_x, sum_x2 = (w.sum(axis=1, dtype=np.float64), wx.sum(axis=1, dtype=np.float64),
                            (wx * sub).sum(axis=1, dtype=np.float64))

    def sums(iscale):
        lv = np.clip(np.rint(iscale[:, None] * shifted), 0, nmax)
        wl = w * lv
        return (wl.sum(axis=1, dtype=np.float64), (wl * lv).sum(axis=1, dtype=np.float64),
                (wl * sub).sum(axis=1, dtype=np.float64))

    def error(scale, low, sum_l, sum_l2, sum_xl):
        return (scale * scale * sum_l2 + 2 * scale * low * sum_l - 2 * scale * sum_xl + low * low * sum_w
                - 2 * low * sum_x + sum_x2)

    best_scale = (span / nmax).astype(np.float64)
    best_low = lo.astype(np.float64)
    best_err = error(best_scale, best_low, *sums(nmax / span))
    for step in range(nstep + 1):
        sum_l, sum_l2, sum_xl = sums((rmin + rdelta * step + nmax) / span)
        det = sum_w * sum_l2 - sum_l * sum_l
        ok = det > 0
        det = np.where(ok, det, 1.0)
        scale = (sum_w * sum_xl - sum_x * sum_l) / det
        low = (sum_l2 * sum_x - sum_l * sum_xl) / det
        positive = low > 0  # the min is subtracted, so it may not be positive: refit the scale alone
        scale = np.where(positive, sum_xl / np.where(sum_l2 > 0, sum_l2, 1.0), scale)
        low = np.where(positive, 0.0, low)
        err = error(scale, low, sum_l, sum_l2, sum_xl)
        better = ok & (err < best_err)
        best_err = np.where(better, err, best_err)
        best_scale = np.where(better, scale, best_scale)
        best_low = np.where(better, low, best_low)
    return (np.where(flat, 0.0, best_scale).astype(np.float32),
            np.where(flat, -lo, -best_low).astype(np.float32))


def _qp(x: np.ndarray, nmax: int, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """llama.cpp's ``make_qp_quants`` for every row at once: non-negative ``x`` (n, k) with weights
    ``w`` → (scale (n, 1), levels (n, k) in [0, nmax]) with x ≈ scale·level: inverse scales around
    ``nmax / max`` tried, then up to five passes that move single levels while the weighted fit improves."""
    top = x.max(axis=1, keepdims=True)
    live = top >= 1e-15
    top = np.where(live, top, 1.0)

    def mse(iscale):
        lv = np.minimum(np.rint(iscale * x), nmax)
        return (w * (x - lv / iscale) ** 2).sum(axis=1, keepdims=True)

    iscale = nmax / top
    best = (w * (x - np.rint(iscale * x) / iscale) ** 2).sum(axis=1, keepdims=True)
    for step in (-4, -3, -2, -1, 1, 2, 3, 4):
        trial = (0.1 * step + nmax) / top
        err = mse(trial)
        iscale = np.where(err < best, trial, iscale)
        best = np.minimum(err, best)
    lv = np.minimum(np.rint(iscale * x), nmax)
    sumlx, suml2 = (w * x * lv).sum(axis=1, keepdims=True), (w * lv * lv).sum(axis=1, keepdims=True)
    for _ in range(5):
        changed = np.zeros(x.shape[0], dtype=bool)
        for i in range(x.shape[1]):
            wi, xi, li = w[:, i:i + 1], x[:, i:i + 1], lv[:, i:i + 1]
            slx, sl2 = sumlx - wi * xi * li, suml2 - wi * li * li
            ok = (slx > 0) & (sl2 > 0)
            new = np.minimum(np.rint(xi * sl2 / np.where(ok, slx, 1.0)), nmax)
            slx2, sl22 = slx + wi * xi * new, sl2 + wi * new * new
            take = ok & (new != li) & (slx2 * slx2 * suml2 > sumlx * sumlx * sl22)
            lv[:, i:i + 1] = np.where(take, new, li)
            sumlx, suml2 = np.where(take, slx2, sumlx), np.where(take, sl22, suml2)
            changed |= take[:, 0]
        if not changed.any():
            break
    scale = np.where(live & (suml2 > 0), sumlx / np.where(suml2 > 0, suml2, 1.0), 0.0)
    return scale.astype(np.float32), np.where(live, lv, 0)


def _importance_weights(blocks: np.ndarray, importance: np.ndarray) -> np.ndarray:
    """llama.cpp's weights under an importance matrix: ``qw · sqrt(σ² + x²)`` with σ² = 2·mean(x²) of
    the 256-value block; ``importance`` (n_per_row,) repeats over the rows of ``blocks`` (n, 256)."""
    qw = np.tile(np.asarray(importance, dtype=np.float32).reshape(-1, QK_K), (blocks.shape[0] * QK_K
                                                                             // importance.size, 1))
    sigma2 = 2 * (blocks * blocks).mean(axis=1, keepdims=True)
    return qw * np.sqrt(sigma2 + blocks * blocks)


def _affine(blocks: np.ndarray, levels: int, rmin: float, nstep: int, importance: np.ndarray | None = None):
    """Scales/mins and quants of the asymmetric K-quants: x ≈ d·sc·q − dmin·m per 32 values. With an
    ``importance`` vector (one weight per column), llama.cpp's ``_impl`` search: weighted sub-block fits
    (make_qkx3) and block scales fitted to them (make_qp) instead of taken from their largest."""
    sub = blocks.reshape(-1, 8, 32)
    if importance is None:
        scale, low = _qkx2(sub.reshape(-1, 32), levels, rmin, 0.1, nstep)
        scale, low = scale.reshape(-1, 8), low.reshape(-1, 8)
        top_scale = scale.max(axis=1, keepdims=True).clip(min=0)
        top_low = low.max(axis=1, keepdims=True).clip(min=0)
        sc = np.minimum(np.rint(np.where(top_scale > 0, 63 / np.where(top_scale > 0, top_scale, 1), 0) * scale), 63)
        mn = np.minimum(np.rint(np.where(top_low > 0, 63 / np.where(top_low > 0, top_low, 1), 0) * low), 63)
        d = (top_scale / 63).astype(np.float16).astype(np.float32)
        dmin = (top_low / 63).astype(np.float16).astype(np.float32)
    else:
        w = _importance_weights(blocks, importance).reshape(-1, 32)
        scale, low = _qkx2(sub.reshape(-1, 32), levels, -0.9, 0.05, 36, w)
        sw = w.sum(axis=1).reshape(-1, 8)
        d, sc = _qp(scale.reshape(-1, 8), 63, sw)
        dmin, mn = _qp(low.reshape(-1, 8), 63, sw)
        d, dmin = d.astype(np.float16).astype(np.float32), dmin.astype(np.float16).astype(np.float32)
    step = d * sc
    offset = dmin * mn
    safe = np.where(step > 0, step, 1.0)[..., None]
    q = np.clip(np.rint((sub + offset[..., None]) / safe), 0, levels)
    q = np.where(step[..., None] > 0, q, 0).astype(np.uint8)
    return d, dmin, sc.astype(np.uint8), mn.astype(np.uint8), q


def _qx(sub: np.ndarray, nmax: int, w: np.ndarray | None = None) -> np.ndarray:
    """llama.cpp's ``make_qx_quants`` (weights x², or ``w`` (n, 16)) for every sub-block: ``sub``
    (n, 16) → the signed scale per sub-block (x ≈ scale·l, l ∈ [−nmax, nmax − 1])."""
    both = sub if w is None else np.concatenate([sub, w], axis=1)
    return np.concatenate(_each_chunk(lambda part: _qx_chunk(part, nmax, w is not None), both, 2 * _CHUNK))


def _qx_chunk(part: np.ndarray, nmax: int, weighted: bool) -> np.ndarray:
    n = part.shape[1] // 2 if weighted else part.shape[1]
    sub = part[:, :n]
    idx = np.abs(sub).argmax(axis=1)
    top = np.take_along_axis(sub, idx[:, None], axis=1)[:, 0]
    zero = np.abs(top) < 1e-15
    top = np.where(zero, 1.0, top)
    w = part[:, n:] if weighted else sub * sub

    def fit(iscale):
        lv = np.clip(np.rint(iscale[:, None] * sub), -nmax, nmax - 1)
        return (w * sub * lv).sum(axis=1), (w * lv * lv).sum(axis=1)

    sumlx, suml2 = fit(-nmax / top)
    scale = np.where(suml2 > 0, sumlx / np.where(suml2 > 0, suml2, 1.0), 0.0)
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        sumlx, suml2 = fit(-(nmax + 0.1 * step) / top)
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        scale = np.where(better, sumlx / np.where(suml2 > 0, suml2, 1.0), scale)
        best = np.where(better, scale * sumlx, best)
    return np.where(zero, 0.0, scale)


def _f16_bytes(v: np.ndarray) -> np.ndarray:
    return v.astype(np.float16).reshape(-1, 1).view(np.uint8)


def quantize_q4_k(x: np.ndarray, importance: np.ndarray | None = None) -> np.ndarray:
    """(rows, n) float32 → (rows, n/256·144) uint8 Q4_K blocks; ``importance``: (n,) column weights."""
    blocks = _blocks(x)
    d, dmin, sc, mn, q = _affine(blocks, 15, -1.0, 20, importance)
    pairs = q.reshape(-1, 4, 2, 32)
    qs = (pairs[:, :, 0] | (pairs[:, :, 1] << 4)).reshape(-1, 128)
    out = np.concatenate([_f16_bytes(d), _f16_bytes(dmin), _pack_scales_mins(sc, mn), qs], axis=1)
    return out.reshape(*x.shape[:-1], -1)


def quantize_q5_k(x: np.ndarray, importance: np.ndarray | None = None) -> np.ndarray:
    """(rows, n) float32 → (rows, n/256·176) uint8 Q5_K blocks; ``importance``: (n,) column weights."""
    blocks = _blocks(x)
    d, dmin, sc, mn, q = _affine(blocks, 31, -0.5, 15, importance)
    low = q & 0x0F
    pairs = low.reshape(-1, 4, 2, 32)
    qs = (pairs[:, :, 0] | (pairs[:, :, 1] << 4)).reshape(-1, 128)
    high = (q >> 4) & 1                                # (blocks, 8 sub-blocks, 32)
    qh = np.zeros((q.shape[0], 32), dtype=np.uint8)
    for j in range(8):                                 # bit j of qh[l]: the high bit of sub-block j, value l
        qh |= (high[:, j] << j).astype(np.uint8)
    out = np.concatenate([_f16_bytes(d), _f16_bytes(dmin), _pack_scales_mins(sc, mn), qh, qs], axis=1)
    return out.reshape(*x.shape[:-1], -1)


def quantize_q6_k(x: np.ndarray, importance: np.ndarray | None = None) -> np.ndarray:
    """(rows, n) float32 → (rows, n/256·210) uint8 Q6_K blocks; ``importance``: (n,) column weights
    (llama.cpp weighs Q6_K's fits by them alone)."""
    blocks = _blocks(x)
    sub = blocks.reshape(-1, 16, 16)
    w = None
    if importance is not None:
        w = np.tile(np.asarray(importance, dtype=np.float32), blocks.size // importance.size).reshape(-1, 16)
    scales = _qx(sub.reshape(-1, 16), 32, w).reshape(-1, 16)
    top = np.take_along_axis(scales, np.abs(scales).argmax(axis=1)[:, None], axis=1)  # signed, largest |scale|
    live = np.abs(top) >= 1e-15
    iscale = np.where(live, -128.0 / np.where(live, top, 1.0), 0.0)
    d = np.where(live, 1 / np.where(live, iscale, 1.0), 0.0).astype(np.float16).astype(np.float32)
    sc = np.minimum(np.rint(iscale * scales), 127)
    step = d * sc
    safe = np.where(step != 0, step, 1.0)[..., None]
    q = np.clip(np.rint(sub / safe), -32, 31) + 32
    q = np.where(step[..., None] != 0, q, 32).astype(np.uint8).reshape(-1, 8, 32)  # 8 chunks of 32
    ql = np.zeros((q.shape[0], 128), dtype=np.uint8)
    qh = np.zeros((q.shape[0], 64), dtype=np.uint8)
    for c in range(8):                                 # chunk c: elements 32c .. 32c+31 of the block
        half, nibble, part = c // 4, (c % 4) // 2, c % 2
        lo = half * 64 + part * 32
        ql[:, lo: lo + 32] |= ((q[:, c] & 0x0F) << (4 * nibble)).astype(np.uint8)
        qh[:, half * 32: half * 32 + 32] |= (((q[:, c] >> 4) & 0x03) << (2 * (c % 4))).astype(np.uint8)
    out = np.concatenate([ql, qh, sc.astype(np.int8).view(np.uint8), _f16_bytes(d)], axis=1)
    return out.reshape(*x.shape[:-1], -1)


QUANTIZERS = {"q4_k": quantize_q4_k, "q5_k": quantize_q5_k, "q6_k": quantize_q6_k}
