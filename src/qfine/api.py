"""Conveniences of the public Python API that span several layers (:mod:`qfine` lists them all)."""

from __future__ import annotations

import torch

from qfine import config as C
from qfine.memory import disk
from qfine.memory.estimate import host_available
from qfine.memory.fit import gpu_budget
from qfine.memory.plan import parse_gib, render, trainable_params
from qfine.models.sources import model_config
from qfine.util.errors import QfineError


def plan(cfg: C.RunConfig, gpu_memory: str | None = None, host_memory: str | None = None,
         reference_layers: bool = False) -> str:
    """``qfine plan``'s table for ``cfg`` as text: the predicted peak of one training step for each
    micro-batch and checkpointing mode, and the fastest setting that fits.

    ``gpu_memory``: the GPU to plan for ("24GiB"; default: the visible GPU's budget, as ``qfine train``
    measures it). ``host_memory``: the host size pinned buffers may use (default: this machine's
    available memory when planning for its own GPU, unchecked for another machine's). ``reference_layers``:
    plan for peft's reference layers instead of the fused ones."""
    if gpu_memory:
        budget = parse_gib(gpu_memory, "--gpu-memory")
    elif torch.cuda.is_available():
        budget = gpu_budget()
    else:
        raise QfineError("no GPU visible: pass --gpu-memory (e.g. 24GiB) to plan for one")
    fused = not reference_layers and cfg.lora.variant == "lora" and cfg.lora.method == "lora"
    # this machine's host memory is the default only where the GPU's is this machine's too: planning for
    # another machine's GPU checks the host only when told its size
    host = (parse_gib(host_memory, "--host-memory") if host_memory
            else None if gpu_memory else host_available())
    config = model_config(cfg.model.source)
    lines = render(cfg.model.source, config, cfg, budget, fused, host).split("\n")
    lines.insert(len(lines) - 1, disk.check(cfg, trainable_params(config, cfg)))  # the verdict stays last
    return "\n".join(lines)
