"""Fused LoRA autograd for a frozen (4-bit or 16-bit) base: QKV, O and the gated (SwiGLU/GeGLU) MLP.

For a projection with frozen weight W (out, in) and adapter A (r, in), B (out, r), scale s:

    y  = x Wᵀ + s · (x Aᵀ) Bᵀ
    dx = dy W + s · (dy B) A          dA = s · (dy B)ᵀ x          dB = s · dyᵀ (x Aᵀ)

W is dequantized into a transient bf16 buffer for each GEMM and freed at once, in the forward and
again in the backward: a dequantized weight is not kept for the backward (except the first layers'
with train.resident_weights_gib, which keep theirs for the whole run: fast/nf4.py). Because the base is
frozen, no weight gradient of W is needed, so the only activations kept are the ones the LoRA
gradients and the elementwise backwards need:

* ``NormQKV`` keeps the layer input h (b, s, d) and the RMSNorm rstd (b, s, 1) fp32; the normalised
  x is recomputed in the backward (one elementwise pass) instead of stored. q, k and v come out of
  one GEMM against the stacked [Wq; Wk; Wv].
* ``NormMLP`` keeps h, rstd and the stacked gate/up output [g | u] (b·s, 2i), from one GEMM against
  [Wg; Wu]; act(g)·u is recomputed inside the gated-activation backward kernel, whose dg and du feed
  one accumulating GEMM each.
* ``LoraLinear`` keeps its input x.

The small (tokens, r) products x Aᵀ are kept too (r = 16 columns).

Where the input comes from the norm (QKV, gate/up), the LoRA terms ride inside the base GEMMs: the
norm writes x with R spare columns that receive x Aᵀ, so y = [x | x Aᵀ] [W | B_s]ᵀ is one GEMM
along K, and the backward's dy [W | B_s] = [dy W | dy B_s] is one GEMM along N. That saves a full
read-modify-write of y and a second read of dy per projection group — the largest LoRA costs (H100,
``bench/lora_gemm.py``). O and down keep the separate form: their inputs (attention output, act(g)·u)
would need a copy into a wider buffer, which costs as much as it saves.

LoRA dropout (peft's ``lora_dropout``) touches only the LoRA A input: y = x Wᵀ + s · (drop(x) Aᵀ) Bᵀ,
dx = dy W + drop'((dy B_s) A), dA = (dy B_s)ᵀ drop(x). Each projection has its own mask (as each peft
layer has its own ``Dropout``), generated from one seed per projection (:func:`ops.keep_mask`) in the
forward and again in the backward, so the dropped inputs are never stored: memory is that of dropout 0.
The seeds are drawn by the decoder layer once per forward (a checkpoint recompute reuses them).

The reference for all of this is
peft's own ``Linear4bit``/``Linear`` forward with autograd; tests compare values and gradients.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import NamedTuple

import torch
from peft.tuners.lora import LoraLayer
from peft.tuners.lora.bnb import Linear4bit
from peft.tuners.lora.layer import Linear

from qfine.fast import ops, step
from qfine.fast.nf4 import device_of, stacked
from qfine.methods.qalora import lora_layer_class
from qfine.quant import DENSE, KINDS


@dataclass
class Proj:
    """One linear of the layer as the fused functions see it: frozen base + optional active LoRA."""

    base: torch.nn.Module           # a frozen base linear of a fused kind (qfine.quant.KINDS)
    lora_a: torch.Tensor | None    # (r, in): the parameter, or QA-LoRA's A expanded from it (autograd)
    lora_b: torch.nn.Parameter | None  # (out, r)
    scale: float
    dropout: float = 0.0  # LoRA dropout probability of the A input (0: none)

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias


def _plain_lora_types() -> tuple[type, ...]:
    """The peft layer classes whose forward is exactly y = base(x) + s · B(A(dropout(x))) (QA-LoRA's
    layer with its pooled A, see :func:`_qalora_a`)."""


    return (Linear, Linear4bit, lora_layer_class())


def _qalora_a(module, name: str, a: torch.Tensor) -> torch.Tensor:
    """QA-LoRA's A (r, in/L) over the input pooled per group of L, as the equivalent full A (r, in):
    p(x) Aᵀ = x Âᵀ with Â[:, j] = A[:, j // L] · (in/L) / L (peft's pooling: the group mean times in/L).
    Built with autograd each forward (r × in values), so the fused functions' dÂ flows back into A."""
    group = module.qalora_group_size[name]
    return a.repeat_interleave(group, dim=1) * (a.shape[1] / group)


def describe_proj(module: torch.nn.Module) -> Proj | str:
    """A :class:`Proj` for a module the fused layers compute exactly, else why they cannot (a phrase).

    An allow-list, so that a LoRA form the kernels do not implement is never computed as plain LoRA:
    the module is a frozen base linear of a kind the fused layers take (:data:`qfine.quant.KINDS`, ``fused``),
    or one of peft's plain LoRA linears on such a base (exact class) with at most one active adapter
    that has no LoRA variant (DoRA, aLoRA, ...), no LoRA bias, plain ``nn.Dropout`` (or none),
    plain bias-free A and B, and that is neither merged nor fan_in_fan_out (a disabled adapter is none).
    """


    if isinstance(module, LoraLayer):
        if type(module) not in _plain_lora_types():
            return f"peft layer {type(module).__name__} is not a plain LoRA linear"
        base = module.get_base_layer()
        if module.merged:
            return "adapter merged"
        if getattr(module, "fan_in_fan_out", False):
            return "fan_in_fan_out"
        # switched off (peft's disable_adapter): the base alone, as peft computes it then
        active = [] if module.disable_adapters else [a for a in module.active_adapters if a in module.lora_A]
        if len(active) > 1:
            return "several active adapters"
        if active:
            name = active[0]
            variant = getattr(module, "lora_variant", {}).get(name)
            qalora = type(variant).__name__ == "QALoraLinearVariant"
            if variant is not None and not qalora:
                return f"LoRA variant {type(variant).__name__}"
            if name in module.lora_magnitude_vector or module.use_dora.get(name, False):
                return "DoRA"
            if getattr(module, "lora_bias", {}).get(name, False):
                return "lora_bias"
            drop = module.lora_dropout[name]
            if type(drop) is torch.nn.Dropout and not drop.inplace:
                p = float(drop.p)
            elif isinstance(drop, torch.nn.Identity):
                p = 0.0
            else:
                return f"LoRA dropout module {type(drop).__name__}"
            a, b = module.lora_A[name], module.lora_B[name]
            if not (type(a) is torch.nn.Linear and type(b) is torch.nn.Linear) or a.bias is not None or b.bias is not None:
                return "LoRA A/B are not bias-free linears"
            a_weight = _qalora_a(module, name, a.weight) if qalora else a.weight
            proj = Proj(base, a_weight, b.weight, float(module.scaling[name]), p)
        else:
            proj = Proj(base, None, None, 0.0)
    else:
        base = module
        proj = Proj(base, None, None, 0.0)
    kind = KINDS.of(base)
    if kind is None or not kind.fused or (kind is DENSE and type(base) is not torch.nn.Linear):
        return f"{type(base).__name__} base (the kernels take 16-bit, NF4/FP4 and INT4 linears)"
    if any(p.requires_grad for p in base.parameters(recurse=False)):
        return "trainable base weight or bias"
    return proj


def lora_proj(module: torch.nn.Module) -> Proj | None:
    """:func:`describe_proj`'s :class:`Proj`, or None when the fast path cannot take the module."""
    got = describe_proj(module)
    return None if isinstance(got, str) else got


@dataclass
class Norm:
    """A frozen RMSNorm as the fused functions apply it: scale ``offset + weight`` (offset 1 for
    Gemma's norms, 0 for Llama's; see :func:`ops.rms_norm` for how each rounds)."""

    weight: torch.Tensor  # (d,)
    eps: float
    offset: float = 0.0

    def __call__(self, h, extra: int = 0):
        """(x, rstd); x with ``extra`` zero columns appended when asked (see :func:`ops.rms_norm`)."""
        return ops.rms_norm(h, self.weight, self.eps, self.offset, extra)

    def backward(self, dx, h, rstd):
        return ops.rms_norm_backward(dx, h, self.weight, rstd, self.offset)


class Block(NamedTuple):
    """Where one projection's adapter sits in a :class:`Pack`."""

    out: slice      # its rows of the stacked output (Σ out)
    rank: slice     # its rows of the stacked A (R)
    scale: float    # alpha / r (or the rsLoRA scale)
    dropout: float  # its LoRA dropout p
    seed: int       # index of its dropout seed in the layer's seeds


@dataclass
class Pack:
    """The adapters of projections sharing one input, arranged for one GEMM each way.

    ``a`` (R, in): the A's stacked (unscaled); ``b`` (Σ out, R): block-diagonal with s_i·B_i in block
    i (zeros elsewhere); both in the compute dtype. ``blocks`` holds each adapter's :class:`Block`
    and ``None`` for a projection without one; ``bias`` is the stacked base bias or None; ``seeds`` (the decoder layer's int64 seeds, one per
    projection) feed the dropout masks when some adapter has dropout, else None. Built once per forward from the parameters
    (casting them there) and kept for the backward.
    """

    a: torch.Tensor | None
    b: torch.Tensor | None
    bias: torch.Tensor | None
    seeds: torch.Tensor | None
    blocks: list[Block | None]

    def tensors(self):
        return self.a, self.b, self.bias, self.seeds

    @property
    def dropout(self) -> bool:
        """Whether any adapter of the pack drops its input (then the A GEMMs run per adapter)."""
        return self.seeds is not None  # build() keeps seeds only when some adapter has dropout

    def adapters(self):
        """(A_i (r_i, in), r slice, dropout p, index of its seed) for each projection with an adapter."""
        for blk in self.blocks:
            if blk is not None:
                yield self.a[blk.rank], blk.rank, blk.dropout, blk.seed

    @staticmethod
    def build(projs, loras, dtype, seeds=None, first_seed: int = 0) -> "Pack":
        """``loras`` holds (A, B) parameter pairs, (None, None) for a projection without adapter;
        projection i's dropout seed is ``seeds[first_seed + i]`` (read only where it has dropout)."""
        outs = [p.base.out_features for p in projs]
        blocks, a_parts, o, r = [], [], 0, 0
        for i, (p, n, (a, _)) in enumerate(zip(projs, outs, loras)):
            if a is None:
                blocks.append(None)
            else:
                blocks.append(Block(slice(o, o + n), slice(r, r + a.shape[0]), p.scale, p.dropout, first_seed + i))
                a_parts.append(a)
                r += a.shape[0]
            o += n
        a_all = b_all = None
        device = device_of(projs[0].base)
        if a_parts:
            a_all = (torch.cat(a_parts) if len(a_parts) > 1 else a_parts[0]).to(dtype)
            make = torch.empty if len(projs) == 1 else torch.zeros
            b_all = make(o, r, dtype=dtype, device=device)
            for (_, b), blk in zip(loras, blocks):
                if blk is not None:  # cast and scale in one pass, straight into the block
                    torch.mul(b, blk.scale, out=b_all[blk.out, blk.rank])
        bias = None
        if any(p.bias is not None for p in projs):
            bias = torch.cat([p.bias.to(dtype) if p.bias is not None else torch.zeros(n, dtype=dtype, device=device)
                              for p, n in zip(projs, outs)])
        if not any(blk is not None and blk.dropout for blk in blocks):
            seeds = None
        return Pack(a_all, b_all, bias, seeds, blocks)

    @staticmethod
    def restore(tensors, blocks) -> "Pack":
        return Pack(*tensors, blocks)


# On CUDA the dropout products run as Triton kernels that never write the dropped input
# (dropout_kernel.py); the PyTorch code below is their reference and the path everywhere else.
# Tests switch the kernels off to compare the two.
use_dropout_kernels = True


def _dropout_kernels(x2d: torch.Tensor, pack: Pack):
    """qfine.fast.dropout_kernel where it serves this pack (CUDA; one rank and one p), else None."""
    if not use_dropout_kernels or not (x2d.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
        return None
    from qfine.fast import dropout_kernel

    return dropout_kernel if dropout_kernel.applies(x2d, pack.a, list(pack.adapters())) else None


def _lora_in(x2d: torch.Tensor, pack: Pack) -> torch.Tensor:
    """x Aᵀ (T, R) for the stacked A's; with dropout, drop_i(x) A_iᵀ per adapter (each its own mask)."""
    if not pack.dropout:
        return x2d @ pack.a.t()
    if (k := _dropout_kernels(x2d, pack)) is not None:
        return k.lora_in(x2d, pack.a, pack.seeds, list(pack.adapters()))
    s = pack.seeds
    return torch.cat([(ops.lora_dropout(x2d, s, j, p) if p else x2d) @ a.t() for a, _, p, j in pack.adapters()],
                     dim=1)


def _add_lora_dx(dx: torch.Tensor, dyb: torch.Tensor, pack: Pack) -> torch.Tensor:
    """dx + Σ_i drop_i'((dy B_s)_i A_i): the LoRA part of the input gradient (in place without dropout)."""
    if not pack.dropout:
        return dx.addmm_(dyb, pack.a)
    if (k := _dropout_kernels(dx, pack)) is not None:
        return k.add_lora_dx(dx, dyb, pack.a, pack.seeds, list(pack.adapters()))
    for a, r, p, j in pack.adapters():
        if p:
            dx = ops.add_dropout_grad(dx, dyb[:, r] @ a, pack.seeds, j, p)
        else:
            dx = dx.addmm_(dyb[:, r], a)
    return dx


def _lora_da(dyb: torch.Tensor, x2d: torch.Tensor, pack: Pack) -> torch.Tensor:
    """(R, in): the stacked (dy B_s)_iᵀ x_i, x_i the input adapter i saw (dropped with its own mask)."""
    if not pack.dropout:
        return dyb.t() @ x2d
    if (k := _dropout_kernels(x2d, pack)) is not None:
        return k.lora_da(dyb, x2d, pack.seeds, list(pack.adapters()))
    return torch.cat([dyb[:, r].t() @ (ops.lora_dropout(x2d, pack.seeds, j, p) if p else x2d)
                      for _, r, p, j in pack.adapters()])


def _forward(x2d: torch.Tensor, projs, pack: Pack):
    """Stacked outputs y (T, Σ out) of projections sharing the input x2d (T, in) and the LoRA
    intermediate x Aᵀ (T, R) (None without adapters): one GEMM against the stacked frozen weights
    (bias fused), one against the stacked A's, one against the block-diagonal B's."""
    w = stacked([p.base for p in projs], x2d.dtype)
    y = torch.addmm(pack.bias, x2d, w.t()) if pack.bias is not None else x2d @ w.t()
    del w
    xa = None
    if pack.a is not None:
        xa = _lora_in(x2d, pack)
        y.addmm_(xa, pack.b.t())
    return y, xa


def _backward_input(dy, projs, pack: Pack):
    """dx = dy W + (dy B_s) A for the stacked gradient dy (T, Σ out) → (dx (T, in), dyB_s (T, R) or None),
    where B_s is the block-diagonal of s_i·B_i."""
    w = stacked([p.base for p in projs], dy.dtype)
    dx = dy @ w
    del w
    dyb = None
    if pack.a is not None:
        dyb = dy @ pack.b
        dx = _add_lora_dx(dx, dyb, pack)
    return dx, dyb


def _folded_weight(projs, pack: Pack, dtype) -> torch.Tensor:
    """[W | B_s] (Σ out, in + R): the stacked frozen weights with the block-diagonal B_s as R more
    columns, dequantized straight into the wider buffer."""
    r = pack.b.shape[1]
    w = stacked([p.base for p in projs], dtype, extra_cols=r)
    w[:, w.shape[1] - r:].copy_(pack.b)
    return w


def _forward_folded(xcat: torch.Tensor, projs, pack: Pack):
    """:func:`_forward` for xcat (T, in + R) = [x | R spare columns] (the norm writes x so): x Aᵀ is
    written into the spare columns and one GEMM against [W | B_s] gives y = x Wᵀ + (x Aᵀ) B_sᵀ, the
    LoRA term accumulated in fp32 with the base product. y is written once; the separate form reads
    and rewrites it to add the LoRA term (470 MB of traffic for an 8B layer's gate/up at 4096 tokens)."""
    d = xcat.shape[1] - pack.a.shape[0]
    xa = _lora_in(xcat[:, :d], pack)
    xcat[:, d:].copy_(xa)
    w = _folded_weight(projs, pack, xcat.dtype)
    y = torch.addmm(pack.bias, xcat, w.t()) if pack.bias is not None else xcat @ w.t()
    return y, xa


def _backward_input_folded(dy, projs, pack: Pack):
    """:func:`_backward_input` with dy read once: one GEMM dy [W | B_s] = [dy W | dy B_s], then
    dx += (dy B_s) A. dx is a (T, in) view with row stride in + R; dyB_s the view of the last R columns."""
    w = _folded_weight(projs, pack, dy.dtype)
    g = dy @ w
    del w
    d = g.shape[1] - pack.a.shape[0]
    dx, dyb = g[:, :d], g[:, d:]
    return _add_lora_dx(dx, dyb, pack), dyb


def _norm_forward(h, norm: Norm, projs, pack: Pack):
    """Norm then the stacked projections of ``projs`` → (y (T, Σ out), x Aᵀ or None, rstd); folded
    (:func:`_forward_folded`) when there are adapters."""
    if pack.a is None:
        x, rstd = norm(h)
        return (*_forward(x.view(-1, x.shape[-1]), projs, pack), rstd)
    xcat, rstd = norm(h, pack.a.shape[0])
    return (*_forward_folded(xcat.view(-1, xcat.shape[-1]), projs, pack), rstd)


def weight_groups(projs) -> list[tuple[list, int]]:
    """The weights a fused layer asks :func:`stacked` for, as (base linears, extra columns), for the
    seven projections q, k, v, o, gate, up, down: q/k/v and gate/up stacked, with R extra columns
    when folded (R: their adapters' summed rank, see :func:`_norm_forward`), o and down alone."""
    pq, pk, pv, po, pg, pu, pd = projs

    def rank(group):
        return sum(p.lora_a.shape[0] for p in group if p.lora_a is not None)

    return [([pq.base, pk.base, pv.base], rank((pq, pk, pv))), ([po.base], 0),
            ([pg.base, pu.base], rank((pg, pu))), ([pd.base], 0)]


def _norm_backward_input(dy, projs, pack: Pack):
    """The backward counterpart of :func:`_norm_forward`'s GEMMs → (dx, dyB_s or None)."""
    return (_backward_input if pack.a is None else _backward_input_folded)(dy, projs, pack)


def _backward_lora(dy, x2d, xa, dyb, pack: Pack, loras):
    """(dA, dB) per projection, in each parameter's dtype: dA_i = (s_i·dy_i B_i)ᵀ x and
    dB_i = s_i·dy_iᵀ (x A_iᵀ), each stack from one GEMM (the off-diagonal blocks of dyᵀ(xAᵀ) are
    computed and dropped: with R ≤ a few dozen columns that costs less than one launch per block)."""
    if dyb is None:
        return [(None, None)] * len(loras)
    da_all = _lora_da(dyb, x2d, pack)                         # (R, in)
    db_all = dy.t() @ xa                                      # (Σ out, R)
    grads = []
    for (a, b), blk in zip(loras, pack.blocks):
        if blk is None:
            grads.append((None, None))
            continue
        out_sl, r_sl, scale = blk.out, blk.rank, blk.scale
        db = db_all[out_sl, r_sl].to(b.dtype).mul_(scale)  # in place on a copy or on db_all's own block
        grads.append((da_all[r_sl].to(a.dtype), db))
    return grads


class LoraLinear(torch.autograd.Function):
    """y = base(x) + s·B(A(drop(x))) for x (..., in); keeps x and x Aᵀ for the backward.
    ``seeds`` int64: the decoder layer's dropout seeds, this projection's at ``first_seed`` (None
    without dropout)."""

    @staticmethod
    def forward(ctx, x, proj: Proj, seeds, a, b, first_seed: int = 0):
        x2d = x.reshape(-1, x.shape[-1])
        pack = Pack.build([proj], [(a, b)], x.dtype, seeds, first_seed)
        y, xa = _forward(x2d, [proj], pack)
        ctx.meta = (proj, pack.blocks)
        ctx.save_for_backward(x2d, xa, a, b, *pack.tensors())
        return y.view(*x.shape[:-1], -1)

    @staticmethod
    def backward(ctx, dy):
        x2d, xa, a, b, *packed = ctx.saved_tensors
        proj, blocks = ctx.meta
        pack = Pack.restore(packed, blocks)
        dy2d = dy.reshape(-1, dy.shape[-1])
        dx, dyb = _backward_input(dy2d, [proj], pack)
        ((da, db),) = _backward_lora(dy2d, x2d, xa, dyb, pack, [(a, b)])
        return dx.view(*dy.shape[:-1], -1), None, None, da, db, None


class QKVSpec(NamedTuple):
    """What :class:`NormQKV` applies: the layer's input :class:`Norm`, ``qk_norms`` (q_norm, k_norm)
    over the head dimension (Qwen3) or None, the head dimension, and the q, k, v projections."""

    norm: Norm
    qk_norms: tuple[Norm, Norm] | None
    head_dim: int
    q: Proj
    k: Proj
    v: Proj


class MLPSpec(NamedTuple):
    """What :class:`NormMLP` applies: the layer's post-attention :class:`Norm`, the gated activation (a
    value of :data:`ops.GATED_ACTS`) and the gate, up and down projections."""

    norm: Norm
    act: str
    gate: Proj
    up: Proj
    down: Proj


# The LoRA A and B of each projection are separate arguments of the autograd functions below (not
# fields of the spec): autograd only sends gradients to tensors passed to ``apply`` directly.


class NormQKV(torch.autograd.Function):
    """RMSNorm → stacked q, k, v projection (+LoRA) → [per-head q/k RMSNorm] → RoPE on q and k.

    In: h (b, s, d), a :class:`QKVSpec`, cos/sin (b, s, hd), ``seeds`` the layer's int64 dropout seeds
    (q, k, v at 0, 1, 2) or None, then A and B of q, k and v (None where a projection has no adapter). Out: q (b, nh, s, hd), k and v (b, nkv, s, hd) as
    transposed views, the layout the attention kernels take. With q/k norms the projection output
    (b, s, nh + 2·nkv, hd) is kept for their backward (recomputing it would cost a GEMM).
    """

    @staticmethod
    def forward(ctx, h, spec: QKVSpec, cos, sin, seeds, aq, bq, ak, bk, av, bv):
        norm, qk_norms, head_dim, pq, pk, pv = spec
        bsz, seq, d = h.shape
        projs, loras = [pq, pk, pv], [(aq, bq), (ak, bk), (av, bv)]
        pack = Pack.build(projs, loras, h.dtype, seeds)
        qkv, xa, rstd = _norm_forward(h, norm, projs, pack)
        n_q, n_kv = pq.base.out_features // head_dim, pk.base.out_features // head_dim
        qkv = qkv.view(bsz, seq, -1, head_dim)
        if qk_norms is None:
            q, k, v = ops.rope_qkv(qkv, cos, sin, n_q, n_kv)
            qkv = None
        else:
            qn, kn = qk_norms  # one eps (unsupported_reason checks) and the family's offset
            q, k, v = ops.qk_norm_rope_qkv(qkv, qn.weight, kn.weight, qn.eps, qn.offset, cos, sin, n_q, n_kv)
        ctx.meta = (norm, qk_norms, projs, pack.blocks)
        ctx.save_for_backward(h, rstd, cos, sin, xa, qkv, aq, bq, ak, bk, av, bv, *pack.tensors())
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    @staticmethod
    def backward(ctx, dq, dk, dv):
        h, rstd, cos, sin, xa, qkv, aq, bq, ak, bk, av, bv, *packed = ctx.saved_tensors
        norm, qk_norms, projs, blocks = ctx.meta
        pack = Pack.restore(packed, blocks)
        loras = [(aq, bq), (ak, bk), (av, bv)]
        d = h.shape[-1]
        dq, dk, dv = dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)
        if qk_norms is None:
            dqkv = ops.rope_qkv_backward(dq, dk, dv, cos, sin)
        else:
            qn, kn = qk_norms
            dqkv = ops.qk_norm_rope_qkv_backward(dq, dk, dv, qkv, qn.weight, kn.weight, qn.eps, qn.offset, cos, sin)
            del qkv
        dqkv = dqkv.view(-1, dqkv.shape[2] * dqkv.shape[3])
        dx, dyb = _norm_backward_input(dqkv, projs, pack)
        x, _ = norm(h)  # recomputed: cheaper than keeping it
        grads = _backward_lora(dqkv, x.view(-1, d), xa, dyb, pack, loras)
        del x, dqkv
        dh = norm.backward(dx.view_as(h), h, rstd)
        return (dh, None, None, None, None, *[g for pair in grads for g in pair])


class NormMLP(torch.autograd.Function):
    """RMSNorm → stacked gate/up (+LoRA) → act(g)·u → down (+LoRA): h (b, s, d) → (b, s, d).

    ``spec``: a :class:`MLPSpec` (its ``act``: "silu" is SwiGLU, "gelu_tanh" Gemma's GeGLU); ``seeds`` the
    layer's int64 dropout seeds (gate, up, down at 4, 5, 6) or None; then A and B of gate, up and down."""

    @staticmethod
    def forward(ctx, h, spec: MLPSpec, seeds, ag, bg, au, bu, ad, bd):
        norm, act_kind, pg, pu, pd = spec
        gu_pack = Pack.build([pg, pu], [(ag, bg), (au, bu)], h.dtype, seeds, 4)
        d_pack = Pack.build([pd], [(ad, bd)], h.dtype, seeds, 6)
        gu, xa_gu, rstd = _norm_forward(h, norm, [pg, pu], gu_pack)
        act = ops.gated_act(gu, act_kind)
        if step.current().recompute:  # recomputed for the backward: y is never read, x Aᵀ is
            y, xa_d = h.new_empty(h.shape), (_lora_in(act, d_pack) if d_pack.a is not None else None)
        else:
            y, xa_d = _forward(act, [pd], d_pack)
        del act
        ctx.meta = (norm, act_kind, pg, pu, pd, gu_pack.blocks, d_pack.blocks)
        ctx.save_for_backward(h, rstd, gu, xa_gu, xa_d, ag, bg, au, bu, ad, bd, *gu_pack.tensors(), *d_pack.tensors())
        return y.view_as(h)

    @staticmethod
    def backward(ctx, dy):
        h, rstd, gu, xa_gu, xa_d, ag, bg, au, bu, ad, bd, *packed = ctx.saved_tensors
        norm, act_kind, pg, pu, pd, gu_blocks, d_blocks = ctx.meta
        gu_pack, d_pack = Pack.restore(packed[:4], gu_blocks), Pack.restore(packed[4:], d_blocks)
        d = h.shape[-1]
        dy2d = dy.reshape(-1, d)
        dact, dyb_d = _backward_input(dy2d, [pd], d_pack)
        dgu, act = ops.gated_act_backward(dact, gu, act_kind)
        del dact
        ((dad, dbd),) = _backward_lora(dy2d, act, xa_d, dyb_d, d_pack, [(ad, bd)])
        del act
        dx, dyb = _norm_backward_input(dgu, [pg, pu], gu_pack)
        x, _ = norm(h)
        (dag, dbg), (dau, dbu) = _backward_lora(dgu, x.view(-1, d), xa_gu, dyb, gu_pack, [(ag, bg), (au, bu)])
        del x, dgu
        dh = norm.backward(dx.view_as(h), h, rstd)
        return (dh, None, None, dag, dbg, dau, dbu, dad, dbd)
