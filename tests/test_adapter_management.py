"""Several named adapters on one 4-bit base: switch, combine, merge/unmerge, unload, delete."""

from __future__ import annotations

import pytest
import torch

from qfine import LoraSettings, add_lora, load_model
from qfine.methods.lora import (
    add_adapter,
    combine_adapters,
    delete_adapter,
    merge_adapter,
    set_active,
    unload,
    unmerge_adapter,
)
from qfine.util.compare import relative_difference
from qfine.util.errors import QfineError

IDS = torch.tensor([[1, 17, 42, 99, 1234, 5, 77, 300]])
SETTINGS = LoraSettings(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"])


def _randomize(model, name, seed):
    g = torch.Generator().manual_seed(seed)
    for pname, p in model.named_parameters():
        if f"lora_B.{name}." in pname:
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


@pytest.fixture
def two(tiny_dir):
    """A PeftModel with adapters one and two (random B), and the base model's logits."""
    # fp32 compute everywhere (also on a GPU), so that the identities below hold to fp32 rounding
    model = add_lora(load_model(str(tiny_dir), compute_dtype="fp32").model, SETTINGS, adapter_name="one")
    add_adapter(model, "two", SETTINGS)
    _randomize(model, "one", 1)
    _randomize(model, "two", 2)
    model.eval()
    with torch.no_grad(), model.disable_adapter():
        base = model(IDS.to(model.device)).logits
    return model, base


def _logits(model):
    with torch.no_grad():
        return model(IDS.to(model.device)).logits


def test_switching_adapters(two):
    model, base = two
    set_active(model, "one")
    la = _logits(model)
    set_active(model, "two")
    lb = _logits(model)
    assert relative_difference(la, base) > 1e-3 and relative_difference(lb, la) > 1e-3
    set_active(model, "one")
    assert torch.equal(_logits(model), la)
    with pytest.raises(QfineError, match="no adapter named three"):
        set_active(model, "three")


def test_linear_weights_one_zero_is_first_adapter(two):
    model, _ = two
    set_active(model, "one")
    la = _logits(model)
    combine_adapters(model, ["one", "two"], [1.0, 0.0], "mix", combination="linear")
    set_active(model, "mix")
    assert relative_difference(_logits(model), la) < 1e-5


def test_cat_is_sum_of_updates(two):
    model, _ = two
    set_active(model, ["one", "two"])  # both active: the two updates add up
    both = _logits(model)
    combine_adapters(model, ["one", "two"], [1.0, 1.0], "cat2", combination="cat")
    set_active(model, "cat2")
    assert relative_difference(_logits(model), both) < 1e-5


def test_svd_full_rank_is_sum(two):
    model, _ = two
    set_active(model, ["one", "two"])
    both = _logits(model)
    combine_adapters(model, ["one", "two"], [1.0, 1.0], "svd8", combination="svd", svd_rank=8)
    set_active(model, "svd8")
    assert relative_difference(_logits(model), both) < 1e-4
    combine_adapters(model, ["one", "two"], [1.0, 1.0], "svd1", combination="svd", svd_rank=1)
    set_active(model, "svd1")
    assert relative_difference(_logits(model), both) > 1e-4  # a rank-1 truncation is an approximation


def test_merge_into_16bit_copy_and_unmerge(two):
    import bitsandbytes as bnb

    model, base = two
    set_active(model, "one")
    la = _logits(model)
    record = merge_adapter(model)
    assert len(record) == 2 * 3
    with pytest.raises(QfineError, match="no LoRA layer to merge"):  # merging twice is refused
        merge_adapter(model)
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    assert type(q) is torch.nn.Linear and q.weight.dtype == torch.float32  # a copy, not a requantized Linear4bit
    assert relative_difference(_logits(model), la) < 1e-5
    assert unmerge_adapter(model, record) == 6
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(q.base_layer, bnb.nn.Linear4bit)
    assert torch.equal(_logits(model), la)


def test_unload_and_delete(two):
    model, base = two
    delete_adapter(model, "two")
    assert list(model.peft_config) == ["one"]
    with pytest.raises(QfineError):
        delete_adapter(model, "two")
    plain = unload(model)
    assert not any("lora" in n for n, _ in plain.named_modules())
    with torch.no_grad():
        assert torch.equal(plain(IDS.to(plain.device)).logits, base)
