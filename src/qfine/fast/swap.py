"""Instance-level swaps that put the fused functions into a loaded model.

Nothing here touches a transformers or peft class. Each decoder layer *instance* is replaced in its
``ModuleList`` by a :class:`FastDecoderLayer` that adopts the old layer's children under the same
names (so ``state_dict`` keys and saved adapters are unchanged), and the causal LM *instance* gets a
``forward`` attribute that computes the training loss through :mod:`.loss`. Whenever a call is not a
training step the fast layer runs the original class's ``forward`` on the same children, so
generation, KV caches and eval behave exactly as before.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
import types
from dataclasses import dataclass, field

import torch
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from qfine.compat.transformers import CHECKPOINT_FUNC, attn_implementation
from qfine.fast import ops, step
from qfine.fast.lora import LoraLinear, MLPSpec, Norm, NormMLP, NormQKV, Proj, QKVSpec, describe_proj, lora_proj
from qfine.fast.loss import linear_cross_entropy
from qfine.fast.offload import install_checkpointing
from qfine.fast.ops import GATED_ACTS

# model_type → the offset of its RMSNorm scale (Gemma normalises with 1 + w, the others with w). Each
# family's decoder layer is norm → attention → residual → norm → gated MLP → residual; Qwen3 adds
# per-head q/k norms before RoPE; Gemma's embedding scale lives in the model's forward, not the layer.
NORM_OFFSET = {"llama": 0.0, "mistral": 0.0, "qwen2": 0.0, "qwen3": 0.0, "gemma": 1.0}
SUPPORTED = tuple(NORM_OFFSET)
# the children a supported layer may have: anything else (Gemma2's extra feed-forward norms, say)
# would be skipped by the fused forward, so such a layer is refused
_LAYER_CHILDREN = {"self_attn", "mlp", "input_layernorm", "post_attention_layernorm"}
_ATTN_CHILDREN = {"q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm"}
_MLP_CHILDREN = {"gate_proj", "up_proj", "down_proj", "act_fn"}

_PROJ = (("self_attn", "q_proj"), ("self_attn", "k_proj"), ("self_attn", "v_proj"), ("self_attn", "o_proj"),
         ("mlp", "gate_proj"), ("mlp", "up_proj"), ("mlp", "down_proj"))

try:  # transformers ≥ 5: the base class that makes a layer checkpointable
    from transformers.modeling_layers import GradientCheckpointingLayer as _LayerBase
except ImportError:  # pragma: no cover
    _LayerBase = torch.nn.Module


def _ab(p: Proj):
    return p.lora_a, p.lora_b


def _eps(norm: torch.nn.Module) -> float | None:
    """The epsilon of an RMSNorm module (Llama-style ``variance_epsilon`` or Gemma-style ``eps``)."""
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
    ok = isinstance(eps, float) and isinstance(getattr(norm, "weight", None), torch.Tensor)
    return eps if ok and "RMSNorm" in type(norm).__name__ else None


class FastDecoderLayer(_LayerBase):
    """A Llama-style decoder layer whose training step runs :class:`NormQKV` → attention →
    :class:`LoraLinear` (o_proj) → :class:`NormMLP`.

    Holds the original ``self_attn``, ``mlp``, ``input_layernorm`` and ``post_attention_layernorm``
    modules (same parameter names); attention itself is the model's configured implementation
    (sdpa / flash / eager) called exactly as the original attention module calls it. ``norm_offset``
    and ``act`` describe the family (see :data:`NORM_OFFSET`, :data:`ops.GATED_ACTS`).
    """

    def __init__(self, layer: torch.nn.Module, norm_offset: float = 0.0, act: str = "silu"):
        super().__init__()
        self._reference_cls = type(layer)
        self._norm_offset, self._act = norm_offset, act
        for key, value in vars(layer).items():
            if not key.startswith("_") or key == CHECKPOINT_FUNC:
                setattr(self, key, value)
        for name, child in layer.named_children():
            self.add_module(name, child)
        attn = self.self_attn
        self._eager = getattr(sys.modules[type(attn).__module__], "eager_attention_forward", None)

    def projections(self) -> list[Proj] | None:
        """The seven projections with their active adapters, or None if one cannot be fused now."""
        out = []
        for parent, name in _PROJ:
            p = lora_proj(getattr(getattr(self, parent), name))
            if p is None:
                return None
            out.append(p)
        return out

    def reference_reason(self) -> str | None:
        """Why a training step of this layer would run the reference layer instead of the fused one
        (naming the first module at fault), or None when it runs fused."""
        for parent, name in _PROJ:
            got = describe_proj(getattr(getattr(self, parent), name))
            if isinstance(got, str):
                return f"{got} ({parent}.{name})"
        if self.norms() is None:
            return "trainable norm weights"
        return None

    def norms(self) -> tuple[Norm, Norm, tuple[Norm, Norm] | None] | None:
        """The input and post-attention norms and Qwen3's (q_norm, k_norm) or None; None if one is
        trainable (the fused backward returns no gradient for a norm weight)."""
        attn = self.self_attn
        modules = [self.input_layernorm, self.post_attention_layernorm]
        if hasattr(attn, "q_norm"):
            modules += [attn.q_norm, attn.k_norm]
        if any(m.weight.requires_grad for m in modules):
            return None
        out = [Norm(m.weight, _eps(m), self._norm_offset) for m in modules]
        qk = (out[2], out[3]) if len(out) == 4 else None
        return out[0], out[1], qk

    def forward(self, hidden_states, attention_mask=None, position_ids=None, past_key_values=None,
                use_cache=False, position_embeddings=None, **kwargs):
        projs = norms = None
        mode = step.current()
        graded = torch.is_grad_enabled() or mode.ungraded_forward or mode.reference
        if self.training and graded and past_key_values is None and position_embeddings is not None:
            projs, norms = self.projections(), self.norms()
        if projs is None or norms is None:
            return self._reference_cls.forward(self, hidden_states, attention_mask=attention_mask,
                                               position_ids=position_ids, past_key_values=past_key_values,
                                               use_cache=use_cache, position_embeddings=position_embeddings,
                                               **kwargs)
        h = hidden_states
        dtype = ops.step_dtype(h)
        if dtype != h.dtype:
            # autocast over wider weights (an fp32 model under bf16 mixed precision): the fused
            # functions compute in one dtype, so the layer runs in the autocast dtype with autocast
            # off (as a bf16 model's layer does) and hands the residual stream back in its own dtype
            norms = _cast_norms(norms, dtype)
            with torch.autocast(h.device.type, enabled=False):
                out = self._fused(h.to(dtype), projs, norms, position_embeddings, attention_mask, position_ids,
                                  kwargs)
            return out.to(h.dtype)
        return self._fused(h, projs, norms, position_embeddings, attention_mask, position_ids, kwargs)

    def _fused(self, h, projs, norms, position_embeddings, attention_mask, position_ids, kwargs):
        """The fused training step of the layer on ``h`` (b, s, d), all in ``h.dtype``."""
        pq, pk, pv, po, pg, pu, pd = projs
        attn, (ln1, ln2, qk_norms) = self.self_attn, norms
        cos, sin = position_embeddings
        seeds = self._dropout_seeds(projs, h.device)  # (7,) for q, k, v, o, gate, up, down, or None
        q, k, v = NormQKV.apply(h, QKVSpec(ln1, qk_norms, attn.head_dim, pq, pk, pv), cos.to(h.dtype),
                                sin.to(h.dtype), seeds, *_ab(pq), *_ab(pk), *_ab(pv))

        interface = ALL_ATTENTION_FUNCTIONS.get_interface(attn_implementation(attn.config), self._eager)
        if step.current().causal_only:  # see StepMode: a captured step would build an explicit mask
            attention_mask = None
        if hasattr(attn, "sliding_window"):
            kwargs["sliding_window"] = attn.sliding_window
        elif getattr(attn.config, "sliding_window", None) is not None:
            kwargs["sliding_window"] = attn.config.sliding_window
        out, _ = interface(attn, q, k, v, attention_mask, dropout=attn.attention_dropout, scaling=attn.scaling,
                           position_ids=position_ids, **kwargs)
        out = out.reshape(*h.shape[:-1], -1)
        h = h + LoraLinear.apply(out, po, seeds, *_ab(po), 3)
        del out, q, k, v
        return h + NormMLP.apply(h, MLPSpec(ln2, self._act, pg, pu, pd), seeds, *_ab(pg), *_ab(pu), *_ab(pd))

    def _dropout_seeds(self, projs, device) -> torch.Tensor | None:
        """One int64 seed per projection (q, k, v, o, gate, up, down) for the fused LoRA dropout, or None
        when no projection has dropout. Drawn from the device's generator (so a CUDA graph replay draws
        new ones); a checkpoint recompute of this layer reuses the forward's seeds, so it regenerates
        the very masks the forward used, also inside a captured graph, where the RNG state cannot be
        read and restored."""
        if not any(p.dropout for p in projs):
            return None
        if step.current().recompute and getattr(self, "_qfine_seeds", None) is not None:
            return self._qfine_seeds
        self._qfine_seeds = torch.randint(0, 2**31 - 1, (len(projs),), device=device, dtype=torch.int64)
        return self._qfine_seeds

    def draws_fused_randomness(self) -> bool:
        """True when every LoRA dropout of this layer runs inside the fused functions (peft's Dropout
        modules are then never called in a training step), so a CUDA graph may capture the layer."""
        projs = self.projections()
        return projs is not None and self.norms() is not None


def _cast_norms(norms, dtype: torch.dtype):
    """:meth:`FastDecoderLayer.norms`' tuple with every norm weight cast to ``dtype``."""
    def cast(n: Norm) -> Norm:
        return dataclasses.replace(n, weight=n.weight.to(dtype))

    ln1, ln2, qk = norms
    return cast(ln1), cast(ln2), (tuple(cast(n) for n in qk) if qk is not None else None)


def _purely_causal(config, tokens, attention_mask, position_ids, past_key_values) -> bool:
    """Whether a training forward attends causally over the whole sequence and nothing else."""
    if attention_mask is not None or position_ids is not None or past_key_values is not None or tokens is None:
        return False
    sliding = (any(t != "full_attention" for t in getattr(config, "layer_types", None) or ())
               or getattr(config, "use_sliding_window", True))  # Qwen2 keeps a window it does not use
    window = getattr(config, "sliding_window", None) if sliding else None
    return window is None or tokens.shape[1] <= window


def _fast_causal_lm_forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                            inputs_embeds=None, labels=None, use_cache=None, logits_to_keep=0, **kwargs):
    """Training steps with labels: backbone + :func:`linear_cross_entropy` (``logits`` is None).
    Everything else: the class's own forward."""
    shift_labels = kwargs.get("shift_labels")
    if (labels is None and shift_labels is None) or not (self.training and torch.is_grad_enabled()):
        return type(self).forward(self, input_ids=input_ids, attention_mask=attention_mask,
                                  position_ids=position_ids, past_key_values=past_key_values,
                                  inputs_embeds=inputs_embeds, labels=labels, use_cache=use_cache,
                                  logits_to_keep=logits_to_keep, **kwargs)

    num_items = kwargs.pop("num_items_in_batch", None)
    kwargs.pop("shift_labels", None)
    causal = _purely_causal(self.config, input_ids if input_ids is not None else inputs_embeds,
                            attention_mask, position_ids, past_key_values)
    with step.step_mode(causal_only=causal):
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache,
                         **kwargs)
    loss = linear_cross_entropy(out.last_hidden_state, self.lm_head.weight, labels, num_items, shift_labels)
    return CausalLMOutputWithPast(loss=loss, logits=None, past_key_values=out.past_key_values,
                                  hidden_states=out.hidden_states, attentions=out.attentions)


@dataclass
class FastPathReport:
    """What :func:`apply_fast_path` swapped, or why it swapped nothing."""

    layers: int = 0
    fused_loss: bool = False
    reason: str | None = None
    notes: list[str] = field(default_factory=list)
    fused: int = 0  # swapped layers whose training step runs the fused functions (the others: reference)
    reference: dict[str, int] = field(default_factory=dict)  # why the others do not → how many layers

    def __str__(self) -> str:
        if self.reason:
            return f"fast path off: {self.reason}"
        loss = "chunked cross-entropy" if self.fused_loss else "reference loss"
        extra = f" ({'; '.join(self.notes)})" if self.notes else ""
        ref = ""
        if self.reference:
            ref = "; peft's reference layer for " + ", ".join(f"{n} with {why}" for why, n in self.reference.items())
        return f"fast path on: {self.fused} of {self.layers} decoder layers fused{ref}; {loss}{extra}"


def causal_lm(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers causal LM inside a peft wrapper (or the model itself)."""
    get = getattr(model, "get_base_model", None)
    return get() if callable(get) else model


def unsupported_reason(model: torch.nn.Module) -> str | None:
    """Why the fused layers cannot serve ``model``, or None when they can."""
    lm = causal_lm(model)
    config = getattr(lm, "config", None)
    kind = getattr(config, "model_type", None)
    if kind not in SUPPORTED:
        return f"model type {kind!r} is not one of {', '.join(SUPPORTED)}"
    if getattr(config, "hidden_act", "silu") not in GATED_ACTS:
        return f"activation {config.hidden_act!r} (the fused MLP takes {', '.join(GATED_ACTS)})"
    layers = getattr(getattr(lm, "model", None), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList) or not len(layers):
        return "no decoder layer list at model.layers"
    first = layers[0]
    for parent, name in _PROJ:
        if not hasattr(getattr(first, parent, None), name):
            return f"decoder layer has no {parent}.{name}"
    for parent, allowed in ((first, _LAYER_CHILDREN), (first.self_attn, _ATTN_CHILDREN), (first.mlp, _MLP_CHILDREN)):
        extra = sorted(n for n, _ in parent.named_children() if n not in allowed)
        if extra:
            return f"decoder layer has modules the fused layer would skip: {', '.join(extra)}"
    norms = [first.input_layernorm, first.post_attention_layernorm]
    if hasattr(first.self_attn, "q_norm") != hasattr(first.self_attn, "k_norm"):
        return "attention with only one of q_norm / k_norm"
    if hasattr(first.self_attn, "q_norm"):
        norms += [first.self_attn.q_norm, first.self_attn.k_norm]
        if _eps(norms[2]) != _eps(norms[3]):
            return "q_norm and k_norm with different epsilons"
    for norm in norms:
        if _eps(norm) is None:
            return f"{type(norm).__name__} is not an RMSNorm"
    if getattr(first, "_hf_hook", None) is not None:
        return "decoder layers with accelerate hooks (device_map offloading)"
    return None


def apply_fast_path(model: torch.nn.Module) -> FastPathReport:
    """Swap every decoder layer of ``model`` (a peft or plain causal LM) for a :class:`FastDecoderLayer`
    and give the causal LM a fused-loss ``forward``. Idempotent; returns what was done."""
    reason = unsupported_reason(model)
    if reason:
        return FastPathReport(reason=reason)
    lm = causal_lm(model)
    layers = lm.model.layers
    report = FastPathReport()
    offset, act = NORM_OFFSET[lm.config.model_type], GATED_ACTS[getattr(lm.config, "hidden_act", "silu")]
    for i, layer in enumerate(layers):
        if not isinstance(layer, FastDecoderLayer):
            layers[i] = FastDecoderLayer(layer, offset, act)
        report.layers += 1
        why = layers[i].reference_reason()
        if why is None:
            report.fused += 1
        else:
            report.reference[why] = report.reference.get(why, 0) + 1
    # checkpointing through qfine's reentrant recompute (inputs kept on the device): it lets the fused
    # MLP skip the down projection whose output the recompute never reads
    if install_checkpointing(layers, offload=False):
        report.notes.append("checkpoint recompute skips the down projection")
    head = lm.get_output_embeddings()
    softcap = getattr(lm.config, "final_logit_softcapping", None)
    if (type(head) is torch.nn.Linear and head.bias is None and not head.weight.requires_grad and not softcap):
        if not getattr(lm.__dict__.get("forward"), "qfine_fast", False):
            @functools.wraps(type(lm).forward)
            def forward(self, *args, **kwargs):
                return _fast_causal_lm_forward(self, *args, **kwargs)

            forward.qfine_fast = True
            lm.forward = types.MethodType(forward, lm)
        report.fused_loss = True
    else:
        report.notes.append("trainable or unusual lm_head: reference loss")
    return report
