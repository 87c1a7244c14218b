"""4-bit decode launches that compute their own LoRA down-products, for one token row (batch 1).

A decode step's projection y = x Wᵀ + s·(x Aᵀ)Bᵀ needs x Aᵀ (r values) before its epilogue. Computed apart
(:func:`qfine.fast.lora_down.lora_down`), that is one more launch per projection group — 96 a step for a
32-layer Llama — each a chain of dependent loads on the step's critical path. Here the "mma" launch
(``mma4.cu`` with ``FD``) does it: its first blocks each take a slice of k and post fp32 partial products
while the weights stream in, and every block adds them after its loop. With ``norm`` the launch also
computes the RMSNorm of x that the projections read (every block normalises the row into shared memory),
so the norm and the down-products cost no launch of their own.

Only where the shape's measured setting (:mod:`qfine.fast.gemv_kernel`'s tuner) is an "mma" one: the
functions return None otherwise (other kernels, a shape not yet measured, a launch too small), and the
caller takes the separate launches. Off unless ``QFINE_DOWN_IN_LAUNCH=1``
(:data:`qfine.fast.mma_kernel.DOWN_IN_LAUNCH`) until its GPU tests have run on a GPU. The sums differ from
the separate launch's only in the order of fp32 additions.
"""

from __future__ import annotations

import torch

from qfine.fast import tune_cache
from qfine.fast.gemv_kernel import TUNED, _rows, group_key, silu_key, single_key
from qfine.fast.gemv_rows import _sum_splits
from qfine.fast.mma_kernel import DownProducts, fits, matmul_mma, matmul_mma_group, matmul_mma_silu


def _setting(key: tuple, x2: torch.Tensor, blocksize: int) -> dict | None:
    """The measured setting under ``key`` if it is an "mma" one that serves x2 (rows, k); never measures."""
    got = tune_cache.known(TUNED, key, x2.device)
    cfg = None if got is None else got[0][1]
    if cfg is None or cfg.get("KERNEL") != "mma" or not fits(cfg, x2.shape[0], x2.shape[1], blocksize):
        return None
    return cfg


def _members(weights: list[tuple]) -> list[tuple]:
    """(packed weight, (xa, B, scale)) per projection as the launch takes them; xa is a placeholder of the
    adapter's dtype and rank (the launch computes its own), views of one tensor as the kernel asks."""
    r, dtype = weights[0][1].shape[0], weights[0][1].dtype
    xa = torch.empty(1, r * len(weights), dtype=dtype, device=weights[0][1].device)
    return [(packed, (xa[:, i * r:(i + 1) * r], b, scale)) for i, (packed, _a, b, scale) in enumerate(weights)]


def _served(x: torch.Tensor, weights: list[tuple], sync: torch.Tensor, norm: tuple | None, key_of, launch):
    """``launch(x2, members, setting, down-products)`` at the setting the tuner measured under
    ``key_of(x2, members)``, or None where that is no "mma" setting or the launch refuses the operands."""
    x2 = _rows(x, x.shape[-1])
    members = _members(weights)
    cfg = _setting(key_of(x2, members), x2, weights[0][0].quant_state.blocksize)
    if cfg is None:
        return None
    try:
        return launch(x2, members, cfg, DownProducts([w[1] for w in weights], norm, sync))
    except ValueError:
        return None


def project(x: torch.Tensor, weight: tuple, sync: torch.Tensor, residual: torch.Tensor | None = None,
            norm: tuple | None = None) -> torch.Tensor | None:
    """x (…, k) (one row) @ Wᵀ + s·(x Aᵀ)Bᵀ (+ residual) as :func:`qfine.fast.gemv_kernel.matmul_4bit`
    computes it with xa = x Aᵀ, x Aᵀ computed in the launch. ``weight``: (packed, A (r, k), B (n, r), s);
    ``norm``: (weight (k,), eps) of an RMSNorm applied to x first; ``sync``: the call site's three int32
    counters (zero). None where the launch does not serve it."""
    y = _served(x, [weight], sync, norm, lambda x2, ms: single_key(x2, ms[0][0], True),
                lambda x2, ms, cfg, down: matmul_mma(x2, ms[0][0], ms[0][1], residual, cfg, _sum_splits, down))
    return None if y is None else y.reshape(*x.shape[:-1], y.shape[-1])


def project_group(x: torch.Tensor, weights: list[tuple], sync: torch.Tensor,
                  norm: tuple | None = None) -> list[torch.Tensor] | None:
    """[norm(x) @ Wᵢᵀ + sᵢ·(norm(x) Aᵢᵀ)Bᵢᵀ] for 2–3 projections of one input (q, k, v) in one launch, as
    :func:`qfine.fast.gemv_kernel.matmul_4bit_group` computes them; see :func:`project`."""
    ys = _served(x, weights, sync, norm, group_key, matmul_mma_group)
    return None if ys is None else [y.reshape(*x.shape[:-1], y.shape[-1]) for y in ys]


def gated(x: torch.Tensor, gate: tuple, up: tuple, sync: torch.Tensor,
          norm: tuple | None = None) -> torch.Tensor | None:
    """silu(g)·u for a gated MLP's gate and up projections of norm(x) in one launch, as
    :func:`qfine.fast.gemv_kernel.matmul_4bit_silu` computes it; see :func:`project`."""
    y = _served(x, [gate, up], sync, norm, lambda x2, ms: silu_key(x2, ms[0]),
                lambda x2, ms, cfg, down: matmul_mma_silu(x2, ms[0], ms[1], cfg, down))
    return None if y is None else y.reshape(*x.shape[:-1], y.shape[-1])
