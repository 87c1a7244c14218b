"""Q4_0, Q4_1, Q5_0 and Q5_1 under an importance matrix (llama.cpp's ``quantize_row_q*_impl``).

Without an importance matrix these types are encoded by the ``gguf`` package's quantizers (byte-identical
to llama.cpp's reference ones). With one, llama.cpp searches each 32-value block's scale by a weighted
fit, weights ``qw · sqrt(σ² + x²)`` with σ² the mean square of the whole row: ``make_qx_quants`` for the
symmetric Q4_0/Q5_0 (levels in [−8, 7] / [−16, 15]), ``make_qkx3_quants`` for Q4_1/Q5_1 (scale and
min, levels in [0, 15] / [0, 31]). The searches are :mod:`.kquants`' vectorised ones; each value then
takes the level nearest to it under the stored fp16 scale (and min). These matter where a model's rows
are not whole 256-value super-blocks (SmolLM2's 576): its K-quant mixes then fall back to them.

Block layouts (as ``gguf.quants`` reads them): Q4_0 fp16 ``d`` + 16 bytes of nibbles (value j low,
j+16 high); Q4_1 adds fp16 ``m`` after ``d``; Q5_0/Q5_1 put 4 bytes of fifth bits (bit j: value j)
between the scales and the nibbles. Decoded: ``d·(q − offset)`` (symmetric) or ``d·q + m``.
"""

from __future__ import annotations

import numpy as np

from qfine.export.kquants import _qkx2, _qx

# type → (bits, symmetric)
TYPES = {"q4_0": (4, True), "q4_1": (4, False), "q5_0": (5, True), "q5_1": (5, False)}


def _weights(x: np.ndarray, importance: np.ndarray) -> np.ndarray:
    rows = x.reshape(-1, importance.size)
    sigma2 = (rows * rows).mean(axis=1, keepdims=True)
    return (importance[None, :] * np.sqrt(sigma2 + rows * rows)).reshape(-1, 32)


def _f16(v: np.ndarray) -> np.ndarray:
    return v.astype(np.float16).reshape(-1, 1)


def quantize(x: np.ndarray, kind: str, importance: np.ndarray) -> np.ndarray:
    """(rows, n) float32 → (rows, bytes) uint8 blocks of ``kind`` (q4_0, q4_1, q5_0, q5_1), searched
    under the per-column ``importance`` (n,)."""
    bits, symmetric = TYPES[kind]
    x = np.ascontiguousarray(x, dtype=np.float32)
    blocks = x.reshape(-1, 32)
    w = _weights(x, np.asarray(importance, dtype=np.float32))
    if symmetric:
        half = 1 << (bits - 1)
        d = _f16(_qx(blocks, half, w)).astype(np.float32)
        safe = np.where(d != 0, d, 1.0)
        q = np.where(d != 0, np.clip(np.rint(blocks / safe), -half, half - 1), 0) + half
        head = [d.astype(np.float16).view(np.uint8)]
    else:
        top = (1 << bits) - 1
        scale, low = _qkx2(blocks, top, -0.9, 0.05, 36, w)
        d, m = _f16(scale).astype(np.float32), _f16(-low).astype(np.float32)
        safe = np.where(d > 0, d, 1.0)
        q = np.where(d > 0, np.clip(np.rint((blocks - m) / safe), 0, top), 0)
        head = [d.astype(np.float16).view(np.uint8), m.astype(np.float16).view(np.uint8)]
    q = q.astype(np.uint8)
    nibbles = (q[:, :16] & 0x0F) | ((q[:, 16:] & 0x0F) << 4)
    if bits == 5:
        high = ((q >> 4) & 1).astype(np.uint32)
        qh = (high << np.arange(32, dtype=np.uint32)).sum(axis=1, dtype=np.uint32)
        head.append(qh.astype("<u4").reshape(-1, 1).view(np.uint8))
    out = np.concatenate(head + [nibbles], axis=1)
    return out.reshape(*x.shape[:-1], -1)
