"""Fused LoRA autograd for a frozen (4-bit or 16-bit) base: QKV, O and the SwiGLU MLP.

For a projection with frozen weight W (out, in) and adapter A (r, in), B (out, r), scale s:

    y  = x Wᵀ + s · (x Aᵀ) Bᵀ
    dx = dy W + s · (dy B) A          dA = s · (dy B)ᵀ x          dB = s · dyᵀ (x Aᵀ)

W is dequantized into a transient bf16 buffer for each GEMM and freed at once, in the forward and
again in the backward: a dequantized weight is never kept for the backward. Because the base is
frozen, no weight gradient of W is needed, so the only activations kept are the ones the LoRA
gradients and the elementwise backwards need:

* ``NormQKV`` keeps the layer input h (b, s, d) and the RMSNorm rstd (b, s, 1) fp32; the normalised
  x is recomputed in the backward (one elementwise pass) instead of stored.
* ``NormMLP`` keeps h, rstd, gate g and up u (b, s, i); silu(g)·u is recomputed.
* ``LoraLinear`` keeps its input x.

The small (tokens, r) products x Aᵀ are kept too (r = 16 columns). The reference for all of this is
peft's own ``Linear4bit``/``Linear`` forward with autograd; tests compare values and gradients.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import ops
from .nf4 import dequantize


@dataclass
class Proj:
    """One linear of the layer as the fused functions see it: frozen base + optional active LoRA."""

    base: torch.nn.Module           # nn.Linear or bitsandbytes Linear4bit (frozen)
    lora_a: torch.nn.Parameter | None  # (r, in)
    lora_b: torch.nn.Parameter | None  # (out, r)
    scale: float

    def weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The base weight as a fresh or borrowed (out, in) tensor in ``dtype``."""
        return dequantize(self.base, dtype)

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


def _forward(x2d: torch.Tensor, p: Proj, a: torch.Tensor | None, b: torch.Tensor | None):
    """y (T, out) and the LoRA intermediate x Aᵀ (T, r) or None, all in x2d.dtype."""
    w = p.weight(x2d.dtype)
    y = x2d @ w.t()
    del w
    if p.bias is not None:
        y += p.bias.to(y.dtype)
    xa = None
    if a is not None:
        xa = x2d @ a.to(x2d.dtype).t()
        y.addmm_(xa, b.to(x2d.dtype).t(), alpha=p.scale)
    return y, xa


def _backward(dy: torch.Tensor, x2d: torch.Tensor, xa, p: Proj, a, b, dx: torch.Tensor | None):
    """Add dy's contribution to dx (T, in) (allocated when None); return (dx, dA, dB)."""
    w = p.weight(dy.dtype)
    if dx is None:
        dx = dy @ w
    else:
        dx.addmm_(dy, w)
    del w
    da = db = None
    if a is not None:
        a_c, b_c = a.to(dy.dtype), b.to(dy.dtype)
        dyb = dy @ b_c                                       # (T, r)
        dx.addmm_(dyb, a_c, alpha=p.scale)
        da = (dyb.t() @ x2d).mul_(p.scale).to(a.dtype)       # (r, in)
        db = (dy.t() @ xa).mul_(p.scale).to(b.dtype)         # (out, r)
    return dx, da, db


class LoraLinear(torch.autograd.Function):
    """y = base(x) + s·B(A(x)) for x (..., in); keeps x and x Aᵀ for the backward."""

    @staticmethod
    def forward(ctx, x, proj: Proj, a, b):
        x2d = x.reshape(-1, x.shape[-1])
        y, xa = _forward(x2d, proj, a, b)
        ctx.proj = proj
        ctx.save_for_backward(x2d, xa, a, b)
        return y.view(*x.shape[:-1], -1)

    @staticmethod
    def backward(ctx, dy):
        x2d, xa, a, b = ctx.saved_tensors
        dy2d = dy.reshape(-1, dy.shape[-1])
        dx, da, db = _backward(dy2d, x2d, xa, ctx.proj, a, b, None)
        return dx.view(*dy.shape[:-1], -1), None, da, db


class NormQKV(torch.autograd.Function):
    """RMSNorm → q, k, v projections (+LoRA) → RoPE on q and k.

    In: h (b, s, d), the norm weight (d,), cos/sin (b, s, hd). Out: q (b, nh, s, hd), k and v
    (b, nkv, s, hd) as transposed views, the layout the attention kernels take.
    """

    @staticmethod
    def forward(ctx, h, norm_w, eps, cos, sin, head_dim, pq: Proj, pk: Proj, pv: Proj,
                aq, bq, ak, bk, av, bv):
        bsz, seq, d = h.shape
        x, rstd = ops.rms_norm(h, norm_w, eps)
        x2d = x.reshape(-1, d)
        q, xaq = _forward(x2d, pq, aq, bq)
        k, xak = _forward(x2d, pk, ak, bk)
        v, xav = _forward(x2d, pv, av, bv)
        del x, x2d
        q = ops.rope(q.view(bsz, seq, -1, head_dim), cos, sin)
        k = ops.rope(k.view(bsz, seq, -1, head_dim), cos, sin)
        v = v.view(bsz, seq, -1, head_dim)
        ctx.meta = (eps, pq, pk, pv)
        ctx.save_for_backward(h, norm_w, rstd, cos, sin, xaq, xak, xav, aq, bq, ak, bk, av, bv)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    @staticmethod
    def backward(ctx, dq, dk, dv):
        h, norm_w, rstd, cos, sin, xaq, xak, xav, aq, bq, ak, bk, av, bv = ctx.saved_tensors
        eps, pq, pk, pv = ctx.meta
        d = h.shape[-1]
        x, _ = ops.rms_norm(h, norm_w, eps)  # recomputed: cheaper than keeping it
        x2d = x.reshape(-1, d)
        dq = ops.rope_backward(dq.transpose(1, 2), cos, sin).reshape(x2d.shape[0], -1)
        dk = ops.rope_backward(dk.transpose(1, 2), cos, sin).reshape(x2d.shape[0], -1)
        dv = dv.transpose(1, 2).reshape(x2d.shape[0], -1)
        dx, daq, dbq = _backward(dq, x2d, xaq, pq, aq, bq, None)
        del dq
        dx, dak, dbk = _backward(dk, x2d, xak, pk, ak, bk, dx)
        dx, dav, dbv = _backward(dv, x2d, xav, pv, av, bv, dx)
        del x, x2d
        dh = ops.rms_norm_backward(dx.view_as(h), h, norm_w, rstd)
        return (dh, None, None, None, None, None, None, None, None, daq, dbq, dak, dbk, dav, dbv)


class NormMLP(torch.autograd.Function):
    """RMSNorm → gate/up (+LoRA) → silu(g)·u → down (+LoRA): h (b, s, d) → (b, s, d)."""

    @staticmethod
    def forward(ctx, h, norm_w, eps, pg: Proj, pu: Proj, pd: Proj, ag, bg, au, bu, ad, bd):
        d = h.shape[-1]
        x, rstd = ops.rms_norm(h, norm_w, eps)
        x2d = x.reshape(-1, d)
        g, xag = _forward(x2d, pg, ag, bg)
        u, xau = _forward(x2d, pu, au, bu)
        del x, x2d
        act = ops.swiglu(g, u)
        y, xad = _forward(act, pd, ad, bd)
        del act
        ctx.meta = (eps, pg, pu, pd)
        ctx.save_for_backward(h, norm_w, rstd, g, u, xag, xau, xad, ag, bg, au, bu, ad, bd)
        return y.view_as(h)

    @staticmethod
    def backward(ctx, dy):
        h, norm_w, rstd, g, u, xag, xau, xad, ag, bg, au, bu, ad, bd = ctx.saved_tensors
        eps, pg, pu, pd = ctx.meta
        d = h.shape[-1]
        dy2d = dy.reshape(-1, d)
        act = ops.swiglu(g, u) if ad is not None else None  # only the down adapter's dA needs it
        dact, dad, dbd = _backward(dy2d, act, xad, pd, ad, bd, None)
        del act
        dg, du = ops.swiglu_backward(dact, g, u)
        del dact
        x, _ = ops.rms_norm(h, norm_w, eps)
        x2d = x.reshape(-1, d)
        dx, dag, dbg = _backward(dg, x2d, xag, pg, ag, bg, None)
        del dg
        dx, dau, dbu = _backward(du, x2d, xau, pu, au, bu, dx)
        del du, x, x2d
        dh = ops.rms_norm_backward(dx.view_as(h), h, norm_w, rstd)
        return (dh, None, None, None, None, None, dag, dbg, dau, dbu, dad, dbd)
