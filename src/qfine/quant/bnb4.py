"""bitsandbytes 4-bit (NF4 or FP4, optionally double-quantized): ``bnb.nn.Linear4bit``.

NF4 follows the QLoRA paper: blocks of 64 weights, one absmax each; with double quantization the
absmax constants are stored in 8 bits in blocks of 256. bitsandbytes 0.50 on CPUs with AVX512-BF16
rearranges a ``Linear4bit`` weight in place on its first no-grad forward, after which dequantization
reads the wrong layout: :func:`guard_cpu_repack` turns that off on every layer qfine loads, and
:func:`ensure_not_repacked` refuses a layer it reached anyway.
"""

from __future__ import annotations

import bitsandbytes as bnb
import torch

from qfine.quant.registry import BaseWeight, Settings, dense_tensors
from qfine.util.errors import QfineError


def bytes_per_weight(double_quant: bool = True) -> float:
    """½ byte per weight + its share of the absmax: one per 64 weights, fp32, or with double quant an
    8-bit absmax plus one fp32 constant per 256 of them."""
    return 0.5 + ((1 + 4 / 256) if double_quant else 4) / 64


def guard_cpu_repack(model: torch.nn.Module) -> int:
    """Stop bitsandbytes from repacking 4-bit weights in place on AVX512-BF16 CPUs (module docstring).
    Returns the number of modules guarded."""
    n = 0
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
            n += 1
    return n


def ensure_not_repacked(weight) -> None:
    """Raise if bitsandbytes' AVX512-BF16 CPU path has repacked this 4-bit weight in place: its
    dequantization (merges, the fused layers) would then be silently wrong."""
    if getattr(getattr(weight, "quant_state", None), "packing_format_for_cpu", False):
        raise QfineError("this 4-bit layer was repacked by bitsandbytes' AVX512-BF16 CPU path; "
                         "load models with qfine.load_model (it disables the repacking)")


def dequantize(linear: torch.nn.Module) -> torch.Tensor:
    w = linear.weight
    ensure_not_repacked(w)
    return bnb.functional.dequantize_4bit(w.data, w.quant_state).float()


def streamed(linear: torch.nn.Module) -> list[tuple[object, str, torch.Tensor]]:
    """The packed codes, the absmax and any other frozen parameter (a bias); the code book, offset and
    nested state are small and stay on the device."""
    w = linear.weight
    return [*dense_tensors(linear), (w.quant_state, "absmax", w.quant_state.absmax)]


def stored_bytes(out: int, inp: int, s: Settings) -> float:
    return out * inp * bytes_per_weight(s.double_quant)


def host_tensors(out: int, inp: int, s: Settings) -> tuple[int, ...]:
    """The packed codes (½ byte per weight) and the absmax (one per 64 weights: 1 byte double-quantized, else 4)."""
    return out * inp // 2, out * inp // 64 * (1 if s.double_quant else 4)


KIND = BaseWeight(name="4-bit", config_names=("nf4", "fp4", "adaptive"),
                  matches=lambda m: isinstance(m, bnb.nn.Linear4bit), dequantize=dequantize,
                  stored_bytes=stored_bytes, host_tensors=host_tensors, streamed=streamed, fused=True)
