"""The GPU fast path: fused QLoRA layers swapped into a loaded model instance.

``apply_fast_path(model)`` replaces each Llama-family decoder layer instance with one whose training
step runs hand-written LoRA autograd (:mod:`.lora`) with fused elementwise kernels (:mod:`.ops`) and a
chunked cross-entropy (:mod:`.loss`); NF4 weights are dequantized by one Triton kernel
(:mod:`.nf4_kernel`) and checkpointed layers recompute through :mod:`.offload` (inputs optionally in
pinned host memory: ``offload_checkpoints(model)``); ``keep_dequantized(model, gib, dtype)`` keeps some layers'
weights dequantized within a memory budget (:mod:`.resident`). :class:`.graphs.GraphedStep` replays a whole
forward + backward as one CUDA graph per batch shape. Every fused piece is tested against the plain peft/transformers
path it replaces (``tests/test_fast_path.py`` on CPU in fp32, ``tests/test_gpu.py`` in bf16).
"""

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from qfine.fast.swap import FastPathReport

# what the package offers, from the module that defines it: imported on first use, so that importing one
# kernel module (qfine.fast.tune_cache, .gemv_kernel, ...) does not import transformers and bitsandbytes
_WHERE = {"GraphedStep": "graphs", "install_checkpointing": "offload", "keep_dequantized": "resident",
          "release_dequantized": "resident", "FastDecoderLayer": "swap", "FastPathReport": "swap",
          "apply_fast_path": "swap", "causal_lm": "swap", "unsupported_reason": "swap"}


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"qfine.fast.{_WHERE[name]}"), name)
    globals()[name] = value
    return value


def enable_fast_path(model, device: str) -> "FastPathReport":
    """:func:`apply_fast_path` on CUDA; on other devices a :class:`FastPathReport` saying why it stays off."""
    from qfine.fast.swap import FastPathReport, apply_fast_path

    if device != "cuda":
        return FastPathReport(reason=f"the fused kernels are for CUDA, this run is on {device}")
    return apply_fast_path(model)


def offload_checkpoints(model) -> int:
    """Keep the checkpointed decoder-layer inputs of ``model`` (peft or plain causal LM, gradient
    checkpointing already enabled) in pinned host memory; returns the number of layers doing so."""
    import torch

    from qfine.fast.offload import install_checkpointing
    from qfine.fast.swap import causal_lm

    layers = getattr(getattr(causal_lm(model), "model", None), "layers", None)
    return install_checkpointing(layers, offload=True) if isinstance(layers, torch.nn.ModuleList) else 0


__all__ = ["FastDecoderLayer", "FastPathReport", "GraphedStep", "apply_fast_path", "enable_fast_path",
           "keep_dequantized", "offload_checkpoints", "release_dequantized", "unsupported_reason"]
