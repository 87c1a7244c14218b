"""The LoRA down-products of a decode step's projection inputs, in one launch with what makes the input.

A one-row decode step computes, before each group of projections, a small product x Aᵢᵀ for every adapter
(q, k, v; gate, up; o; down), r columns each. :func:`lora_down` computes up to three of them in one launch.
For the groups whose input is itself one elementwise kernel's output, the same launch also makes that
input, so the step has one launch fewer per group:

* :func:`norm_lora_down`: x = RMSNorm(h) (as Llama's module rounds it), then x Aᵢᵀ (q, k, v; gate, up);
* :func:`gated_lora_down`: x = act(g) · u (the gated MLP's input of down_proj, rounded after act and after
  the product as the eager module is), then x Aᵀ.

Program j of the launch computes column j of the down-products (one adapter row against the whole input);
every program computes the input for itself (it is 4–28 KiB, read from L2) and program 0 also writes it.
Products and sums are fp32; each output is rounded once to its tensor's dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_PLAIN, _NORM, _GATED = 0, 1, 2
# transformers' gated activations as the kernel computes them (see qfine.fast.ops.GATED_ACTS)
ACTS = {"silu": 0, "gelu_tanh": 1, "gelu": 2}


@triton.jit
def _act(g, ACT: tl.constexpr):
    """act(g) for fp32 g: SiLU, tanh-approximated GELU or erf GELU (``ACTS``)."""
    if ACT == 0:
        return g / (1.0 + tl.exp(-g))
    elif ACT == 1:
        z = 0.7978845608028654 * (g + 0.044715 * g * g * g)
        return 0.5 * g * (2.0 - 2.0 / (1.0 + tl.exp(2.0 * z)))  # 0.5·g·(1 + tanh z)
    else:
        return 0.5 * g * (1.0 + tl.math.erf(g * 0.7071067811865476))


@triton.jit
def _input(h, u, w, rk, k, rstd, MODE: tl.constexpr, ACT: tl.constexpr):
    """Elements rk of the projections' input (fp32 holding values of h's dtype), zero past k."""
    ok = rk < k
    hv = tl.load(h + rk, mask=ok, other=0.0)
    if MODE == 1:  # weight · (h · rstd).to(dtype), rounded again: Llama's RMSNorm
        xv = (hv.to(tl.float32) * rstd).to(hv.dtype)
        return (tl.load(w + rk, mask=ok, other=0.0).to(tl.float32) * xv.to(tl.float32)).to(hv.dtype).to(tl.float32)
    elif MODE == 2:  # act(g) rounded, times u, rounded: act_fn(gate) * up
        a = _act(hv.to(tl.float32), ACT).to(hv.dtype).to(tl.float32)
        return (a * tl.load(u + rk, mask=ok, other=0.0).to(tl.float32)).to(hv.dtype).to(tl.float32)
    else:
        return hv.to(tl.float32)


@triton.jit
def _down_kernel(h, u, w, a0, a1, a2, xout, out, k: tl.constexpr, r0, r1, r_all, eps, MODE: tl.constexpr,
                 ACT: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[j] = x · row j of [A0; A1; A2] for the one-row input x that MODE makes from h (and u, w);
    program 0 also writes x (k,) to ``xout``."""
    j = tl.program_id(0)
    if j < r0:
        row = a0 + j * k
    elif j < r0 + r1:
        row = a1 + (j - r0) * k
    else:
        row = a2 + (j - r0 - r1) * k
    rstd = 0.0
    if MODE == 1:
        squares = tl.zeros((BLOCK_K,), dtype=tl.float32)
        for k0 in range(0, k, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            hv = tl.load(h + rk, mask=rk < k, other=0.0).to(tl.float32)
            squares += hv * hv
        rstd = 1.0 / tl.sqrt(tl.sum(squares, 0) / k + eps)
    acc = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for k0 in range(0, k, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        xv = _input(h, u, w, rk, k, rstd, MODE, ACT)
        if MODE != 0:
            if j == 0:
                tl.store(xout + rk, xv.to(xout.dtype.element_ty), mask=rk < k)
        acc += xv * tl.load(row + rk, mask=rk < k, other=0.0).to(tl.float32)
    tl.store(out + j, tl.sum(acc, 0).to(out.dtype.element_ty))


@triton.jit
def _rows_kernel(x, a0, a1, a2, out, m, k: tl.constexpr, stride_xm, r0, r1, r_all, BLOCK_M: tl.constexpr,
                 BLOCK_K: tl.constexpr):
    """Column j of out (m, r_all) = x (m, k) · row j of [A0; A1; A2] (fp32 products and sum)."""
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


def _mats(mats: list[torch.Tensor]):
    """The three matrix arguments (missing ones repeat the first), their ranks, and the total rank."""
    ranks = [a.shape[0] for a in mats]
    a = [t if t.is_contiguous() else t.contiguous() for t in mats] + [mats[0]] * (3 - len(mats))
    return a, ranks + [0] * (3 - len(ranks)), sum(ranks)


def _views(out: torch.Tensor, mats: list[torch.Tensor]) -> list[torch.Tensor]:
    views, start = [], 0
    for a in mats:
        views.append(out[..., start:start + a.shape[0]])
        start += a.shape[0]
    return views


def lora_down(x: torch.Tensor, mats: list[torch.Tensor]) -> list[torch.Tensor]:
    """x (..., k) @ Aᵢᵀ for up to three adapter matrices Aᵢ (rᵢ, k) of one dtype, in one launch: views
    (rows, rᵢ) of one (rows, Σrᵢ) output in A's dtype, each x @ Aᵢᵀ computed in fp32 and rounded once
    (what peft's lora_A gives up to the order of the sum). For at most 64 rows."""
    k = x.shape[-1]
    x2 = x.reshape(-1, k)
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    a, r, total = _mats(mats)
    out = torch.empty(m, total, dtype=mats[0].dtype, device=x.device)
    block_m = triton.next_power_of_2(max(m, 1))
    _rows_kernel[(total,)](x2, a[0], a[1], a[2], out, m, k, x2.stride(0), r[0], r[1], total, BLOCK_M=block_m,
                           BLOCK_K=max(32, 2048 // block_m), num_warps=4)
    return _views(out, mats)


def _launch(mode: int, h, u, w, eps: float, act: int, mats):
    k = h.shape[-1]
    a, r, total = _mats(mats)
    x = torch.empty_like(h)
    out = torch.empty(h.shape[:-1] + (total,), dtype=mats[0].dtype, device=h.device)
    _down_kernel[(total,)](h, u, w, a[0], a[1], a[2], x, out, k, r[0], r[1], total, eps, MODE=mode, ACT=act,
                           BLOCK_K=1024, num_warps=4)
    return x, _views(out, mats)


def _one_row(*ts: torch.Tensor) -> bool:
    return all(t.numel() == t.shape[-1] and t.is_contiguous() for t in ts)


def norm_lora_down(h: torch.Tensor, weight: torch.Tensor, eps: float, mats: list[torch.Tensor]):
    """(x, [x Aᵢᵀ]) for one row h (..., k): x = weight · (h · rstd).to(h.dtype) in h's dtype (Llama's
    RMSNorm, rstd = 1/√(mean(h²) + eps) in fp32) and its down-products (..., rᵢ) in A's dtype, one launch.
    Requires h contiguous with one row and weight of h's dtype (else the caller norms, then
    :func:`lora_down`)."""
    assert _one_row(h, weight) and weight.dtype == h.dtype
    return _launch(_NORM, h, h, weight, float(eps), 0, mats)


def gated_lora_down(g: torch.Tensor, u: torch.Tensor, act: str, mats: list[torch.Tensor]):
    """(x, [x Aᵢᵀ]) for one row: x = act(g).to(dtype) · u in g's dtype (``act`` a key of :data:`ACTS`)
    and its down-products in A's dtype, one launch."""
    assert _one_row(g, u) and g.dtype == u.dtype
    return _launch(_GATED, g, u, g, 0.0, ACTS[act], mats)
