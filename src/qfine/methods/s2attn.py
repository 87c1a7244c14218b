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
library's extension point) and selected per model through the config's attention implementation (:mod:`qfine.compat.transformers`); qfine's
fused layers call the configured implementation too, so both paths run it. The group size sits on
each attention module (``s2_group``), not in the config, so nothing of it is saved with a model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from qfine.compat.transformers import attn_implementation, set_attn_implementation

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


@dataclass
class S2Attn:
    """S²-Attn switched on for a model by :func:`enable`: its attention modules and the attention
    implementation :func:`disable` puts back."""

    base: torch.nn.Module
    before: str | None
    modules: list[torch.nn.Module] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.modules)


def enable(model: torch.nn.Module, group: int) -> S2Attn:
    """Make ``model`` (a causal LM, peft-wrapped or not) train with S²-Attn over groups of ``group``
    tokens; each attention module gets its group size (``s2_group``, which :func:`s2_attention` reads).
    Returns what :func:`disable` undoes (``len()``: the attention modules set)."""
    AttentionInterface.register(NAME, s2_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    on = S2Attn(base, attn_implementation(base.config))
    for name, m in base.named_modules():
        if name.endswith("self_attn"):
            m.s2_group = group
            on.modules.append(m)
    _set_implementation(base, NAME)
    return on


def disable(on: S2Attn | None) -> None:
    """Full attention again where :func:`enable` switched S²-Attn on (nothing for None)."""
    if on is None:
        return
    for m in on.modules:
        m.__dict__.pop("s2_group", None)
    _set_implementation(on.base, on.before)
    on.modules.clear()


def _set_implementation(model, name: str) -> None:
    for config in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
        set_attn_implementation(config, name)
