"""Elementwise pieces of the fused decoder layer, with their hand-written backwards.

Each function is plain PyTorch, so it is its own reference and runs anywhere. On CUDA the
:func:`fused` wrapper hands it to ``torch.compile`` (inductor emits one Triton kernel per function),
which is what makes RMSNorm, SwiGLU and RoPE single passes over memory instead of 4–8 eager kernels.
Shapes: ``h``/``x`` are (..., d); ``g``/``u`` are (..., intermediate); RoPE inputs are
(batch, seq, heads, head_dim) with ``cos``/``sin`` (batch, seq, head_dim).
"""

from __future__ import annotations

import os
import warnings

import torch


def _compile_enabled() -> bool:
    return os.environ.get("QFINE_COMPILE", "1") != "0"


def upcast(x: torch.Tensor) -> torch.Tensor:
    """fp32 for 16-bit tensors; fp32/fp64 stay as they are (fp64 is for gradient checks)."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def fused(fn):
    """``fn`` compiled with inductor on CUDA tensors, eager elsewhere.

    The leading token dimensions of each tensor argument — (tokens, …) or (batch, seq, …) — are
    marked dynamic (they vary with batch size, sequence length and the loss's last chunk) while head
    and feature dimensions stay static, so one compiled kernel serves every batch shape and still vectorises along features.
    If compilation fails the function runs eagerly from then on (slower, same numbers).
    """
    compiled = None
    broken = False

    def call(*args):
        nonlocal compiled, broken
        if broken or not (args[0].is_cuda and _compile_enabled()):
            return fn(*args)
        if compiled is None:
            compiled = torch.compile(fn, fullgraph=True)
        # detached inputs under one fixed autocast state: these functions run inside autograd Functions
        # and upcast explicitly, so requires_grad and autocast would only multiply dynamo's guard variants
        # (a recompile each, up to its recompile limit, after which the function would run eagerly)
        args = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
        for a in args:
            if isinstance(a, torch.Tensor):
                for dim in range(min(a.dim() - 1, 2)):  # (tokens, ...) or (batch, seq, ...)
                    torch._dynamo.maybe_mark_dynamic(a, dim)
        with torch.autocast("cuda", enabled=False, cache_enabled=False):
            if torch.cuda.is_current_stream_capturing():
                return _call_in_capture(call, compiled, fn, args)
            try:
                return compiled(*args)
            except Exception as e:  # noqa: BLE001 — a compiler failure must not stop training
                broken = True
                warnings.warn(f"qfine fast path: torch.compile failed for {fn.__name__} ({type(e).__name__}: "
                              f"{str(e)[:200]}); running it eagerly")
                return fn(*args)

    call.reference = fn
    call.eager_in_capture = 0  # calls recorded eagerly into a CUDA graph (see _call_in_capture)
    call.capture_error = None
    call.__name__ = fn.__name__
    call.__doc__ = fn.__doc__
    _FUSED.append(call)
    return call


_FUSED: list = []  # every function wrapped by fused(), here and in loss.py


def eager_in_capture() -> dict[str, int]:
    """Fused functions recorded eagerly into CUDA graphs so far, with how often (see _call_in_capture)."""
    return {f.__name__: f.eager_in_capture for f in _FUSED if f.eager_in_capture}


def _call_in_capture(call, compiled, fn, args):
    """Inside a CUDA-graph capture (fast/graphs.py) a recompilation would benchmark kernels, which a
    capture forbids: take the compiled kernel only if its guards pass as they are, else record the
    eager version (same numbers, more kernels in the graph) and keep the reason for diagnostics."""
    try:
        with torch.compiler.set_stance("fail_on_recompile"):
            return compiled(*args)
    except Exception as e:  # noqa: BLE001
        call.eager_in_capture += 1
        call.capture_error = call.capture_error or f"{type(e).__name__}: {e}"
        return fn(*args)


@fused
def rms_norm(h: torch.Tensor, weight: torch.Tensor, eps: float):
    """Llama RMSNorm as transformers computes it → (x in h.dtype, rstd fp32 of shape (..., 1)).

    The statistics are taken in fp32 and the normalised value is cast back before the weight
    multiplies it, as ``LlamaRMSNorm`` does, so both paths round identically.
    """
    hf = upcast(h)
    rstd = torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * (hf * rstd).to(h.dtype), rstd


@fused
def rms_norm_backward(dx: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor):
    """d loss / d h for a frozen-weight RMSNorm, given d loss / d x; fp32 inside, h.dtype out."""
    xhat = upcast(h) * rstd
    dxhat = upcast(dx) * upcast(weight)
    dh = rstd * (dxhat - xhat * (dxhat * xhat).mean(-1, keepdim=True))
    return dh.to(h.dtype)


def _halves(gu: torch.Tensor):
    i = gu.shape[-1] // 2
    return gu[..., :i], gu[..., i:]


@fused
def swiglu(gu: torch.Tensor):
    """silu(g) * u for the stacked gate/up output gu = [g | u] (..., 2i) → (..., i), in gu.dtype
    (transformers' ``act_fn(gate_proj(x)) * up_proj(x)``)."""
    g, u = _halves(gu)
    return torch.nn.functional.silu(g) * u


@fused
def swiglu_backward(da: torch.Tensor, gu: torch.Tensor):
    """(dgu, a) for a = silu(g)·u with gu = [g | u]: one pass that writes the stacked gradient
    dgu = [dg | du] (..., 2i) — the input of one GEMM against the stacked [Wg; Wu] — and recomputes a,
    which the down projection's LoRA gradient needs. fp32 inside, gu.dtype out."""
    g, u = _halves(gu)
    gf, uf, daf = upcast(g), upcast(u), upcast(da)
    sig = torch.sigmoid(gf)
    silu = gf * sig
    du = daf * silu
    dg = daf * uf * sig * (1.0 + gf * (1.0 - sig))
    act = torch.nn.functional.silu(g) * u
    return torch.cat((dg, du), dim=-1).to(gu.dtype), act


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _rotate_half_t(x: torch.Tensor) -> torch.Tensor:
    """The transpose of :func:`_rotate_half` as a linear map: (z1, z2) → (z2, -z1)."""
    half = x.shape[-1] // 2
    return torch.cat((x[..., half:], -x[..., :half]), dim=-1)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """x·cos + rotate_half(x)·sin for x (b, s, heads, hd) and cos/sin (b, s, hd)."""
    c, s = cos.unsqueeze(2), sin.unsqueeze(2)
    return x * c + _rotate_half(x) * s


def rope_backward(dy: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Gradient of :func:`rope` with respect to x: dy·cos + rotate_halfᵀ(dy·sin)."""
    c, s = cos.unsqueeze(2), sin.unsqueeze(2)
    return dy * c + _rotate_half_t(dy * s)


@fused
def rope_qkv(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, n_q: int, n_kv: int):
    """Split the stacked projection qkv (b, s, n_q + 2·n_kv, hd) into RoPE'd q, RoPE'd k and v,
    each a new contiguous (b, s, heads, hd) tensor (so the stacked buffer can be freed)."""
    q = rope(qkv[:, :, :n_q], cos, sin)
    k = rope(qkv[:, :, n_q:n_q + n_kv], cos, sin)
    v = qkv[:, :, n_q + n_kv:] * 1  # a copy, not a view of qkv
    return q, k, v


@fused
def rope_qkv_backward(dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """d qkv (b, s, n_q + 2·n_kv, hd), contiguous, from the gradients of :func:`rope_qkv`'s outputs."""
    return torch.cat((rope_backward(dq, cos, sin), rope_backward(dk, cos, sin), dv), dim=2)
