"""Causal-LM cross-entropy straight from hidden states, in row chunks: no full-vocabulary logits.

transformers computes ``logits = lm_head(h)`` (tokens × vocab, bf16), upcasts them to fp32 and
takes the cross-entropy: for Llama-3 at 4×2048 tokens that is 2 GiB of bf16 logits, 4 GiB in fp32,
plus their gradient. Here the frozen head is applied to ``chunk`` loss-bearing rows at a time, the
loss and d loss / d logits of that chunk are formed in one fused pass (fp32 inside), and
d loss / d h is accumulated at once — so the backward is a stored (tokens, d) tensor times the
incoming scale. Same numbers as ``ForCausalLMLoss`` up to summation order.
"""

from __future__ import annotations

import torch

from qfine.fast.ops import fused, step_dtype, upcast

IGNORE = -100
_CHUNK_ELEMENTS = 1 << 27  # logits elements per chunk: 256 MiB in bf16


@fused
def _ce_chunk(logits: torch.Tensor, labels: torch.Tensor):
    """(sum of -log p[label], d/d logits) for logits (c, V) and labels (c,); rows labelled -100 add
    nothing and get a zero gradient."""
    lf = upcast(logits)
    valid = labels != IGNORE
    safe = torch.where(valid, labels, 0)
    lse = torch.logsumexp(lf, dim=-1, keepdim=True)
    target = torch.gather(lf, 1, safe.unsqueeze(1))
    keep = valid.unsqueeze(1).to(lf.dtype)
    loss = ((lse - target) * keep).sum()
    onehot = torch.arange(lf.shape[1], device=lf.device).unsqueeze(0) == safe.unsqueeze(1)
    grad = (torch.exp(lf - lse) - onehot.to(lf.dtype)) * keep
    return loss, grad.to(logits.dtype)


class LinearCrossEntropy(torch.autograd.Function):
    """Σ CE(h W_headᵀ, labels) / divisor over the rows of h (T, d) whose label is not -100.

    Runs over every row in fixed chunks (ignored rows masked inside the kernel) rather than
    gathering the labelled rows first: picking those rows needs their count on the host, a
    device→host synchronisation that stalls the launch queue once per step. The price is head
    FLOPs for prompt rows (the head is ~5% of a step's FLOPs for Llama-3-8B). ``divisor`` is a
    0-dim tensor on h's device for the same reason.
    """

    @staticmethod
    def forward(ctx, h, weight, labels, divisor: torch.Tensor, chunk: int):
        dh = torch.empty_like(h)
        total = torch.zeros((), dtype=upcast(h[:0]).dtype, device=h.device)
        w = weight if weight.dtype == h.dtype else weight.to(h.dtype)
        for start in range(0, h.shape[0], chunk):
            rows = slice(start, start + chunk)
            logits = h[rows] @ w.t()
            loss, grad = _ce_chunk(logits, labels[rows])
            del logits
            total += loss
            torch.mm(grad, w, out=dh[rows])
            del grad
        dh.div_(divisor)  # a 0-dim fp32 tensor: no promotion of the bf16 dh
        ctx.save_for_backward(dh)
        return total / divisor

    @staticmethod
    def backward(ctx, dloss):
        (dh,) = ctx.saved_tensors
        return dh * dloss.to(dh.dtype), None, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor | None = None,
                         num_items_in_batch=None, shift_labels: torch.Tensor | None = None) -> torch.Tensor:
    """Mean next-token cross-entropy of hidden (b, s, d) through a frozen head weight (V, d).

    Labels follow transformers: ``labels`` (b, s) are shifted here (position t predicts labels[t+1]);
    ``shift_labels`` are taken as already shifted. The divisor is ``num_items_in_batch`` when given
    (gradient accumulation), else the number of loss-bearing tokens.
    """
    if shift_labels is None:
        shift_labels = torch.nn.functional.pad(labels, (0, 1), value=IGNORE)[..., 1:]
    flat = shift_labels.reshape(-1).to(hidden.device)
    if num_items_in_batch is None:
        divisor = (flat != IGNORE).sum().clamp_min(1)
    else:
        # clamped like TRL's loss: a group with no loss-bearing token gives a zero loss, not 0/0
        divisor = torch.as_tensor(num_items_in_batch, device=hidden.device).clamp_min(1)
    dtype = step_dtype(hidden)
    divisor = divisor.to(upcast(hidden[:0].to(dtype)).dtype)
    chunk = max(1, _CHUNK_ELEMENTS // weight.shape[0])
    h = hidden.reshape(-1, hidden.shape[-1])
    if dtype == hidden.dtype:
        return LinearCrossEntropy.apply(h, weight, flat, divisor, chunk)
    # an fp32 model under mixed precision: the head GEMMs in the autocast dtype, as autocast runs lm_head
    with torch.autocast(hidden.device.type, enabled=False):
        return LinearCrossEntropy.apply(h.to(dtype), weight.to(dtype), flat, divisor, chunk)


@fused
def _logp_chunk(logits: torch.Tensor, labels: torch.Tensor):
    """(log p[label] per row (c,), d/d logits of Σ log p) for logits (c, V) and labels (c,); rows
    labelled -100 give 0 and a zero gradient."""
    lf = upcast(logits)
    valid = labels != IGNORE
    safe = torch.where(valid, labels, 0)
    lse = torch.logsumexp(lf, dim=-1, keepdim=True)
    keep = valid.unsqueeze(1).to(lf.dtype)
    logp = (torch.gather(lf, 1, safe.unsqueeze(1)) - lse) * keep
    onehot = torch.arange(lf.shape[1], device=lf.device).unsqueeze(0) == safe.unsqueeze(1)
    grad = (onehot.to(lf.dtype) - torch.exp(lf - lse)) * keep
    return logp.squeeze(1), grad.to(logits.dtype)


class LinearTokenLogprobs(torch.autograd.Function):
    """log p(label_t | h_t) for every row t of h (T, d) through a frozen head weight (V, d), in row
    chunks; rows labelled -100 give 0. The forward keeps d log p_t / d h_t (T, d) instead of any
    logits, so the backward is that tensor times the incoming gradient of each row."""

    @staticmethod
    def forward(ctx, h, weight, labels, chunk: int):
        dh = torch.empty_like(h)
        out = torch.empty(h.shape[0], dtype=upcast(h[:0]).dtype, device=h.device)
        w = weight if weight.dtype == h.dtype else weight.to(h.dtype)
        for start in range(0, h.shape[0], chunk):
            rows = slice(start, start + chunk)
            logits = h[rows] @ w.t()
            out[rows], grad = _logp_chunk(logits, labels[rows])
            del logits
            torch.mm(grad, w, out=dh[rows])
            del grad
        ctx.save_for_backward(dh)
        return out

    @staticmethod
    def backward(ctx, dout):
        (dh,) = ctx.saved_tensors
        return dh * dout.to(dh.dtype).unsqueeze(1), None, None, None


def linear_token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token log-probabilities (b, s) fp32 of a causal LM's next tokens from hidden (b, s, d) and a
    frozen head weight (V, d): position t scores labels[t+1] (shifted here, as transformers does); 0
    where the label is -100 and at the last position. No (b, s, V) logits are ever held."""
    shifted = torch.nn.functional.pad(labels, (0, 1), value=IGNORE)[..., 1:]
    flat = shifted.reshape(-1).to(hidden.device)
    dtype = step_dtype(hidden)
    chunk = max(1, _CHUNK_ELEMENTS // weight.shape[0])
    h = hidden.reshape(-1, hidden.shape[-1])
    if dtype == hidden.dtype:
        out = LinearTokenLogprobs.apply(h, weight, flat, chunk)
    else:  # an fp32 model under mixed precision: the head GEMMs in the autocast dtype, as autocast runs lm_head
        with torch.autocast(hidden.device.type, enabled=False):
            out = LinearTokenLogprobs.apply(h.to(dtype), weight.to(dtype), flat, chunk)
    return out.view(labels.shape)
