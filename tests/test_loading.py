"""Loading: quantization variants, sources (folder, .gguf, default), the CPU guard."""

from __future__ import annotations

import bitsandbytes as bnb
import pytest
import torch
from transformers import AutoModelForCausalLM

from qfine import load_model
from qfine.models.loading import count_parameters, describe
from qfine.models.sources import bundled_gguf_path, resolve_source
from qfine.quant import KINDS
from qfine.util.compare import relative_difference
from qfine.util.errors import QfineError

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
    err = relative_difference(KINDS.dequantize(layer).cpu(), w)
    assert 0.01 < err < 0.15  # NF4's expected ~10% relative error on Gaussian weights, not zero, not garbage


def test_int8_dequantize(tiny_dir):
    from safetensors import safe_open

    loaded = load_model(str(tiny_dir), quantization="int8")
    with safe_open(tiny_dir / "model.safetensors", "pt") as f:
        w = f.get_tensor("model.layers.0.self_attn.o_proj.weight").float()
    assert relative_difference(KINDS.dequantize(loaded.model.model.layers[0].self_attn.o_proj).cpu(), w) < 0.01


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


def test_a_mistyped_local_path_is_named_at_once_with_the_nearest_entry(tmp_path, monkeypatch):
    """`runs/typo` looks like a hub id (owner/name), but its first folder is here: it is a local path,
    and the hub is never asked (asking it offline retried for 53 s)."""
    import time

    import qfine.models.sources as sources

    (tmp_path / "runs" / "demo-1").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sources, "_hub_unreachable", lambda: pytest.fail("the hub was asked about a local path"))
    t0 = time.perf_counter()
    with pytest.raises(QfineError, match=r"model path does not exist: runs/demo-2 \(did you mean runs/demo-1\?\)"):
        resolve_source("runs/demo-2")
    assert time.perf_counter() - t0 < 1.0


def test_an_uncached_hub_id_fails_at_once_when_the_hub_cannot_be_reached(monkeypatch, tmp_path):
    import qfine.models.sources as sources

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(sources, "_hub_unreachable", lambda: OSError("[Errno -2] Name or service not known"))
    with pytest.raises(QfineError, match=r"Hugging Face Hub cannot be reached \(\[Errno -2\] Name or service not known\)"):
        resolve_source("someone/some-model-that-is-not-cached")


@pytest.mark.parametrize("tensors, want", [
    ({"w": ("F16", 0.5), "norm": ("F32", 1.25)}, "fp16"),  # 1.25 is an fp16 value: the file is exact in fp16
    ({"w": ("F16", 0.5), "norm": ("F32", 1 + 2**-20)}, "fp32"),  # an f32 norm fp16 would round
    ({"w": ("BF16", 0.5), "norm": ("F32", 3.0)}, "bf16"),
    ({"w": ("Q8_0", 0.5), "norm": ("F32", 1.0)}, "fp32"),  # block values: scale x code needs fp32
])
def test_a_gguf_is_converted_in_the_dtype_that_holds_its_values_exactly(tmp_path, tensors, want):
    import numpy as np
    from gguf import GGMLQuantizationType, GGUFWriter
    from gguf.quants import quantize

    from qfine.models.sources import gguf_dtype

    path = tmp_path / "m.gguf"
    w = GGUFWriter(str(path), "llama")
    for name, (kind, value) in tensors.items():
        x = np.full((4, 32), value, dtype=np.float32)
        if kind == "F32":
            w.add_tensor(name, x)
        elif kind == "F16":
            w.add_tensor(name, x.astype(np.float16))
        else:
            q = GGMLQuantizationType[kind]
            w.add_tensor(name, quantize(x, q), raw_dtype=q)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert gguf_dtype(path) == want
