"""LongLoRA's shifted sparse attention, S²-Attn (arXiv 2309.12307), for training on long sequences.

In training, each sequence of T tokens is cut into groups of G tokens and attention stays inside a
group (causal). Half the heads use groups shifted by G/2, so information crosses group borders from
one layer to the next. Unlike the reference code, which rolls the shifted half (its first group then
holds the last G/2 tokens, and tokens see the end of the sequence), the shifted groups here start at
G/2 and the first G/2 tokens form a group of their own: no token ever sees a later one::

    head h < H/2:   group(t) = t // G
    head h ≥ H/2:   group(t) = 0 if t < G/2 else (t − G/2) // G + 1
    token i sees j  ⇔  j ≤ i and group(i) = group(j)

Cost: T·G instead of T²/2 score entries per head. At inference (``module.training`` false) the model
attends over the whole sequence with SDPA, as LongLoRA does.

It is installed as a transformers attention implementation (``AttentionInterface.register``, the
library's extension point) and selected per model through ``config._attn_implementation``; qfine's
fused layers call the configured implementation too, so both paths run it. The group size sits on
each attention module (``s2_group``), not in the config, so nothing of it is saved with a model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "qfine_s2"


def _causal_groups(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: int, scale: float | None) -> torch.Tensor:
    """Causal attention inside consecutive groups of ``group`` tokens of (B, h, T, D) tensors; the last
    group may be shorter (padded at its end, where causality keeps the padding unseen)."""
    b, h, t, d = q.shape
    n = -(-t // group)
    pad = n * group - t
    if pad:
        q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
    q, k, v = (x.reshape(b, h * n, group, d) for x in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    return out.reshape(b, h, n * group, d)[:, :, :t]


def s2_attention_heads(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: int,
                       scale: float | None = None) -> torch.Tensor:
    """S²-Attn over (B, H, T, D) queries and keys/values with as many heads; (B, H, T, D)."""
    if group % 2:
        raise ValueError(f"the S²-Attn group size must be even, not {group}")
    half, shift = q.shape[1] // 2, group // 2
    plain = _causal_groups(q[:, :half], k[:, :half], v[:, :half], group, scale)
    qs, ks, vs = q[:, half:], k[:, half:], v[:, half:]
    head = F.scaled_dot_product_attention(qs[:, :, :shift], ks[:, :, :shift], vs[:, :, :shift], is_causal=True,
                                          scale=scale)
    parts = [head]
    if q.shape[2] > shift:
        parts.append(_causal_groups(qs[:, :, shift:], ks[:, :, shift:], vs[:, :, shift:], group, scale))
    return torch.cat([plain, torch.cat(parts, dim=2)], dim=1)


def s2_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The transformers attention-function form: (B, H, T, D) query, (B, H_kv, T, D) key/value →
    ((B, T, H, D) output, None). Full SDPA attention outside training or without a group size."""

    group = getattr(module, "s2_group", 0)
    if not module.training or not group or query.shape[2] <= group:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    # training batches are right-padded: a causal group never lets a real token see the padding after it
    rep = query.shape[1] // key.shape[1]
    if rep > 1:
        key, value = key.repeat_interleave(rep, dim=1), value.repeat_interleave(rep, dim=1)
    out = s2_attention_heads(query, key, value, group, scaling)
    return out.transpose(1, 2).contiguous(), None


def reference_s2(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: int, scale: float) -> torch.Tensor:
    """Naive S²-Attn (module docstring's rule as an explicit (T, T) mask), fp32; for tests."""
    t = q.shape[2]
    pos = torch.arange(t)
    plain = pos // group
    shifted = torch.where(pos < group // 2, 0, (pos - group // 2) // group + 1)
    out = []
    for h in range(q.shape[1]):
        grp = plain if h < q.shape[1] // 2 else shifted
        allowed = (pos[None, :] <= pos[:, None]) & (grp[None, :] == grp[:, None])
        scores = (q[:, h].float() @ k[:, h].float().transpose(-1, -2)) * scale
        out.append(torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1) @ v[:, h].float())
    return torch.stack(out, dim=1)


def enable(model: torch.nn.Module, group: int) -> int:
    """Make ``model`` (a causal LM, peft-wrapped or not) train with S²-Attn over groups of ``group``
    tokens; returns the number of attention modules set. :func:`disable` undoes it."""

    AttentionInterface.register(NAME, s2_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    n = 0
    for name, m in base.named_modules():
        if name.endswith("self_attn"):
            m.s2_group = group
            n += 1
    base._qfine_attn_before = base.config._attn_implementation
    _set_implementation(base, NAME)
    return n


def disable(model: torch.nn.Module) -> None:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    before = getattr(base, "_qfine_attn_before", None)
    if before is None:
        return
    for name, m in base.named_modules():
        if name.endswith("self_attn") and hasattr(m, "s2_group"):
            del m.s2_group
    _set_implementation(base, before)
    del base._qfine_attn_before


def _set_implementation(model, name: str) -> None:
    for config in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
        config._attn_implementation = name
