"""Elementwise pieces of the fused decoder layer, with their hand-written backwards.

Each function is plain PyTorch, so it is its own reference and runs anywhere. On CUDA the
:func:`fused` wrapper hands it to ``torch.compile`` (inductor emits one Triton kernel per function),
which is what makes RMSNorm, SwiGLU and RoPE single passes over memory instead of 4–8 eager kernels.
Shapes: ``h``/``x`` are (..., d); ``g``/``u`` are (..., intermediate); RoPE inputs are
(batch, seq, heads, head_dim) with ``cos``/``sin`` (batch, seq, head_dim).
"""

from __future__ import annotations

import os
import types
import warnings

import torch

from qfine.compat.torch import mark_dynamic


def _compile_enabled() -> bool:
    return os.environ.get("QFINE_COMPILE", "1") != "0"


def upcast(x: torch.Tensor) -> torch.Tensor:
    """fp32 for 16-bit tensors; fp32/fp64 stay as they are (fp64 is for gradient checks)."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def step_dtype(h: torch.Tensor) -> torch.dtype:
    """The dtype a fused training function computes in for input ``h``: autocast's when autocast is
    on for ``h``'s device and ``h`` is fp32 (an fp32 model under bf16/fp16 mixed precision), else
    ``h``'s own. The fused functions take one dtype throughout, so callers cast to it and run them
    with autocast off, as a model stored in that dtype would run."""
    kind = h.device.type
    if h.dtype == torch.float32 and torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return h.dtype


def signature(args: tuple) -> tuple:
    """What a compiled copy of a :func:`fused` function is kept for: each tensor's dtype, device and
    rank, every other argument's value, and the CPU thread count (a dynamo guard reads it, and the
    data loader's pin-memory thread sets 1). Feature sizes are left to dynamo: a second model shape
    costs one recompile with those sizes symbolic, after which any shape is served."""
    key = [(a.dtype, a.device, a.dim()) if isinstance(a, torch.Tensor) else a for a in args]
    return (*key, torch.get_num_threads())


def _fresh_copy(fn):
    """``fn`` with a code object of its own. dynamo keeps compiled variants per code object and
    falls back to eager code (other rounding, more kernels) once one collects more than
    ``recompile_limit`` (8) of them; a copy per :func:`signature` keeps every dtype, flag and thread
    count a process meets (a test session, a sweep, several runs in a notebook) compiled."""
    code = fn.__code__.replace()
    return types.FunctionType(code, fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)


def fused(fn):
    """``fn`` compiled with inductor on CUDA tensors, eager elsewhere.

    The leading token dimensions of each tensor argument — (tokens, …) or (batch, seq, …) — are
    marked dynamic (they vary with batch size, sequence length and the loss's last chunk) while head
    and feature dimensions stay static, so one compiled kernel serves every batch shape and still
    vectorises along features. Each :func:`signature` gets its own compiled copy of ``fn``, so
    other dtypes, flags or thread counts in the same process never push a kernel back to eager code.
    If compilation fails the function runs eagerly from then on (slower, same numbers).
    """
    compiled: dict = {}
    broken = False

    def call(*args):
        nonlocal broken
        if broken or not (args[0].is_cuda and _compile_enabled()):
            return fn(*args)
        key = signature(args)
        kernel = compiled.get(key)
        if kernel is None:
            kernel = compiled[key] = torch.compile(_fresh_copy(fn), fullgraph=True)
        # detached inputs under one fixed autocast state: these functions run inside autograd Functions
        # and upcast explicitly, so requires_grad and autocast would only multiply dynamo's guard variants
        args = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
        for a in args:
            if isinstance(a, torch.Tensor):
                for dim in range(min(a.dim() - 1, 2)):  # (tokens, ...) or (batch, seq, ...)
                    mark_dynamic(a, dim)
        with torch.autocast("cuda", enabled=False, cache_enabled=False):
            if torch.cuda.is_current_stream_capturing():
                return _call_in_capture(call, kernel, fn, args)
            try:
                return kernel(*args)
            except Exception as e:  # noqa: BLE001 — a compiler failure must not stop training
                broken = True
                warnings.warn(f"qfine fast path: torch.compile failed for {fn.__name__} ({type(e).__name__}: "
                              f"{str(e)[:200]}); running it eagerly")
                return fn(*args)

    call.reference = fn
    call.kernels = compiled  # signature → compiled copy (for tests and diagnostics)
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
def rms_norm(h: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0, extra: int = 0):
    """RMSNorm as transformers computes it → (x in h.dtype, rstd fp32 of shape (..., 1)).

    ``offset == 0`` is Llama's norm (also Mistral's and Qwen's): statistics in fp32, the normalised
    value cast back to h.dtype *before* the weight multiplies it. ``offset != 0`` is Gemma's
    ``x̂ · (offset + w)`` taken entirely in fp32 and cast at the end. Each branch rounds exactly as its
    transformers module does, so the fused and reference layers agree bit for bit in fp32.
    With ``extra > 0`` x comes with that many zero columns appended, (..., d + extra): room for the
    LoRA product x Aᵀ, so that one GEMM takes [x | x Aᵀ] along K (see lora.py) without a copy of x.
    """
    x, rstd = _rms(h, weight, eps, offset)
    return (torch.nn.functional.pad(x, (0, extra)) if extra else x), rstd


def _rstd(hf: torch.Tensor, eps: float) -> torch.Tensor:
    """1 / sqrt(mean(h²) + eps) over the last dimension of the fp32 ``hf`` → (..., 1)."""
    return torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)


def _rms(h, weight, eps, offset):
    hf = upcast(h)
    rstd = _rstd(hf, eps)
    if offset:
        return (hf * rstd * (offset + upcast(weight))).to(h.dtype), rstd
    return weight * (hf * rstd).to(h.dtype), rstd


@fused
def rms_norm_backward(dx: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor,
                      offset: float = 0.0):
    """d loss / d h for a frozen-weight RMSNorm (scale ``offset + weight``), given d loss / d x;
    fp32 inside, h.dtype out."""
    return _norm_grad(upcast(dx), upcast(h), upcast(weight) + offset, rstd).to(h.dtype)


def _norm_grad(dx, hf, scale, rstd):
    """fp32 gradient of x = x̂·scale, x̂ = h·rstd, with respect to h."""
    xhat = hf * rstd
    dxhat = dx * scale
    return rstd * (dxhat - xhat * (dxhat * xhat).mean(-1, keepdim=True))


def _halves(gu: torch.Tensor):
    i = gu.shape[-1] // 2
    return gu[..., :i], gu[..., i:]


# Activations of the gated MLP: transformers' hidden_act names → how the fused kernels compute them.
GATED_ACTS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}
_SQRT_2_OVER_PI = 0.7978845608028654
_INV_SQRT_2 = 0.7071067811865476
_INV_SQRT_2PI = 0.3989422804014327


def _act(g: torch.Tensor, act: str) -> torch.Tensor:
    if act == "silu":
        return torch.nn.functional.silu(g)
    return torch.nn.functional.gelu(g, approximate="tanh" if act == "gelu_tanh" else "none")


def _act_grad(gf: torch.Tensor, act: str) -> torch.Tensor:
    """d act(g) / d g in fp32."""
    if act == "silu":
        sig = torch.sigmoid(gf)
        return sig * (1.0 + gf * (1.0 - sig))
    if act == "gelu_tanh":  # 0.5·(1 + t) + 0.5·g·(1 − t²)·k·(1 + 3·0.044715·g²), t = tanh(k·(g + 0.044715·g³))
        t = torch.tanh(_SQRT_2_OVER_PI * (gf + 0.044715 * gf * gf * gf))
        return 0.5 * (1.0 + t) + 0.5 * gf * (1.0 - t * t) * _SQRT_2_OVER_PI * (1.0 + 3 * 0.044715 * gf * gf)
    return 0.5 * (1.0 + torch.erf(gf * _INV_SQRT_2)) + gf * torch.exp(-0.5 * gf * gf) * _INV_SQRT_2PI


@fused
def gated_act(gu: torch.Tensor, act: str = "silu"):
    """act(g) * u for the stacked gate/up output gu = [g | u] (..., 2i) → (..., i), in gu.dtype
    (transformers' ``act_fn(gate_proj(x)) * up_proj(x)``; ``act`` a value of :data:`GATED_ACTS`:
    SwiGLU for Llama/Mistral/Qwen, GeGLU with the tanh GELU for Gemma)."""
    g, u = _halves(gu)
    return _act(g, act) * u


@fused
def gated_act_backward(da: torch.Tensor, gu: torch.Tensor, act: str = "silu"):
    """(dgu, a) for a = act(g)·u with gu = [g | u]: one pass that writes the stacked gradient
    dgu = [dg | du] (..., 2i) — the input of one GEMM against the stacked [Wg; Wu] — and recomputes a,
    which the down projection's LoRA gradient needs. fp32 inside, gu.dtype out."""
    g, u = _halves(gu)
    gf, uf, daf = upcast(g), upcast(u), upcast(da)
    du = daf * _act(gf, act)
    dg = daf * uf * _act_grad(gf, act)
    return torch.cat((dg, du), dim=-1).to(gu.dtype), _act(g, act) * u


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
def qk_norm_rope_qkv(qkv: torch.Tensor, q_w: torch.Tensor, k_w: torch.Tensor, eps: float, offset: float,
                     cos: torch.Tensor, sin: torch.Tensor, n_q: int, n_kv: int):
    """:func:`rope_qkv` with a per-head RMSNorm on q and k before RoPE (Qwen3's ``q_norm``/``k_norm``,
    weights (hd,)): the norm of each head vector of the stacked projection, as :func:`rms_norm`."""
    q = _rms(qkv[:, :, :n_q], q_w, eps, offset)[0]
    k = _rms(qkv[:, :, n_q:n_q + n_kv], k_w, eps, offset)[0]
    return rope(q, cos, sin), rope(k, cos, sin), qkv[:, :, n_q + n_kv:] * 1


@fused
def qk_norm_rope_qkv_backward(dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor, qkv: torch.Tensor,
                              q_w: torch.Tensor, k_w: torch.Tensor, eps: float, offset: float,
                              cos: torch.Tensor, sin: torch.Tensor):
    """d qkv (b, s, n_q + 2·n_kv, hd) for :func:`qk_norm_rope_qkv`, from the kept projection ``qkv``
    (the per-head rstd is recomputed from it: one reduction over hd instead of a kept tensor)."""
    n_q, n_kv = dq.shape[2], dk.shape[2]
    cf, sf = upcast(cos), upcast(sin)
    out = [rope_backward(upcast(dq), cf, sf), rope_backward(upcast(dk), cf, sf)]
    for i, (pre, w) in enumerate(((qkv[:, :, :n_q], q_w), (qkv[:, :, n_q:n_q + n_kv], k_w))):
        hf = upcast(pre)
        out[i] = _norm_grad(out[i], hf, upcast(w) + offset, _rstd(hf, eps)).to(qkv.dtype)
    return torch.cat((out[0], out[1], dv), dim=2)


@fused
def rope_qkv_backward(dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """d qkv (b, s, n_q + 2·n_kv, hd), contiguous, from the gradients of :func:`rope_qkv`'s outputs."""
    return torch.cat((rope_backward(dq, cos, sin), rope_backward(dk, cos, sin), dv), dim=2)


# --- LoRA dropout -----------------------------------------------------------------------------------
# The mask of element (row, col) is a hash of (seed, row, col): the forward draws one int64 seed per
# projection (torch.randint on the tensor's device, which a CUDA graph replays with fresh values) and
# the backward regenerates the same mask from it, so no mask or dropped input is kept (the memory of
# dropout 0). The arithmetic is int64 on 32-bit values whose products stay below 2^59: exact under
# every backend, so eager CPU code and the compiled CUDA kernel give the same bits. (An int32 version
# with wrapping multiplies was no faster on an H200 and inductor did not keep its wrap-around: its
# masks dropped whole rows.)
_M32 = 0xFFFFFFFF
_HASH_MUL = 0x45D9F3B


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit avalanche hash of each int64 value in [0, 2^32) (two xor-shift-multiply rounds)."""
    x = (((x >> 16) ^ x) * _HASH_MUL) & _M32
    x = (((x >> 16) ^ x) * _HASH_MUL) & _M32
    return (x >> 16) ^ x


def keep_mask(seed: torch.Tensor, rows: int, cols: int, p: float) -> torch.Tensor:
    """(rows, cols) bool: True where dropout with probability ``p`` keeps the element, from the 0-d
    integer ``seed`` (in [0, 2³²)); each element is kept with probability 1 − p (to 2⁻³²),
    independently of the others and of other seeds' masks."""
    key = _mix32(seed.to(torch.int64) & _M32)
    row = _mix32(torch.arange(rows, device=seed.device, dtype=torch.int64) ^ key)
    col = torch.arange(cols, device=seed.device, dtype=torch.int64)
    return _mix32(row[:, None] ^ col[None, :]) >= int(round(p * 2**32))


# The seeds come as the layer's whole (7,) tensor and an index (a python int, part of the compiled
# copy's key): a 0-d view per projection would differ in storage offset from call to call, and each
# offset would cost dynamo a recompile until its limit sent the function back to eager code.
@fused
def lora_dropout(x: torch.Tensor, seeds: torch.Tensor, index: int, p: float):
    """Inverted dropout of x (T, d) with :func:`keep_mask` of ``seeds[index]``: x / (1 − p) where kept,
    0 elsewhere, in x.dtype (the scaling rounds as ``torch.nn.Dropout``'s does). The input of one
    LoRA A GEMM."""
    return _dropped(x, seeds[index], p)


@fused
def add_dropout_grad(dx: torch.Tensor, g: torch.Tensor, seeds: torch.Tensor, index: int, p: float):
    """dx + lora_dropout's backward of g (T, d): the gradient that reaches x through the dropped input
    (g = d loss / d dropped x), added to the rest of dx; in dx.dtype. The backward of a mask-and-scale
    is the same mask-and-scale."""
    return dx + _dropped(g, seeds[index], p).to(dx.dtype)


def _dropped(v: torch.Tensor, seed: torch.Tensor, p: float) -> torch.Tensor:
    """v (T, d) · keep / (1 − p) with :func:`keep_mask` of ``seed``, in v.dtype."""
    return torch.where(keep_mask(seed, v.shape[0], v.shape[1], p), v * (1.0 / (1.0 - p)), 0)
