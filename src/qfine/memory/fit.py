"""The fit policy: which memory settings a training run takes, from the one model of memory
(:mod:`.estimate`, :mod:`.plan`) and the one GPU budget that ``qfine plan`` and ``qfine train`` share.

Everything here is computed from a model's config (or its measured weight bytes) and numbers: the
training recipe (:mod:`qfine.training.decide`, :mod:`qfine.training.run`) applies what it returns.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qfine.config import RunConfig
from qfine.memory import estimate as memory
from qfine.memory import plan


def gpu_budget() -> int:
    """Bytes this process may use on its GPU: free + what it has allocated already (the loaded weights
    are part of every estimate), under a per-process cap if one is set
    (``torch.cuda.set_per_process_memory_fraction``). ``qfine plan`` and ``qfine train`` both use it."""
    free, total = torch.cuda.mem_get_info()
    budget = free + torch.cuda.memory_allocated()
    fraction = getattr(torch.cuda, "get_per_process_memory_fraction", None)
    if fraction is not None:
        budget = min(budget, int(fraction() * total))
    return budget


def _size(n: int, scale: int) -> str:
    return f"{n / memory.GIB:.1f} GiB" if scale >= memory.GIB else f"{n / 2**20:.1f} MiB"


def host_shortfall(need: int, what: str) -> str | None:
    """A sentence when ``need`` bytes of pinned host memory are more than this host has available now
    (pinned memory cannot be swapped out: the allocation would fail mid-run); None when they fit or the
    host's memory cannot be read."""
    have = memory.host_available()
    if have is None or need <= have:
        return None
    scale = max(need, have)
    return f"the {what} need {_size(need, scale)} of pinned host memory and this machine has {_size(have, scale)} available"


@dataclass(frozen=True)
class StreamChoice:
    """Whether the frozen decoder-layer weights stream from host memory, how many of the last layers keep
    theirs on the GPU, and the line that says why (None: nothing to say)."""

    stream: bool = False
    keep_last: int = 0
    line: str | None = None


def streamed_host_bytes(config, cfg: RunConfig) -> int:
    """Pinned host bytes of every decoder layer's streamed weights."""
    layers = memory.Shapes.from_config(config).layers
    return layers * plan.host_layer_bytes(config, cfg.model.quantization, cfg.model.double_quant)


def auto_streaming(config, cfg: RunConfig, budget: int) -> StreamChoice:
    """``train.stream_weights: auto``: stream only when the all-resident estimate does not fit ``budget``
    and the streamed one does; keep as many of the last layers on the GPU as fit beside it (fewer copies
    per step), one layer of margin, never all of them."""
    t = cfg.train
    shapes = memory.Shapes.from_config(config)
    weights = plan.weight_bytes(config, cfg.model.quantization, cfg.model.double_quant, cfg.model.group_size)
    params = plan.trainable_params(config, cfg)
    tokens = t.batch_size * cfg.data.max_seq_len
    dropout = cfg.lora.dropout > 0
    mode, est = memory.fitting_mode(shapes, tokens, budget, weights, params, t.optimizer, True, dropout=dropout)
    if mode is not None:
        return StreamChoice()
    per_layer = plan.layer_bytes(config, cfg.model.quantization, cfg.model.double_quant, cfg.model.group_size)
    streamed = {m: memory.estimate(shapes, tokens, m, weights, params, t.optimizer, True, dropout=dropout,
                                   layer_bytes=per_layer) for m in ("checkpoint", "offload")}
    mode = "offload" if t.offload_checkpoints else "checkpoint"
    if streamed[mode].total > memory.FILL * budget:
        mode = "offload"  # auto_memory turns it on after loading, by the same estimate
    if streamed[mode].total > memory.FILL * budget:
        return StreamChoice()  # streaming would not fit either: the load-time estimate says so
    spare = int((memory.FILL * budget - streamed[mode].total) // per_layer) - 1
    keep = max(0, min(spare, shapes.layers - memory.STREAM_WINDOW))
    host = (shapes.layers - keep) * plan.host_layer_bytes(config, cfg.model.quantization, cfg.model.double_quant)
    if (short := host_shortfall(host, "streamed weights")) is not None:
        return StreamChoice(line=f"weight streaming off: {short}")
    return StreamChoice(True, keep, (
        f"weight streaming on: {est['offload'].total / memory.GIB:.1f} GiB with every weight on the GPU is more "
        f"than {memory.FILL:.0%} of the {budget / memory.GIB:.1f} GiB free; streamed: {streamed[mode].line()}; "
        f"the last {keep} of {shapes.layers} layers keep their weights on the GPU (train.stream_weights: off keeps "
        "them all there)"))


@dataclass(frozen=True)
class CheckpointChoice:
    """The checkpoint mode a loaded model trains in (``none``, ``checkpoint`` or ``offload``) and the
    line that says what the estimate found."""

    mode: str
    line: str


def checkpoint_mode(shapes: memory.Shapes, cfg: RunConfig, current: str, weights: int, trainable: int,
                    fused: bool, budget: int) -> CheckpointChoice:
    """``train.auto_memory``: the fastest mode, no lighter than ``current``, whose predicted peak fits
    ``budget``; the leanest with a warning when none does. ``weights``: bytes on the GPU before training
    (measured), ``trainable``: parameters that train."""
    tokens = cfg.train.batch_size * cfg.data.max_seq_len
    mode, est = memory.fitting_mode(shapes, tokens, budget, weights, trainable, cfg.train.optimizer, fused,
                                    at_least=current, dropout=cfg.lora.dropout > 0)
    gib = budget / memory.GIB
    warning = ""
    if mode is None:  # the leanest mode gives the best chance; say that it may still not fit
        mode = list(est)[-1]
        warning = (f"; even that is more than {memory.FILL:.0%} of the {gib:.1f} GiB free, so training may run out "
                   "of memory (lower train.batch_size or data.max_seq_len)")
    if mode == current:
        return CheckpointChoice(mode, f"memory estimate: {est[mode].line()}" + (warning or f"; fits the {gib:.1f} GiB free"))
    why = f"{est[current].total / memory.GIB:.1f} GiB without would not fit the {gib:.1f} GiB free"
    return CheckpointChoice(mode, f"memory: {'offloaded' if mode == 'offload' else 'gradient'} checkpointing turned "
                                  f"on — {why}; now {est[mode].line()}{warning} (train.auto_memory: false keeps the "
                                  "settings as given)")


def offload_shortfall(shapes: memory.Shapes, tokens: int) -> str | None:
    """Why offloaded checkpoints (one layer input per decoder layer, in pinned host memory) cannot be
    held by this host, or None."""
    need = memory.offload_host_bytes(shapes, tokens)
    short = host_shortfall(need, f"offloaded checkpoints ({shapes.layers} layer inputs)")
    if short is None:
        return None
    return (f"{short}: lower data.max_seq_len or train.batch_size, or keep the checkpoints on the GPU "
            "(train.offload_checkpoints: false, train.auto_memory: false)")
