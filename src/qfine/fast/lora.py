"""Fused LoRA autograd for a frozen (4-bit or 16-bit) base: QKV, O and the SwiGLU MLP.

For a projection with frozen weight W (out, in) and adapter A (r, in), B (out, r), scale s:

    y  = x Wᵀ + s · (x Aᵀ) Bᵀ
    dx = dy W + s · (dy B) A          dA = s · (dy B)ᵀ x          dB = s · dyᵀ (x Aᵀ)

W is dequantized into a transient bf16 buffer for each GEMM and freed at once, in the forward and
again in the backward: a dequantized weight is never kept for the backward. Because the base is
frozen, no weight gradient of W is needed, so the only activations kept are the ones the LoRA
gradients and the elementwise backwards need:

* ``NormQKV`` keeps the layer input h (b, s, d) and the RMSNorm rstd (b, s, 1) fp32; the normalised
  x is recomputed in the backward (one elementwise pass) instead of stored. q, k and v come out of
  one GEMM against the stacked [Wq; Wk; Wv].
* ``NormMLP`` keeps h, rstd and the stacked gate/up output [g | u] (b·s, 2i), from one GEMM against
  [Wg; Wu]; silu(g)·u is recomputed inside the SwiGLU backward kernel, whose dg and du feed
  one accumulating GEMM each.
* ``LoraLinear`` keeps its input x.

The small (tokens, r) products x Aᵀ are kept too (r = 16 columns). The reference for all of this is
peft's own ``Linear4bit``/``Linear`` forward with autograd; tests compare values and gradients.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import ops
from .nf4 import dequantize, stacked


@dataclass
class Proj:
    """One linear of the layer as the fused functions see it: frozen base + optional active LoRA."""

    base: torch.nn.Module           # nn.Linear or bitsandbytes Linear4bit (frozen)
    lora_a: torch.nn.Parameter | None  # (r, in)
    lora_b: torch.nn.Parameter | None  # (out, r)
    scale: float

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias


def lora_proj(module: torch.nn.Module) -> Proj | None:
    """A :class:`Proj` for a peft LoRA linear or a bare linear; None when the fast path cannot take it.

    Declined: several active adapters, dropout > 0, DoRA, merged or disabled adapters, fan_in_fan_out,
    8-bit bases, trainable base weights or biases.
    """
    import bitsandbytes as bnb

    from peft.tuners.lora import LoraLayer

    if isinstance(module, LoraLayer):
        base = module.get_base_layer()
        if module.merged or module.disable_adapters or getattr(module, "fan_in_fan_out", False):
            return None
        active = [a for a in module.active_adapters if a in module.lora_A]
        if len(active) > 1 or any(module.use_dora.get(a, False) for a in active):
            return None
        if active:
            name = active[0]
            if not isinstance(module.lora_dropout[name], torch.nn.Identity):
                return None
            a, b = module.lora_A[name], module.lora_B[name]
            if not (type(a) is torch.nn.Linear and type(b) is torch.nn.Linear) or a.bias is not None or b.bias is not None:
                return None
            proj = Proj(base, a.weight, b.weight, float(module.scaling[name]))
        else:
            proj = Proj(base, None, None, 0.0)
    else:
        base = module
        proj = Proj(base, None, None, 0.0)
    if isinstance(base, bnb.nn.Linear8bitLt) or not isinstance(base, torch.nn.Linear):
        return None
    if base.weight.requires_grad or (base.bias is not None and base.bias.requires_grad):
        return None
    return proj


def _lora(projs, loras, dtype):
    """The projections' adapters as one stack: (A (R, in) unscaled, [(out slice, r slice, B, scale)]).

    ``loras`` holds (A, B) parameter pairs, None for a projection without an adapter."""
    a_parts, pieces, o, r = [], [], 0, 0
    for p, (a, b) in zip(projs, loras):
        n = p.base.out_features
        if a is not None:
            k = a.shape[0]
            a_parts.append(a.to(dtype))
            pieces.append((slice(o, o + n), slice(r, r + k), b.to(dtype), p.scale))
            r += k
        o += n
    return (torch.cat(a_parts) if len(a_parts) > 1 else (a_parts[0] if a_parts else None)), pieces


def _forward(x2d: torch.Tensor, projs, loras):
    """Σ-stacked outputs y (T, Σ out) of projections sharing the input x2d (T, in), and the LoRA
    intermediate x Aᵀ (T, R) (None without adapters). One GEMM for the stacked frozen weights, one
    for all the A's, one small one per B."""
    w = stacked([p.base for p in projs], x2d.dtype)
    y = x2d @ w.t()
    del w
    o = 0
    for p in projs:
        if p.bias is not None:
            y[:, o:o + p.base.out_features] += p.bias.to(y.dtype)
        o += p.base.out_features
    a_all, pieces = _lora(projs, loras, x2d.dtype)
    xa = None
    if a_all is not None:
        xa = x2d @ a_all.t()
        for out_sl, r_sl, b, scale in pieces:
            y[:, out_sl].addmm_(xa[:, r_sl], b.t(), alpha=scale)
    return y, xa


def _per_proj(dy, projs):
    """Per-projection gradient views: ``dy`` is a list already, or a stacked (T, Σ out) tensor."""
    if isinstance(dy, (list, tuple)):
        return list(dy)
    out, o = [], 0
    for p in projs:
        out.append(dy[:, o:o + p.base.out_features])
        o += p.base.out_features
    return out


def _backward_input(dy, projs, loras):
    """dx = Σ dy_i W_i + Σ s_i·(dy_i B_i) A_i → (dx (T, in), dyB (T, R) scaled, or None).

    ``dy`` is the stacked (T, Σ out) gradient (one GEMM against the stacked weights) or a list of
    per-projection gradients (one accumulating GEMM each)."""
    parts = _per_proj(dy, projs)
    if isinstance(dy, torch.Tensor):
        w = stacked([p.base for p in projs], dy.dtype)
        dx = dy @ w
        del w
    else:
        dx = None
        for d, p in zip(parts, projs):
            w = dequantize(p.base, d.dtype)
            dx = d @ w if dx is None else dx.addmm_(d, w)
            del w
    a_all, pieces = _lora(projs, loras, dx.dtype)
    dyb = None
    if a_all is not None:
        it = iter(pieces)
        cols = [d @ (piece[2] * piece[3]) for d, (a, _) in zip(parts, loras) if a is not None
                for piece in (next(it),)]                    # s_i · dy_i B_i, (T, r_i) each
        dyb = torch.cat(cols, dim=1) if len(cols) > 1 else cols[0]
        dx.addmm_(dyb, a_all)
    return dx, dyb


def _backward_lora(dy, x2d, xa, dyb, projs, loras):
    """(dA, dB) per projection, as parameter-dtype tensors, from dyB = s·dy B (T, R) and x Aᵀ."""
    if dyb is None:
        return [(None, None)] * len(projs)
    parts = _per_proj(dy, projs)
    da_all = dyb.t() @ x2d                                    # (R, in), already scaled
    grads, r = [], 0
    for d, p, (a, b) in zip(parts, projs, loras):
        if a is None:
            grads.append((None, None))
            continue
        k = a.shape[0]
        db = (d.t() @ xa[:, r:r + k]).mul_(p.scale)          # (out, r)
        grads.append((da_all[r:r + k].to(a.dtype), db.to(b.dtype)))
        r += k
    return grads


class LoraLinear(torch.autograd.Function):
    """y = base(x) + s·B(A(x)) for x (..., in); keeps x and x Aᵀ for the backward."""

    @staticmethod
    def forward(ctx, x, proj: Proj, a, b):
        x2d = x.reshape(-1, x.shape[-1])
        y, xa = _forward(x2d, [proj], [(a, b)])
        ctx.proj = proj
        ctx.save_for_backward(x2d, xa, a, b)
        return y.view(*x.shape[:-1], -1)

    @staticmethod
    def backward(ctx, dy):
        x2d, xa, a, b = ctx.saved_tensors
        dy2d = dy.reshape(-1, dy.shape[-1])
        dx, dyb = _backward_input(dy2d, [ctx.proj], [(a, b)])
        ((da, db),) = _backward_lora(dy2d, x2d, xa, dyb, [ctx.proj], [(a, b)])
        return dx.view(*dy.shape[:-1], -1), None, da, db


class NormQKV(torch.autograd.Function):
    """RMSNorm → stacked q, k, v projection (+LoRA) → RoPE on q and k.

    In: h (b, s, d), the norm weight (d,), cos/sin (b, s, hd). Out: q (b, nh, s, hd), k and v
    (b, nkv, s, hd) as transposed views, the layout the attention kernels take.
    """

    @staticmethod
    def forward(ctx, h, norm_w, eps, cos, sin, head_dim, pq: Proj, pk: Proj, pv: Proj,
                aq, bq, ak, bk, av, bv):
        bsz, seq, d = h.shape
        projs, loras = [pq, pk, pv], [(aq, bq), (ak, bk), (av, bv)]
        x, rstd = ops.rms_norm(h, norm_w, eps)
        qkv, xa = _forward(x.view(-1, d), projs, loras)
        del x
        n_q, n_kv = pq.base.out_features // head_dim, pk.base.out_features // head_dim
        q, k, v = ops.rope_qkv(qkv.view(bsz, seq, -1, head_dim), cos, sin, n_q, n_kv)
        del qkv
        ctx.meta = (eps, projs)
        ctx.save_for_backward(h, norm_w, rstd, cos, sin, xa, aq, bq, ak, bk, av, bv)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    @staticmethod
    def backward(ctx, dq, dk, dv):
        h, norm_w, rstd, cos, sin, xa, aq, bq, ak, bk, av, bv = ctx.saved_tensors
        eps, projs = ctx.meta
        loras = [(aq, bq), (ak, bk), (av, bv)]
        d = h.shape[-1]
        dqkv = ops.rope_qkv_backward(dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2), cos, sin)
        dqkv = dqkv.view(-1, dqkv.shape[2] * dqkv.shape[3])
        dx, dyb = _backward_input(dqkv, projs, loras)
        x, _ = ops.rms_norm(h, norm_w, eps)  # recomputed: cheaper than keeping it
        grads = _backward_lora(dqkv, x.view(-1, d), xa, dyb, projs, loras)
        del x, dqkv
        dh = ops.rms_norm_backward(dx.view_as(h), h, norm_w, rstd)
        return (dh, None, None, None, None, None, None, None, None, *[g for pair in grads for g in pair])


class NormMLP(torch.autograd.Function):
    """RMSNorm → stacked gate/up (+LoRA) → silu(g)·u → down (+LoRA): h (b, s, d) → (b, s, d)."""

    @staticmethod
    def forward(ctx, h, norm_w, eps, pg: Proj, pu: Proj, pd: Proj, ag, bg, au, bu, ad, bd):
        d = h.shape[-1]
        x, rstd = ops.rms_norm(h, norm_w, eps)
        gu, xa_gu = _forward(x.view(-1, d), [pg, pu], [(ag, bg), (au, bu)])
        del x
        act = ops.swiglu(gu)
        y, xa_d = _forward(act, [pd], [(ad, bd)])
        del act
        ctx.meta = (eps, pg, pu, pd)
        ctx.save_for_backward(h, norm_w, rstd, gu, xa_gu, xa_d, ag, bg, au, bu, ad, bd)
        return y.view_as(h)

    @staticmethod
    def backward(ctx, dy):
        h, norm_w, rstd, gu, xa_gu, xa_d, ag, bg, au, bu, ad, bd = ctx.saved_tensors
        eps, pg, pu, pd = ctx.meta
        d = h.shape[-1]
        dy2d = dy.reshape(-1, d)
        dact, dyb_d = _backward_input(dy2d, [pd], [(ad, bd)])
        dg, du, act = ops.swiglu_backward(dact, gu)
        del dact
        ((dad, dbd),) = _backward_lora(dy2d, act, xa_d, dyb_d, [pd], [(ad, bd)])
        del act
        dx, dyb = _backward_input([dg, du], [pg, pu], [(ag, bg), (au, bu)])
        x, _ = ops.rms_norm(h, norm_w, eps)
        (dag, dbg), (dau, dbu) = _backward_lora([dg, du], x.view(-1, d), xa_gu, dyb, [pg, pu], [(ag, bg), (au, bu)])
        del x, dg, du
        dh = ops.rms_norm_backward(dx.view_as(h), h, norm_w, rstd)
        return (dh, None, None, None, None, None, dag, dbg, dau, dbu, dad, dbd)
