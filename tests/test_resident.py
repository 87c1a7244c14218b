"""Resident (kept dequantized) weights for the fused layers, on CPU in fp32.

Keeping a layer's weights dequantized must change no number: the fused layers get the same weights
from the kept buffers as from a fresh dequantize, and the LoRA columns folded into a kept buffer are
rewritten from the current B at every call (so an optimizer step is seen). The budget decides how
many layers are kept, first layer first.
"""

from __future__ import annotations

import pytest
import torch

from helpers import TINY_VOCAB as VOCAB
from helpers import lora_model
from qfine.fast import apply_fast_path, keep_dequantized, release_dequantized
from qfine.fast.lora import weight_groups
from qfine.fast.nf4 import stacked
from qfine.fast.swap import causal_lm

GiB = 2**30


def _loss_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _layer_bytes(layer, dtype) -> int:
    """What a layer's kept buffers should hold: every stacked or folded group, and a lone weight only
    when it is not already a tensor in ``dtype`` (4-bit)."""
    total = 0
    for linears, extra in weight_groups(layer.projections()):
        if len(linears) == 1 and not extra and getattr(linears[0].weight, "quant_state", None) is None:
            continue
        total += sum(lin.out_features for lin in linears) * (linears[0].in_features + extra) * 4
    return total


@pytest.mark.parametrize("quantization,targets", [
    ("nf4", None),
    ("none", ["q_proj", "v_proj", "up_proj"]),  # 16-bit base, adapters on some projections: partial folds
])
def test_kept_weights_change_no_number_and_follow_the_adapters(tmp_path, save_tiny, quantization, targets):
    model = lora_model(save_tiny(tmp_path / "llama", "llama"), quantization, targets=targets)
    assert apply_fast_path(model).layers == 2
    layers = causal_lm(model).model.layers
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(3))
    fresh_loss, fresh_grads = _loss_and_grads(model, ids)

    # a budget of one and a half layers keeps exactly the first layer
    one = _layer_bytes(layers[0], torch.float32)
    assert one > 0
    n, gib = keep_dequantized(model, 1.5 * one / GiB, torch.float32)
    assert (n, round(gib * GiB)) == (1, one)
    for linears, extra in weight_groups(layers[0].projections()):
        w = stacked(linears, torch.float32, extra)
        assert stacked(linears, torch.float32, extra) is w  # the kept buffer (or a 16-bit weight itself), every call
    qkv1, extra1 = weight_groups(layers[1].projections())[0]
    assert stacked(qkv1, torch.float32, extra1) is not stacked(qkv1, torch.float32, extra1)  # layer 1: fresh

    kept_loss, kept_grads = _loss_and_grads(model, ids)
    torch.testing.assert_close(kept_loss, fresh_loss, rtol=1e-6, atol=0)
    for name, g in fresh_grads.items():
        torch.testing.assert_close(kept_grads[name], g, rtol=1e-5, atol=1e-7, msg=name)

    # a changed adapter (an optimizer step) is seen through the kept buffers' folded columns
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.mul_(-2.0)
    kept_loss2, kept_grads2 = _loss_and_grads(model, ids)
    assert (kept_loss2 - kept_loss).abs() > 1e-3
    release_dequantized(model)
    qkv0, extra0 = weight_groups(layers[0].projections())[0]
    assert stacked(qkv0, torch.float32, extra0) is not stacked(qkv0, torch.float32, extra0)
    fresh_loss2, fresh_grads2 = _loss_and_grads(model, ids)
    torch.testing.assert_close(kept_loss2, fresh_loss2, rtol=1e-6, atol=0)
    for name, g in fresh_grads2.items():
        torch.testing.assert_close(kept_grads2[name], g, rtol=1e-5, atol=1e-7, msg=name)


def test_budget_too_small_for_a_layer_keeps_nothing(tmp_path, save_tiny):
    model = lora_model(save_tiny(tmp_path / "llama", "llama"), "nf4")
    apply_fast_path(model)
    one = _layer_bytes(causal_lm(model).model.layers[0], torch.float32)
    assert keep_dequantized(model, 0.9 * one / GiB, torch.float32) == (0, 0.0)
    n, gib = keep_dequantized(model, 10 * one / GiB, torch.float32)
    assert (n, round(gib * GiB)) == (2, 2 * one)
