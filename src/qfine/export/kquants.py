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

The encoder is the plain one: each sub-block's range is covered exactly (scales and mins rounded
*up* onto their 6/8-bit grids, the super-block scales rounded up in fp16), then every value takes
the nearest level. So the error of any value is at most half a quantization step of its sub-block,
plus (Q4_K/Q5_K) the rounding of that sub-block's min — the bound :func:`error_bound` states from
the bytes. llama.cpp's own encoder searches scales for a lower mean error; its bytes differ, the
layout and the bound are the same.
"""

from __future__ import annotations

import numpy as np

QK_K = 256
_F16_MAX = 65504.0


def _f16_up(x: np.ndarray) -> np.ndarray:
    """x rounded *up* to the next fp16 value (x ≥ 0), as float32."""
    h = np.minimum(x, _F16_MAX).astype(np.float16)
    low = h.astype(np.float32) < x
    h[low] = np.nextafter(h[low], np.float16(np.inf))
    return h.astype(np.float32)


def _blocks(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.shape[-1] % QK_K:
        raise ValueError(f"K-quants need rows of a multiple of {QK_K} values, not {x.shape[-1]}")
    return x.reshape(-1, QK_K)


def _scale_grid(values: np.ndarray, levels: int) -> tuple[np.ndarray, np.ndarray]:
    """Per block, the fp16 super-scale (blocks, 1) and the integer codes (blocks, n) ≥ values/super,
    so that super·code covers each value. ``values`` ≥ 0, ``levels`` the largest code."""
    top = values.max(axis=1, keepdims=True)
    sup = _f16_up(top / levels)
    safe = np.where(sup > 0, sup, 1.0)
    codes = np.clip(np.ceil(values / safe - 1e-6), 0, levels)
    # ceil after a division may still land one code short of covering the value: bump it
    codes = np.where(codes * safe < values, np.minimum(codes + 1, levels), codes)
    return sup, codes.astype(np.uint8)


def _pack_scales_mins(sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    """Eight 6-bit scales and mins per block → the 12-byte layout of Q4_K/Q5_K."""
    sc, mn = sc.astype(np.uint8), mn.astype(np.uint8)
    out = np.empty((sc.shape[0], 12), dtype=np.uint8)
    out[:, 0:4] = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    out[:, 4:8] = mn[:, :4] | ((mn[:, 4:] >> 4) << 6)
    out[:, 8:12] = (sc[:, 4:] & 0x0F) | ((mn[:, 4:] & 0x0F) << 4)
    return out


def _affine(blocks: np.ndarray, levels: int):
    """Scales/mins and quants of the asymmetric K-quants: x ≈ d·sc·q − dmin·m per 32 values."""
    sub = blocks.reshape(-1, 8, 32)
    lo = np.minimum(sub.min(axis=2), 0.0)            # the min is subtracted, so it is ≤ 0
    hi = np.maximum(sub.max(axis=2), lo)
    d, sc = _scale_grid((hi - lo) / levels, 63)        # steps (blocks, 8)
    dmin, mn = _scale_grid(-lo, 63)
    step = d * sc
    offset = dmin * mn
    safe = np.where(step > 0, step, 1.0)[..., None]
    q = np.clip(np.rint((sub + offset[..., None]) / safe), 0, levels).astype(np.uint8)
    q = np.where(step[..., None] > 0, q, 0).astype(np.uint8)
    return d, dmin, sc, mn, q


def _f16_bytes(v: np.ndarray) -> np.ndarray:
    return v.astype(np.float16).reshape(-1, 1).view(np.uint8)


def quantize_q4_k(x: np.ndarray) -> np.ndarray:
    """(rows, n) float32 → (rows, n/256·144) uint8 Q4_K blocks."""
    blocks = _blocks(x)
    d, dmin, sc, mn, q = _affine(blocks, 15)
    pairs = q.reshape(-1, 4, 2, 32)
    qs = (pairs[:, :, 0] | (pairs[:, :, 1] << 4)).reshape(-1, 128)
    out = np.concatenate([_f16_bytes(d), _f16_bytes(dmin), _pack_scales_mins(sc, mn), qs], axis=1)
    return out.reshape(*x.shape[:-1], -1)


def quantize_q5_k(x: np.ndarray) -> np.ndarray:
    """(rows, n) float32 → (rows, n/256·176) uint8 Q5_K blocks."""
    blocks = _blocks(x)
    d, dmin, sc, mn, q = _affine(blocks, 31)
    low = q & 0x0F
    pairs = low.reshape(-1, 4, 2, 32)
    qs = (pairs[:, :, 0] | (pairs[:, :, 1] << 4)).reshape(-1, 128)
    high = (q >> 4) & 1                                # (blocks, 8 sub-blocks, 32)
    qh = np.zeros((q.shape[0], 32), dtype=np.uint8)
    for j in range(8):                                 # bit j of qh[l]: the high bit of sub-block j, value l
        qh |= (high[:, j] << j).astype(np.uint8)
    out = np.concatenate([_f16_bytes(d), _f16_bytes(dmin), _pack_scales_mins(sc, mn), qh, qs], axis=1)
    return out.reshape(*x.shape[:-1], -1)


def quantize_q6_k(x: np.ndarray) -> np.ndarray:
    """(rows, n) float32 → (rows, n/256·210) uint8 Q6_K blocks."""
    blocks = _blocks(x)
    sub = blocks.reshape(-1, 16, 16)
    amax = np.abs(sub).max(axis=2)                     # (blocks, 16)
    d, sc = _scale_grid(amax / 31, 127)                # symmetric: |q − 32| ≤ 31 covers ±amax
    step = d * sc
    safe = np.where(step > 0, step, 1.0)[..., None]
    q = np.clip(np.rint(sub / safe), -32, 31) + 32
    q = np.where(step[..., None] > 0, q, 32).astype(np.uint8).reshape(-1, 8, 32)  # 8 chunks of 32
    ql = np.zeros((q.shape[0], 128), dtype=np.uint8)
    qh = np.zeros((q.shape[0], 64), dtype=np.uint8)
    for c in range(8):                                 # chunk c: elements 32c .. 32c+31 of the block
        half, nibble, part = c // 4, (c % 4) // 2, c % 2
        lo = half * 64 + part * 32
        ql[:, lo: lo + 32] |= ((q[:, c] & 0x0F) << (4 * nibble)).astype(np.uint8)
        qh[:, half * 32: half * 32 + 32] |= (((q[:, c] >> 4) & 0x03) << (2 * (c % 4))).astype(np.uint8)
    out = np.concatenate([ql, qh, sc.astype(np.int8).view(np.uint8), _f16_bytes(d)], axis=1)
    return out.reshape(*x.shape[:-1], -1)


def error_bound(kind: str, data: np.ndarray) -> np.ndarray:
    """The largest error the format allows each value of the encoded blocks ``data`` (uint8, whole
    blocks), read from the blocks themselves: half a step of its sub-block, plus for Q4_K/Q5_K the
    grid spacing of that sub-block's min (the min is rounded up onto its 6-bit grid, which can push
    the top value past the last level). Shape (blocks·256,)."""
    blocks = data.reshape(-1, {"q4_k": 144, "q5_k": 176, "q6_k": 210}[kind])
    if kind == "q6_k":
        sc = blocks[:, 192:208].view(np.int8).astype(np.float32)
        d = blocks[:, 208:210].copy().view(np.float16).astype(np.float32)
        return np.repeat(0.5 * d * np.abs(sc), 16, axis=1).reshape(-1)
    d = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)
    dmin = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)
    s = blocks[:, 4:16].reshape(-1, 3, 4)
    sc = np.concatenate([s[:, 0] & 0x3F, (s[:, 2] & 0x0F) | ((s[:, 0] >> 2) & 0x30)], axis=1).astype(np.float32)
    per_sub = 0.5 * d * sc + dmin                      # (blocks, 8)
    return np.repeat(per_sub, 32, axis=1).reshape(-1)


QUANTIZERS = {"q4_k": quantize_q4_k, "q5_k": quantize_q5_k, "q6_k": quantize_q6_k}
