"""Fast generation for Llama-family causal LMs on their own (quantized) modules, LoRA applied unmerged.

transformers' ``generate`` spends most of a 4-bit model's decode step in Python and in re-reading
weights: every projection is a peft layer over a bitsandbytes layer, each a few kernel launches, and
bitsandbytes dequantizes a whole 16-bit copy of W for more than one row. This engine runs the same
weights with:

* a **static KV cache** (layers, batch, kv heads, length, head dim) allocated once per shape;
* **batched prefill** of left-padded prompts, then a **decode step** of one token per sequence whose
  attention reads the cache under a mask (key slot j is seen by a sequence iff its prompt starts at or
  before j and j is at or before the current slot): on CUDA by :mod:`qfine.fast.attn_decode`, split along
  the cache, elsewhere (and in prefill) by torch's SDPA;
* on CUDA, the decode step **replayed as a CUDA graph** (one launch per step, no Python per layer), and
  the 4-bit projections through :func:`qfine.fast.gemv_kernel.matmul_4bit` (W read once, 0.5 byte per
  weight) when a step has at most 64 rows;
* the adapter **unmerged**: y = base(x) + s·(x Aᵀ)Bᵀ reads the live A and B, so a policy that keeps
  training between rollouts is sampled as it is now, and there is no second copy of the weights. In the
  4-bit kernel the adapter's product is added to the base's in fp32 before the one rounding.

Positions follow transformers' ``generate`` for left padding (a sequence's first real token is at 0),
so greedy output is token-identical on the CPU in fp32 (``tests/test_engine.py``). A model this engine
cannot compute exactly (another family, sliding windows, weights streamed from the host, a LoRA form it
does not implement in a way it can fall back on) is refused by :func:`unsupported_reason` and callers
use ``generate``.
"""

from __future__ import annotations

import importlib.util
import os
import warnings
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from qfine.fast import ops
from qfine.fast.lora import describe_proj
from qfine.fast.swap import _PROJ, _eps, causal_lm

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
# Triton's CPU interpreter runs the 4-bit kernel on CPU tensors (slowly): how the tests check its wiring
_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1" and importlib.util.find_spec("triton") is not None
_LENGTH_STEP = 128  # cache lengths are rounded up to this, so that nearby lengths share one graph


def unsupported_reason(model: torch.nn.Module) -> str | None:
    """Why this engine cannot generate with ``model`` (a peft or plain causal LM), or None."""
    lm = causal_lm(model)
    config = getattr(lm, "config", None)
    kind = getattr(config, "model_type", None)
    if kind not in FAMILIES:
        return f"model type {kind!r} is not one of {', '.join(FAMILIES)}"
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        return "sliding-window attention"
    if not isinstance(getattr(lm, "lm_head", None), torch.nn.Module):
        return "no language-model head (lm_head)"
    inner = getattr(lm, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList) or not hasattr(inner, "rotary_emb"):
        return "no decoder layer list and rotary embedding at model.layers / model.rotary_emb"
    if getattr(config, "rope_scaling", None) and "dynamic" in str(config.rope_scaling.get("rope_type", "")):
        return "dynamic RoPE scaling"
    device = inner.embed_tokens.weight.device
    for layer in layers:
        for parent, name in _PROJ:
            module = getattr(getattr(layer, parent, None), name, None)
            if module is None:
                return f"decoder layer without {parent}.{name}"
            if any(p.device != device for p in module.parameters()):
                return "weights not on the model's device (streamed or offloaded)"
        if getattr(layer, "_hf_hook", None) is not None:
            return "decoder layers with accelerate hooks (device_map offloading)"
    return None


class _Linear:
    """One projection: the frozen base (4-bit through the small-row kernel where it applies) plus the
    active plain LoRA, or the peft module itself for a form computed only by peft (DoRA, …)."""

    def __init__(self, module: torch.nn.Module):
        got = describe_proj(module)
        self.module, self.plain = module, not isinstance(got, str)
        self.a = None
        if self.plain:
            self.base, self.a, self.b, self.scale = got.base, got.lora_a, got.lora_b, got.scale
            w = getattr(self.base, "weight", None)
            self.packed = w if getattr(w, "quant_state", None) is not None else None

    def kernel(self, x: torch.Tensor) -> bool:
        """Whether x goes through the 4-bit small-row kernel."""
        return self.plain and self.packed is not None and _small_rows(x, self.packed)

    def __call__(self, x: torch.Tensor, xa: torch.Tensor | None, residual: torch.Tensor | None = None):
        """y (…, out) for x (…, in) and its LoRA down-product ``xa`` (…, r) from :class:`_Group`; with
        ``residual``, residual + y (in x's dtype, as ``h + proj(x)``)."""
        if not self.plain:
            y = self.module(x)
        elif self.kernel(x):
            from qfine.fast.gemv_kernel import matmul_4bit  # Triton: CUDA only

            # base and adapter products summed in fp32 inside the kernel, rounded once
            lora = None if xa is None else (xa, self.b, self.scale)
            if self.base.bias is None:
                return matmul_4bit(x, self.packed, lora, residual=residual)
            y = matmul_4bit(x, self.packed, lora) + self.base.bias.to(x.dtype)
        else:
            y = self.base(x)
            if xa is not None:  # as peft's forward: the LoRA term in the adapter's dtype, cast back, added
                y = y + (F.linear(xa, self.b) * self.scale).to(y.dtype)
        return y if residual is None else residual + y


def _small_rows(x: torch.Tensor, weight) -> bool:
    if not x.is_cuda and not _INTERPRETED:
        return False
    from qfine.fast.gemv_kernel import usable

    return usable(weight, x)


class _Group:
    """Projections that read one input (q, k, v; gate, up; o; down): their LoRA down-products x Aᵀ, in
    one launch for a one-row input whose projections all go through the 4-bit kernel, else each as peft
    computes it (x cast to the adapter's dtype once, then lora_A)."""

    def __init__(self, *linears: _Linear):
        self.linears = linears
        mats = [lin.a for lin in linears if lin.a is not None]
        self.fused = (0 < len(mats) == len(linears) <= 3 and len({a.dtype for a in mats}) == 1)

    def normed(self, h: torch.Tensor, norm: _Norm) -> tuple[torch.Tensor, list]:
        """(norm(h), the down-products of it): in one launch for a one-row input of a Llama-style norm where the
        projections all go through the 4-bit kernel (:func:`qfine.fast.lora_down.lora_down`), else the norm and
        then :meth:`__call__`."""
        if norm.eps is not None and self._down_fused(h):
            from qfine.fast.lora_down import lora_down

            got = lora_down(h, [lin.a for lin in self.linears], norm=(norm.module.weight, norm.eps))
            if got is not None:
                return got[1], got[0]
        x = norm(h)
        return x, self(x)

    def gated(self, x: torch.Tensor, act, xas: list | None = None) -> torch.Tensor:
        """act(gate(x)) · up(x) for the group (gate, up): in one launch of the 4-bit kernel with SiLU where it
        serves them (:func:`qfine.fast.gemv_kernel.matmul_4bit_silu`), else the two outputs and then act.
        ``xas``: the down-products, when already computed."""
        xas = self(x) if xas is None else xas
        if act == "silu" and self._kernels(x):
            from qfine.fast.gemv_kernel import matmul_4bit_silu

            got = matmul_4bit_silu(x, *self._members(xas))
            if got is not None:
                return got
        g, u = self.project(x, xas)
        return _gated(g, u, act) if isinstance(act, str) else act(g) * u

    def _members(self, xas: list) -> list[tuple]:
        """(packed weight, (xa, B, scale) or None) per projection, as the 4-bit kernels take them."""
        return [(lin.packed, None if xa is None else (xa, lin.b, lin.scale)) for lin, xa in zip(self.linears, xas)]

    def _kernels(self, x: torch.Tensor) -> bool:
        return len(self.linears) > 1 and all(lin.kernel(x) and lin.base.bias is None for lin in self.linears)

    def project(self, x: torch.Tensor, xas: list | None = None) -> list[torch.Tensor]:
        """Each projection's output for x (``xas``: the down-products, when already computed): in one launch of
        the 4-bit kernel for all of them where it serves them (:func:`qfine.fast.gemv_kernel.matmul_4bit_group`),
        else one call each."""
        xas = self(x) if xas is None else xas
        if self._kernels(x):
            from qfine.fast.gemv_kernel import matmul_4bit_group

            got = matmul_4bit_group(x, self._members(xas))
            if got is not None:
                return got
        return [lin(x, xa) for lin, xa in zip(self.linears, xas)]

    def single_a(self) -> torch.Tensor | None:
        """A (r, in) of a group of one projection with a plain adapter (o), for a kernel that computes x Aᵀ
        as :meth:`__call__` would (x cast to A's dtype, fp32 sums); else None."""
        if len(self.linears) != 1 or not self.fused:
            return None
        a = self.linears[0].a
        return a if a.stride(1) == 1 else None

    def _down_fused(self, x: torch.Tensor) -> bool:
        """Whether the down-products of x take one launch: one row (more: cuBLAS's products are faster), every
        projection through the 4-bit kernel."""
        return self.fused and x.numel() == x.shape[-1] and all(lin.kernel(x) for lin in self.linears)

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor | None]:
        if self._down_fused(x):
            from qfine.fast.lora_down import lora_down

            return lora_down(x, [lin.a for lin in self.linears])
        cast: dict = {}
        out = []
        for lin in self.linears:
            if lin.a is None:
                out.append(None)
                continue
            xc = cast.get(lin.a.dtype)
            if xc is None:
                xc = cast[lin.a.dtype] = x.to(lin.a.dtype)
            out.append(F.linear(xc, lin.a))
        return out


class _Norm:
    """An RMSNorm module, computed by :func:`qfine.fast.ops.rms_norm` (one compiled kernel on CUDA,
    rounding as the module does) when it is a plain Llama-style RMSNorm, else by the module."""

    def __init__(self, module: torch.nn.Module):
        self.module, self.eps = module, _eps(module)

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        if self.eps is None:
            return self.module(h)
        return ops.rms_norm(h, self.module.weight, self.eps)[0]


@ops.fused
def _gated(g: torch.Tensor, u: torch.Tensor, act: str) -> torch.Tensor:
    """act(g) · u, as the MLP's ``act_fn(gate) * up`` (one compiled kernel on CUDA)."""
    return ops._act(g, act) * u


@ops.fused
def _rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """RoPE of q (b, t, heads, d) and k (b, t, kv heads, d) with cos/sin (b, t, d), as the model applies it."""
    return ops.rope(q, cos, sin), ops.rope(k, cos, sin)


@dataclass
class _Layer:
    ln1: _Norm
    ln2: _Norm
    q: _Linear
    k: _Linear
    v: _Linear
    o: _Linear
    gate: _Linear
    up: _Linear
    down: _Linear
    act: object  # the MLP's act_fn, or the name of a gated activation ops computes
    q_norm: _Norm | None
    k_norm: _Norm | None
    scaling: float

    def __post_init__(self):
        self.qkv, self.gate_up = _Group(self.q, self.k, self.v), _Group(self.gate, self.up)
        self.o_in, self.down_in = _Group(self.o), _Group(self.down)


class Decoder:
    """The model's forward over a static KV cache for ``batch`` sequences of up to ``length`` tokens.

    ``prefill(ids, pad)`` runs left-padded prompts (batch, p) whose row b starts at ``pad[b]``;
    ``step(tokens, slot)`` runs one token per sequence at cache slot ``slot`` (the same for every row:
    the prompts are left-aligned to one length). Both return logits (batch, vocab) fp32 of the last
    position. On CUDA ``step`` is captured once as a CUDA graph and replayed.
    """

    def __init__(self, model: torch.nn.Module, batch: int, length: int, graph: bool = True):
        lm = causal_lm(model)
        inner, cfg = lm.model, lm.config
        self.lm, self.inner = lm, inner
        self.embed, self.norm, self.head = inner.embed_tokens, inner.norm, lm.lm_head
        self.device = self.embed.weight.device
        self.dtype = self.embed.weight.dtype
        self.batch, self.length = batch, length
        self.layers = [self._layer(layer) for layer in inner.layers]
        first = inner.layers[0].self_attn
        self.head_dim = getattr(first, "head_dim", cfg.hidden_size // cfg.num_attention_heads)
        self.heads = cfg.num_attention_heads
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or self.heads
        shape = (len(self.layers), batch, self.kv_heads, length, self.head_dim)
        self.keys = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.values = torch.zeros(shape, dtype=self.dtype, device=self.device)
        positions = torch.arange(length, device=self.device)[None]
        probe = torch.zeros(1, dtype=self.dtype, device=self.device)
        cos, sin = inner.rotary_emb(probe, positions)  # (1, length, head_dim), as the model computes them
        self.cos, self.sin = cos[0], sin[0]
        self.slots = torch.arange(length, device=self.device)
        self.pad = torch.zeros(batch, dtype=torch.long, device=self.device)
        # the decode step's inputs and output, at fixed addresses for the graph
        self.tokens = torch.zeros(batch, 1, dtype=torch.long, device=self.device)
        self.slot = torch.zeros(1, dtype=torch.long, device=self.device)
        self.logits: torch.Tensor | None = None
        self.graph = None
        self.use_graph = graph and self.device.type == "cuda"

    def _layer(self, layer) -> _Layer:
        attn, mlp = layer.self_attn, layer.mlp
        qn, kn = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)
        act = ops.GATED_ACTS.get(getattr(self.lm.config, "hidden_act", ""), mlp.act_fn)
        qk = (_Norm(qn), _Norm(kn)) if qn is not None else (None, None)
        return _Layer(_Norm(layer.input_layernorm), _Norm(layer.post_attention_layernorm), _Linear(attn.q_proj),
                      _Linear(attn.k_proj), _Linear(attn.v_proj), _Linear(attn.o_proj), _Linear(mlp.gate_proj),
                      _Linear(mlp.up_proj), _Linear(mlp.down_proj), act, *qk, float(attn.scaling))

    def _forward(self, ids: torch.Tensor, first_slot: torch.Tensor) -> torch.Tensor:
        """Logits (batch, vocab) fp32 at the last of ``ids`` (batch, t), whose tokens fill cache slots
        first_slot .. first_slot + t − 1 (``first_slot``: a one-element tensor)."""
        b, t = ids.shape
        slots = first_slot + torch.arange(t, device=self.device)  # (t,)
        # key slot j is visible from query slot i of row r iff pad[r] <= j <= i; a padding query sees
        # itself only (its output is never used, but a fully masked row would be NaN)
        group = self.heads // self.kv_heads
        # one token per row on the GPU: the split-cache kernel, which reads pad and slot itself
        split = t == 1 and (self.device.type == "cuda" or _INTERPRETED) and self.head_dim in (16, 32, 64, 128, 256)
        if not split:  # (else the attention kernel reads cos, sin at its rows' positions)
            positions = (slots[None, :] - self.pad[:, None]).clamp_min(0)  # (b, t) as generate counts them
            cos, sin = self.cos[positions], self.sin[positions]  # (b, t, d)
            keys = self.slots[None, None, :]
            seen = (keys >= self.pad[:, None, None]) & (keys <= slots[None, :, None])
            seen = seen | (keys == slots[None, :, None])
            # queries of one kv head side by side: (b, kv, group·t, d) against keys (b, kv, length, d)
            seen = seen[:, None, None].expand(b, 1, group, t, self.length).reshape(b, 1, group * t, self.length)
            # as the additive bias SDPA would make of a boolean mask in every layer, made once per step
            mask = torch.where(seen, 0.0, float("-inf")).to(self.dtype)
        h = self.embed(ids)
        for i, layer in enumerate(self.layers):
            x, xas = layer.qkv.normed(h, layer.ln1)
            q, k, v = layer.qkv.project(x, xas)
            q = q.view(b, t, self.heads, self.head_dim)
            k, v = k.view(b, t, self.kv_heads, self.head_dim), v.view(b, t, self.kv_heads, self.head_dim)
            if layer.q_norm is not None:
                q, k = layer.q_norm(q), layer.k_norm(k)
            if not split:
                q, k = _rope(q, k, cos, sin)
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
            xas_o = None
            if split:  # the attention kernel applies RoPE and writes k, v into the cache at the slot itself
                from qfine.fast.attn_decode import decode_attention  # Triton: CUDA only

                # and adds o's LoRA down-product of its output, one launch fewer
                down = layer.o_in.single_a()
                out = decode_attention(q, self.keys[i], self.values[i], self.pad, first_slot, layer.scaling,
                                       new=(k, v), rope=(self.cos, self.sin), down=down)
                if down is not None:
                    out, xa = out
                    xas_o = [xa.view(b, t, -1)]
            else:
                self.keys[i].index_copy_(2, slots, k)
                self.values[i].index_copy_(2, slots, v)
                q = q.reshape(b, self.kv_heads, group * t, self.head_dim)
                out = F.scaled_dot_product_attention(q, self.keys[i], self.values[i], attn_mask=mask,
                                                     scale=layer.scaling)
            # SDPA may return any strides (a view would fail on CUDA)
            out = out.reshape(b, self.heads, t, self.head_dim).transpose(1, 2).reshape(b, t, -1)
            h = layer.o(out, *(layer.o_in(out) if xas_o is None else xas_o), residual=h)
            x, xas = layer.gate_up.normed(h, layer.ln2)
            gated = layer.gate_up.gated(x, layer.act, xas)
            h = layer.down(gated, *layer.down_in(gated), residual=h)
        return self.head(self.norm(h[:, -1:]))[:, 0].float()

    def prefill(self, ids: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        """Logits (batch, vocab) after the left-padded prompts ``ids`` (batch, p); row b's prompt
        starts at column ``pad[b]``."""
        self.pad.copy_(pad)
        return self._forward(ids, torch.zeros(1, dtype=torch.long, device=self.device))

    def step(self, tokens: torch.Tensor, slot: int) -> torch.Tensor:
        """Logits (batch, vocab) after one more token per row (``tokens`` (batch,)) at cache ``slot``.
        The returned tensor is overwritten by the next step."""
        self.tokens.copy_(tokens.view(-1, 1))
        self.slot.fill_(slot)
        if not self.use_graph:
            return self._forward(self.tokens, self.slot)
        if self.graph is None:
            try:
                self._capture()
            except RuntimeError as e:  # an operation that cannot be captured: run the step as it is
                warnings.warn(f"decode step not captured as a CUDA graph ({e}); running it un-graphed")
                self.use_graph = False
                return self._forward(self.tokens, self.slot)
        self.graph.replay()
        return self.logits

    def _capture(self) -> None:
        # warm up on a side stream (kernel compilation, allocator), then capture one step; the cache
        # entries this writes at the current slot are rewritten by the replay that follows
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._forward(self.tokens, self.slot)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            self.logits = self._forward(self.tokens, self.slot)
        self.graph = graph


def _signature(model) -> tuple:
    """What a captured step depends on besides its inputs: which modules compute and which adapter
    tensors they read (a switched adapter or a re-created parameter needs a new capture)."""
    lm = causal_lm(model)
    out = [lm.lm_head.weight.data_ptr(), lm.lm_head.weight.dtype]
    for layer in lm.model.layers:
        for parent, name in _PROJ:
            got = describe_proj(getattr(getattr(layer, parent), name))
            out.append(got if isinstance(got, str) else
                       (id(got.base), got.lora_a is not None and got.lora_a.data_ptr(), got.scale))
    return tuple(out)


_DECODERS: "weakref.WeakKeyDictionary[torch.nn.Module, dict]" = weakref.WeakKeyDictionary()
_KEEP = 2  # decoders kept per model (each holds its cache and graph)


def decoder_for(model: torch.nn.Module, batch: int, length: int, graph: bool = True) -> Decoder:
    """A :class:`Decoder` for ``batch`` × at least ``length``, reused across calls while the model's
    adapter state is unchanged (the last :data:`_KEEP` shapes are kept)."""
    length = -(-length // _LENGTH_STEP) * _LENGTH_STEP
    ctx = getattr(causal_lm(model).config, "max_position_embeddings", None)
    if ctx:
        length = min(length, ctx)
    kept = _DECODERS.setdefault(model, {})
    key = (batch, length, graph, _signature(model))
    if key not in kept:
        while len(kept) >= _KEEP:
            kept.pop(next(iter(kept)))
        kept[key] = Decoder(model, batch, length, graph)
    else:
        kept[key] = kept.pop(key)  # most recently used last
    return kept[key]


def release(model: torch.nn.Module) -> None:
    """Free the caches and graphs kept for ``model``."""
    _DECODERS.pop(model, None)


@dataclass
class Generated:
    """Completions of a batch of prompts: each row's new tokens up to and including the first stop
    token (or ``max_new_tokens`` of them), and with ``logprobs`` each token's log-probability under
    the sampling distribution before top-p/top-k (log-softmax of logits / temperature; of the raw logits
    when greedy), which is what a training forward over the same tokens computes."""

    tokens: list[list[int]]
    logprobs: list[list[float]] | None = None


def _choose(logits: torch.Tensor, temperature: float, top_p: float, top_k: int, generator) -> torch.Tensor:
    """The next token of each row (batch,) from fp32 ``logits`` (batch, vocab): argmax when
    ``temperature`` is 0, else a draw after temperature, top-k and top-p (the smallest set of most
    likely tokens whose probability reaches top_p, at least one), as transformers' warpers filter."""
    if temperature <= 0:
        return logits.argmax(-1)
    scores = logits / temperature
    if top_k > 0 and top_k < scores.shape[-1]:
        kth = torch.topk(scores, top_k, dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1.0:
        ordered, order = torch.sort(scores, descending=False)
        cumulative = ordered.softmax(-1).cumsum(-1)
        drop = cumulative <= 1 - top_p
        drop[:, -1] = False
        scores = scores.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    return torch.multinomial(scores.softmax(-1), 1, generator=generator)[:, 0]


@torch.no_grad()
def generate_tokens(model: torch.nn.Module, prompts: list[list[int]], max_new_tokens: int, stop_ids: list[int],
                    pad_id: int, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                    logprobs: bool = False, on_token=None, generator: torch.Generator | None = None,
                    graph: bool = True) -> Generated:
    """Complete each of ``prompts`` (token id lists) with up to ``max_new_tokens`` tokens, stopping a
    row at any of ``stop_ids``. ``on_token(tokens (batch,))`` is called after each step (a host
    synchronisation per step: for streaming). Dropout is off for the call (the model's mode is restored)."""
    if not prompts or max_new_tokens < 1:
        return Generated([[] for _ in prompts], [[] for _ in prompts] if logprobs else None)
    width = max(len(p) for p in prompts)
    dec = decoder_for(model, len(prompts), width + max_new_tokens, graph)
    if width + max_new_tokens > dec.length:
        raise ValueError(f"prompt of {width} tokens + {max_new_tokens} new tokens exceeds the model's context "
                         f"of {dec.length} tokens")
    device = dec.device
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = torch.tensor(p, dtype=torch.long)
    pad = torch.tensor([width - len(p) for p in prompts], dtype=torch.long)
    stops = torch.tensor(sorted(set(stop_ids)), dtype=torch.long, device=device)
    out = torch.full((len(prompts), max_new_tokens), pad_id, dtype=torch.long, device=device)
    scores = torch.zeros(len(prompts), max_new_tokens, dtype=torch.float32, device=device) if logprobs else None
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    was_training = model.training
    model.eval()
    try:
        logits = dec.prefill(ids.to(device), pad.to(device))
        steps = 0
        for t in range(max_new_tokens):
            token = _choose(logits, temperature, top_p, top_k, generator)
            if scores is not None:
                lp = (logits / temperature if temperature > 0 else logits).log_softmax(-1)
                scores[:, t] = lp.gather(1, token[:, None])[:, 0]
            out[:, t] = token
            steps = t + 1
            done |= torch.isin(token, stops)
            if on_token is not None:
                on_token(token)
            if t + 1 == max_new_tokens or (t % 16 == 15 and bool(done.all())):
                break
            logits = dec.step(token, width + t)
    finally:
        model.train(was_training)
    tokens, kept = out[:, :steps].tolist(), (scores[:, :steps].tolist() if scores is not None else None)
    stop_set = set(stop_ids)
    for row, seq in enumerate(tokens):
        end = next((i + 1 for i, tok in enumerate(seq) if tok in stop_set), len(seq))
        tokens[row] = seq[:end]
        if kept is not None:
            kept[row] = kept[row][:end]
    return Generated(tokens, kept)
