"""Write a model folder already quantized to NF4 (bitsandbytes' serialized 4-bit format, the folder
transformers writes for a saved 4-bit model), one tensor at a time.

A Llama-3.1-70B shape is 141 GB in bf16 and the GPU machine has 64 GiB of disk: here each weight is
made (random init on the GPU), quantized and written into the current shard before the next one
exists, so the peak is one shard (``shard_bytes``) plus one bf16 weight, and the folder is ≈ 39 GB.
``qfine train --model DIR`` loads it as it is (config.json carries the quantization_config).

    from prequantized import write_nf4_folder, random_tensor
    write_nf4_folder(config, "/tmp/m_70b", random_tensor(seed=0, device="cuda"))

NF4 with double quantization, blocksize 64, uint8 storage: bitsandbytes' defaults, which
``BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)``
uses when it quantizes while loading (``tests/test_prequantized.py`` checks the two give the same
bytes). The output embedding stays 16-bit, as transformers keeps it.
"""

from __future__ import annotations

import copy
import json
import os
import zlib
from pathlib import Path
from typing import Callable

import torch

QUANT_CONFIG = {"quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False,
                "_load_in_4bit": True, "_load_in_8bit": False, "bnb_4bit_quant_type": "nf4",
                "bnb_4bit_use_double_quant": True, "bnb_4bit_compute_dtype": "bfloat16",
                "bnb_4bit_quant_storage": "uint8", "llm_int8_enable_fp32_cpu_offload": False,
                "llm_int8_has_fp16_weight": False, "llm_int8_skip_modules": None, "llm_int8_threshold": 6.0}


def random_tensor(seed: int = 0, device: str = "cuda", std: float = 0.02) -> Callable[[str, tuple], torch.Tensor]:
    """make(name, shape) → bf16 tensor: norms (1-d ``…norm.weight``) ones, everything else N(0, std²),
    each from its own generator seeded by (seed, name), so a tensor does not depend on the others."""

    def make(name: str, shape: tuple) -> torch.Tensor:
        if name.endswith("norm.weight"):
            return torch.ones(shape, dtype=torch.bfloat16, device=device)
        g = torch.Generator(device=device).manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        return torch.empty(shape, dtype=torch.bfloat16, device=device).normal_(0.0, std, generator=g)

    return make


def nf4_entries(name: str, weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """The state-dict entries of a bitsandbytes Linear4bit whose weight is ``weight`` (out, in):
    ``name`` (packed uint8 codes, (out·in/2, 1)) and ``name.absmax``, ``.quant_map``, ``.nested_absmax``,
    ``.nested_quant_map``, ``.quant_state.bitsandbytes__nf4``, all on the CPU."""
    import bitsandbytes.functional as F

    packed, state = F.quantize_4bit(weight.contiguous(), blocksize=64, compress_statistics=True, quant_type="nf4",
                                    quant_storage=torch.uint8)
    out = {name: packed.cpu()}
    for key, value in state.as_dict(packed=True).items():
        out[f"{name}.{key}"] = value.cpu()
    return out


def write_nf4_folder(config, out: str | os.PathLike, make: Callable[[str, tuple], torch.Tensor],
                     shard_bytes: float = 4e9) -> dict:
    """Write ``config``'s causal LM to ``out`` with every linear but the output embedding in NF4:
    shards ``model-0000i-of-0000n.safetensors``, their index and config.json. ``make(name, shape)``
    gives each tensor in bf16 (any device). Returns {"params": n, "bytes": total written}. ``config``
    itself is left as it is (a copy takes the quantization_config)."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    head = skeleton.get_output_embeddings()
    quantized = {f"{n}.weight" for n, m in skeleton.named_modules()
                 if isinstance(m, torch.nn.Linear) and m is not head}
    shapes = {n: tuple(p.shape) for n, p in skeleton.state_dict().items()}
    if config.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)  # written once, as the input embedding
    shards, current, size, params = [], {}, 0, 0

    def flush():
        nonlocal current, size
        if current:
            tmp = out / f"shard-{len(shards) + 1}.tmp"
            save_file(current, str(tmp), metadata={"format": "pt"})
            shards.append((tmp, list(current)))
            current, size = {}, 0

    for name, shape in shapes.items():
        w = make(name, shape)
        params += w.numel()
        entries = nf4_entries(name, w) if name in quantized else {name: w.cpu()}
        del w
        current.update(entries)
        size += sum(t.numel() * t.element_size() for t in entries.values())
        if size >= shard_bytes:
            flush()
    flush()
    weight_map, total = {}, 0
    for i, (tmp, names) in enumerate(shards, 1):
        final = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        tmp.rename(out / final)
        total += (out / final).stat().st_size
        weight_map.update({n: final for n in names})
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2), encoding="utf-8")
    config = copy.deepcopy(config)
    config.quantization_config = dict(QUANT_CONFIG)
    config.save_pretrained(out)
    return {"params": params, "bytes": total}
