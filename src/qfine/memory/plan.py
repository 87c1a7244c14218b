"""``qfine plan``: will a training config fit a GPU, and with which settings — from the model's
config.json alone (no weights are read), through the one memory model of :mod:`qfine.memory.estimate`.

The frozen weights' bytes are computed from the shapes as the loaders store them:

* nf4 / fp4 (bitsandbytes): ½ byte per weight + one absmax per 64 weights (fp32; with double quant
  an 8-bit absmax and one fp32 constant per 256 absmaxes) for every decoder linear; the embeddings,
  norms and output layer stay in the compute dtype (2 bytes).
* int8: 1 byte per weight + one fp32 scale per output row.
* int4 (QA-LoRA): ½ byte per weight + an fp32 scale and minimum per group of ``group_size``.
* none: 2 bytes per weight.

Trainable parameters: r · (in + out) per adapted linear, plus the parts trained in full.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from qfine.config import RunConfig
from qfine.memory import estimate as memory
from qfine.quant import KINDS, Settings
from qfine.quant.adaptive import budget_bytes
from qfine.util.errors import QfineError

_LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def parse_gib(text: str, flag: str = "--gpu-memory") -> int:
    """'24GiB', '24 GiB', '24GB' (read as GiB), '80' (GiB) → bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(gib|gb|g)?\s*", str(text).lower())
    if not m:
        raise QfineError(f"{flag} {text!r}: give a size such as 24GiB")
    return int(float(m.group(1)) * memory.GIB)


def linear_shapes(s: memory.Shapes) -> dict[str, tuple[int, int]]:
    """(in, out) of each decoder-layer projection."""
    d, q, kv, i = s.hidden, s.q_dim, s.kv_dim, s.intermediate
    return {"q_proj": (d, q), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (q, d),
            "gate_proj": (d, i), "up_proj": (d, i), "down_proj": (i, d)}


def weight_bytes(config, quantization: str, double_quant: bool = True, group_size: int = 32,
                 dtype_bytes: int = 2, budget: str = "1.15x") -> int:
    """Bytes of the frozen base as loaded (module docstring); ``dtype_bytes``: of the compute dtype, in
    which the layers that are not quantized are kept (2 on a GPU, 4 with fp32 compute on the CPU);
    ``budget``: adaptive quantization's memory budget (its upper bound is planned for)."""
    if quantization == "adaptive":  # NF4 plus the int8 layers its budget allows, at most
        return budget_bytes(budget, weight_bytes(config, "nf4", double_quant, dtype_bytes=dtype_bytes))
    s = memory.Shapes.from_config(config)
    linear = s.layers * layer_bytes(config, quantization, double_quant, group_size, dtype_bytes)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    embeddings = s.vocab * s.hidden * (1 if tied else 2)
    norms = s.layers * 2 * s.hidden + s.hidden
    return int(linear + dtype_bytes * (embeddings + norms))


def trainable_params(config, cfg: RunConfig) -> int:
    s = memory.Shapes.from_config(config)
    shapes = linear_shapes(s)
    targets = cfg.lora.target_modules
    names = _LINEAR_NAMES if "all-linear" in targets else [t for t in targets if t in shapes]
    n = s.layers * sum(cfg.lora.r * sum(shapes[t]) for t in names)
    if cfg.lora.variant == "dora":
        n += s.layers * sum(shapes[t][1] for t in names)  # one magnitude per output row
    full = {"embed": s.vocab * s.hidden, "head": s.vocab * s.hidden, "norm": s.layers * 2 * s.hidden + s.hidden}
    return n + sum(full[p] for p in cfg.lora.trainable if p in full)


def _pow2ceil(n: int) -> int:
    return 1 << (n - 1).bit_length() if n > 1 else n


def host_layer_bytes(config, quantization: str, double_quant: bool = True, dtype_bytes: int = 2,
                     min_bytes: int = memory.STREAM_MIN_BYTES) -> int:
    """Pinned host bytes of one streamed decoder layer: each streamed tensor of its kind
    (:attr:`qfine.quant.BaseWeight.host_tensors`, at least ``min_bytes``) rounded up to a power of two,
    as torch's pinned-memory cache allocates it (a Llama-3.1-70B layer: 0.45 GiB for 0.41 of weights)."""
    s = memory.Shapes.from_config(config)
    kind, settings = KINDS.named(quantization), Settings(double_quant, dtype_bytes=dtype_bytes)
    total = sum(_pow2ceil(t) for inp, out in linear_shapes(s).values()
                for t in kind.host_tensor_bytes(out, inp, settings) if t >= min_bytes)
    norm = s.hidden * dtype_bytes  # the two norms' weights (frozen, streamed when large enough)
    return total + (2 * _pow2ceil(norm) if norm >= min_bytes else 0)


def layer_bytes(config, quantization: str, double_quant: bool = True, group_size: int = 32,
                dtype_bytes: int = 2) -> int:
    """Bytes of one decoder layer's linears as stored (:attr:`qfine.quant.BaseWeight.stored_bytes`;
    adaptive: its NF4 layers, the int8 ones being larger): what weight streaming moves per layer."""
    s = memory.Shapes.from_config(config)
    kind, settings = KINDS.named(quantization), Settings(double_quant, group_size, dtype_bytes)
    return int(sum(kind.stored_bytes(out, inp, settings) for inp, out in linear_shapes(s).values()))


@dataclass
class Option:
    batch: int
    mode: str
    estimate: memory.Estimate
    fits: bool  # estimate ≤ memory.FILL × budget, and its pinned host memory ≤ memory.HOST_FILL × host budget
    host_fits: bool = True

    @property
    def stream(self) -> bool:
        return self.estimate.stream


def plan(config, cfg: RunConfig, budget: int, fused: bool = True,
         host_budget: int | None = None) -> tuple[int, int, list[Option]]:
    """(weights bytes, trainable parameters, every option as (batch, mode) from the config's micro-batch
    down to 1, each checkpoint mode, and the checkpointed modes again with the weights streamed) — the
    caller filters the fitting ones; ordered fastest first: without streaming before with it, then a
    larger micro-batch first, and at one batch none, then checkpoint, then offload. ``host_budget``: the
    host memory the pinned buffers may use (None: not checked)."""
    shapes = memory.Shapes.from_config(config)
    weights = weight_bytes(config, cfg.model.quantization, cfg.model.double_quant, cfg.model.group_size,
                           budget=cfg.model.memory_budget)
    params = trainable_params(config, cfg)
    batches = sorted({b for b in (cfg.train.batch_size, cfg.train.batch_size // 2, cfg.train.batch_size // 4, 1) if b},
                     reverse=True)
    per_layer = layer_bytes(config, cfg.model.quantization, cfg.model.double_quant, cfg.model.group_size)
    host_layer = host_layer_bytes(config, cfg.model.quantization, cfg.model.double_quant)
    options = []
    for stream in (0, per_layer):
        for b in batches:
            for mode in memory.MODES[1:] if stream else memory.MODES:
                est = memory.estimate(shapes, b * cfg.data.max_seq_len, mode, weights, params, cfg.train.optimizer,
                                      fused, dropout=cfg.lora.dropout > 0, layer_bytes=stream,
                                      host_layer_bytes=host_layer if stream else 0)
                host_fits = host_budget is None or est.host <= memory.HOST_FILL * host_budget
                options.append(Option(b, mode, est, est.total <= memory.FILL * budget and host_fits, host_fits))
    return weights, params, options


def render(source: str, config, cfg: RunConfig, budget: int, fused: bool, host_budget: int | None = None) -> str:
    weights, params, options = plan(config, cfg, budget, fused, host_budget)
    lines = [f"plan for {source}: {config.num_hidden_layers} layers, hidden {config.hidden_size}; "
             f"{cfg.model.quantization} base {weights / memory.GIB:.2f} GiB; {params:,} trainable parameters; "
             f"sequence {cfg.data.max_seq_len}, micro-batch {cfg.train.batch_size} × grad_accum {cfg.train.grad_accum}; "
             f"budget {budget / memory.GIB:.1f} GiB (fills up to {memory.FILL:.0%})"
             + (f"; host {host_budget / memory.GIB:.1f} GiB (pinned buffers up to {memory.HOST_FILL:.0%})"
                if host_budget is not None else "; host memory not checked (--host-memory)"),
             f"{'batch':>5} {'checkpointing':<13} {'weights':<8} {'peak GiB':>8}  {'on GPU':>7} {'adapter+opt':>11} "
             f"{'activations':>11} {'loss/bwd':>8} {'slack':>5} {'host GiB':>8}  fits"]
    for o in options:
        e = o.estimate
        lines.append(f"{o.batch:>5} {o.mode:<13} {'streamed' if o.stream else 'resident':<8} "
                     f"{e.total / memory.GIB:>8.2f}  {e.weights / memory.GIB:>7.2f} "
                     f"{e.trainable / memory.GIB:>11.2f} {e.activations / memory.GIB:>11.2f} "
                     f"{e.transient / memory.GIB:>8.2f} {e.slack / memory.GIB:>5.2f} {e.host / memory.GIB:>8.2f}  "
                     f"{'yes' if o.fits else ('no (host)' if not o.host_fits else 'no')}")
    fitting = [o for o in options if o.fits]
    gpu_only = [o for o in options if not o.host_fits and o.estimate.total <= memory.FILL * budget]
    if not fitting and gpu_only:
        least = min(o.estimate.host for o in gpu_only)
        lines.append(f"nothing fits: what fits the GPU needs at least {least / memory.GIB:.1f} GiB of pinned host "
                     f"memory, more than {memory.HOST_FILL:.0%} of the {host_budget / memory.GIB:.1f} GiB host; use "
                     "a shorter data.max_seq_len, a bigger GPU or more host memory")
    elif not fitting:
        lines.append("nothing fits: the frozen weights alone take "
                     f"{weights / memory.GIB:.1f} GiB; use a smaller model, a shorter data.max_seq_len or a bigger GPU")
    else:
        best = fitting[0]
        accum = max(1, cfg.train.batch_size * cfg.train.grad_accum // best.batch)
        flags = {"none": "", "checkpoint": " --gradient-checkpointing", "offload": " --offload-checkpoints"}[best.mode]
        flags += " --stream-weights on" if best.stream else ""
        lines.append(f"fastest that fits: --batch-size {best.batch} --grad-accum {accum}{flags} "
                     f"({best.estimate.total / memory.GIB:.2f} GiB); qfine train's auto_memory (on by default) turns "
                     "checkpointing, offloading and weight streaming on by the same estimate")
    return "\n".join(lines)
