"""Loading: quantization variants, sources (folder, .gguf, default), the CPU guard."""

from __future__ import annotations

import bitsandbytes as bnb
import pytest
import torch
from transformers import AutoModelForCausalLM

from qfine import load_model
from qfine.errors import QfineError
from qfine.loading import bundled_gguf_path, count_parameters, describe, resolve_source
from qfine.merge import dequantize_weight, relative_difference

IDS = torch.tensor([[1, 17, 42, 99, 1234, 5, 77, 300]])


@pytest.fixture(scope="module")
def reference(tiny_dir):
    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)(IDS).logits


def test_quantization_variants_error_ordering(tiny_dir, reference):
    errors, kinds = {}, {}
    for q in ("none", "int8", "nf4", "fp4"):
        loaded = load_model(str(tiny_dir), quantization=q, compute_dtype="fp32")
        kinds[q] = type(loaded.model.model.layers[0].mlp.up_proj)
        with torch.no_grad():
            errors[q] = relative_difference(loaded.model(IDS.to(loaded.model.device)).logits, reference)
    assert kinds == {"none": torch.nn.Linear, "int8": bnb.nn.Linear8bitLt, "nf4": bnb.nn.Linear4bit,
                     "fp4": bnb.nn.Linear4bit}
    assert errors["none"] < 1e-6
    # 8-bit is far closer than 4-bit, and NF4 beats FP4 on normally distributed weights (QLoRA, Table 2)
    assert errors["int8"] < errors["nf4"] < errors["fp4"], errors


def test_nf4_double_quant_dequantizes_close_to_original(tiny_dir):
    from safetensors import safe_open

    loaded = load_model(str(tiny_dir), quantization="nf4", double_quant=True)
    layer = loaded.model.model.layers[1].mlp.gate_proj
    assert layer.weight.quant_state.nested  # double quantization: the absmax is itself quantized
    with safe_open(tiny_dir / "model.safetensors", "pt") as f:
        w = f.get_tensor("model.layers.1.mlp.gate_proj.weight").float()
    err = relative_difference(dequantize_weight(layer).cpu(), w)
    assert 0.01 < err < 0.15  # NF4's expected ~10% relative error on Gaussian weights, not zero, not garbage


def test_int8_dequantize(tiny_dir):
    from safetensors import safe_open

    loaded = load_model(str(tiny_dir), quantization="int8")
    with safe_open(tiny_dir / "model.safetensors", "pt") as f:
        w = f.get_tensor("model.layers.0.self_attn.o_proj.weight").float()
    assert relative_difference(dequantize_weight(loaded.model.model.layers[0].self_attn.o_proj).cpu(), w) < 0.01


def test_parameter_count_and_description(tiny_dir):
    loaded = load_model(str(tiny_dir))
    trainable, total = count_parameters(loaded.model)
    assert trainable == 0  # nothing trainable before LoRA; requires_grad is off on 4-bit weights
    assert total == sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(tiny_dir).parameters())
    assert "memory footprint" in describe(loaded.model)


def test_gguf_file_and_default_share_one_cached_folder(bundled_dir):
    assert resolve_source(str(bundled_gguf_path())) == str(bundled_dir)
    assert resolve_source("default") == str(bundled_dir)
    assert (bundled_dir / "config.json").is_file() and (bundled_dir / "model.safetensors").is_file()


@pytest.mark.parametrize("bad, message", [("./not/here", "model path does not exist"),
                                          ("model.gguf", "model path does not exist")])
def test_bad_sources(bad, message):
    with pytest.raises(QfineError, match=message):
        resolve_source(bad)


def test_not_a_model_folder(tmp_path):
    with pytest.raises(QfineError, match="no config.json"):
        resolve_source(str(tmp_path))
